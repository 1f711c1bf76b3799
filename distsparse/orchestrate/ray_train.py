"""launcher.name=ray: a Ray Train TorchTrainer whose workers run the same Trainer.

Ray Train creates the process group (gloo on CPU, NCCL on GPU) and sets RANK / WORLD_SIZE /
LOCAL_RANK, so the Trainer's own init_process_group does nothing. After every checkpoint the
Trainer writes, rank 0 reports it to Ray Train: config.yaml and checkpoints/last.pt, or for a
sharded run (DeepSpeed, FSDP2) the latest tag of checkpoints/deepspeed or checkpoints/fsdp (every
rank's shards) and its `latest`.
When Ray restarts the workers after a failure, rank 0 copies the last *reported* checkpoint back
into the run directory (`latest` last) and every worker resumes from it through the ordinary
--resume path, masks included. The run directory must be on a file system every worker node sees
(as for torchrun across nodes).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import distsparse
from distsparse.config import Config, LauncherConfig, run_directory
from distsparse.engine.checkpoint import CHECKPOINT_NAME
from distsparse.engine.native_checkpoint import latest_native
from distsparse.errors import DistsparseError

__all__ = ["scaling_config", "train_with_ray"]


def train_with_ray(config: Config, resume: Path | None = None) -> dict[str, Any]:
    """Run the training on launcher.num_workers Ray Train workers; return the run's summary."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    launcher = config.launcher
    run_dir = Path(resume if resume is not None else run_directory(config)).resolve()
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, dir=str(run_dir)))
    storage = Path(launcher.storage_path or run_dir.parent / "ray_results").resolve()
    if not ray.is_initialized():
        ray.init(address=launcher.address, log_to_driver=True, runtime_env=_package_runtime_env())
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": config, "resume": str(resume) if resume is not None else None},
        scaling_config=scaling_config(launcher),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Worker start-up is retried forever by default (controller_failure_limit=-1).
            failure_config=FailureConfig(max_failures=launcher.max_failures,
                                         controller_failure_limit=launcher.max_failures),
        ),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise DistsparseError(f"Ray Train run {run_dir} failed: {_first_line(exc)}") from None
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))


def scaling_config(launcher: LauncherConfig):
    """Ray Train's ScalingConfig for the launcher keys: workers, a GPU each, placement strategy."""
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=launcher.num_workers, use_gpu=launcher.use_gpu,
                         placement_strategy=launcher.placement_strategy)


def _package_runtime_env() -> dict[str, Any]:
    """Ship this distsparse package to the workers, whatever is installed on the nodes; not from a
    Ray job with a working_dir (`distsparse submit`): that reaches every worker already, and Ray
    would apply the job's excludes to the py_module too (`/data` drops distsparse/data/)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    job = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR, "{}"))
    if (job.get("runtime_env") or {}).get("working_dir"):
        return {}
    return {"py_modules": [str(Path(distsparse.__file__).parent)]}


def _first_line(exc: BaseException) -> str:
    """A worker's DistsparseError message if one caused the failure, else Ray's first line."""
    pending, seen = [exc], []
    while pending:
        error = pending.pop()
        if isinstance(error, DistsparseError):
            return str(error).strip().splitlines()[-1]
        seen.append(error)
        pending.extend(getattr(error, "worker_failures", {}).values())
        pending.extend(e for e in (error.__cause__,) if e is not None and e not in seen)
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _worker_loop(arguments: dict[str, Any]) -> None:
    """One Ray Train worker: restore the last reported checkpoint if any, then train."""
    import ray.train
    import torch.distributed as dist

    from distsparse.engine.trainer import train

    config: Config = arguments["config"]
    resume = Path(arguments["resume"]) if arguments["resume"] else None
    run_dir = Path(config.run.dir)
    rank = ray.train.get_context().get_world_rank()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        if rank == 0:
            with checkpoint.as_directory() as directory:
                step = _restore_reported(Path(directory), run_dir)
            print(f"distsparse: resuming {run_dir} from the Ray Train checkpoint at step {step}",
                  flush=True)
        if dist.is_initialized():
            dist.barrier()  # the other ranks read the restored checkpoint next
        resume = run_dir
    train(config, resume, on_checkpoint=_report_checkpoint)


def _report_checkpoint(run_dir: Path, metrics: dict[str, Any]) -> None:
    """Report a step's metrics to Ray Train from every rank, the checkpoint from rank 0."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="distsparse-report-") as staging:
        _stage_reported(run_dir, Path(staging))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(staging),
                         checkpoint_dir_name=f"step_{metrics['step']:09d}")


def _reported_files(run_dir: Path) -> list[str]:
    """config.yaml and the checkpoint a resume reads, relative to `run_dir`; `latest` comes last."""
    native = latest_native(run_dir)
    if native is None:
        return ["config.yaml", CHECKPOINT_NAME]
    shards = sorted(path for path in (native.directory / native.tag).rglob("*") if path.is_file())
    return ["config.yaml", *(str(path.relative_to(run_dir)) for path in shards),
            str((native.directory / "latest").relative_to(run_dir))]


def _stage_reported(run_dir: Path, staging: Path) -> None:
    """Link (or copy) the reported files into `staging`, in the run directory's layout."""
    for name in _reported_files(run_dir):
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(run_dir / name, target)


def _restore_reported(directory: Path, run_dir: Path) -> int:
    """Put a reported checkpoint back into the run directory; return its step."""
    import torch

    for name in _reported_files(directory):  # `latest` last: it then names a complete tag
        target = run_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.restore")
        shutil.copyfile(directory / name, tmp)
        os.replace(tmp, target)
    native = latest_native(run_dir)
    if native is not None:
        return native.step
    return int(torch.load(run_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=True)["step"])


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        # last.pt, `latest` and the sidecar are replaced by rename, DeepSpeed's shards written
        # once into a new tag directory: never rewritten in place.
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
