"""`distsparse train backend.name=fsdp`: a tiny GPT (fortunes bytes, float64, RigL with AdamW) on 2
gloo ranks under FSDP2 against DDP, its DCP checkpoints, resumes and the readers of a run.

One pair of spawned workers runs, in order: DDP; FSDP2 uninterrupted; FSDP2 stopped at step 6 and
resumed on 2 ranks, and a copy resumed under DDP; DDP stopped at step 6 and resumed under FSDP2
(its `last.pt` sliced into the shards). Each rank records failures instead of raising, so a
failed check never leaves the other rank waiting in a collective. Then this process resumes a copy of the step-6 FSDP2 checkpoint on
one rank through the CLI (as `single`, reading the DCP files re-sliced by global index).
Float64 and 2 ranks make DDP's and FSDP2's gradient averages exact, so weights are compared bit for
bit; the one-rank continuation averages over one rank, so its weights are compared within 1e-9.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import traceback
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from distsparse.cli import main
from distsparse.config import load_config
from distsparse.engine.native_checkpoint import FSDP_DIR, step_tag
from distsparse.engine.post_training import resolve_run_dir
from distsparse.engine.runs import load_run
from distsparse.errors import ConfigError
from distsparse.export import load_sparse
from tests.conftest import final_state, free_port, mask_update_fingerprints
from tests.test_text_data import tiny_fortunes
from tests.test_transformers import GPT_MASKED, TINY_GPT, _erk_counts

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
STEPS, STOP = 12, 6
ONE_RANK_TOLERANCE = {"rtol": 0.0, "atol": 1e-9}
"""Float64 weights of a run continued on 1 rank against 2 ranks (gradient sums group differently)."""


def _config(root: Path, name: str, overrides: list[str]):
    return load_config(None, [*TINY_GPT, f"data.path={root / 'corpus'}", "method.name=rigl",
                              "train.dtype=float64", "launcher.num_workers=2",
                              f"run.dir={root / name}", *overrides])


def _train(config, errors: list[str], resume: Path | None = None) -> None:
    from distsparse.engine.trainer import Trainer
    from distsparse.sparsifier.fsdp_access import FSDPAccess

    trainer = Trainer(config, resume)
    sharded = isinstance(trainer.backend.access, FSDPAccess) and trainer.masks.sharded
    if sharded != (config.backend.name == "fsdp"):
        errors.append(f"{config.run.dir}: {config.backend.name} with access "
                      f"{type(trainer.backend.access).__name__}, pieces {trainer.masks.sharded}")
    trainer.fit()
    torch.distributed.barrier()  # rank 0 has committed the last checkpoint and written model.pt


def _resume_config(run: Path, overrides: list[str] = ()):
    return load_config(run / "config.yaml", ["run.stop_at_step=null", "launcher.num_workers=2",
                                             f"run.dir={run}", *overrides])


def _worker(rank: int, port: int, root: str, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    root_dir, errors = Path(root), []
    try:
        _train(_config(root_dir, "ddp", ["backend.name=ddp"]), errors)
        _train(_config(root_dir, "fsdp", ["backend.name=fsdp"]), errors)
        stopped = root_dir / "stopped"
        _train(_config(root_dir, "stopped", ["backend.name=fsdp", f"run.stop_at_step={STOP}"]), errors)
        if rank == 0:  # the step-6 checkpoint, for DDP and for the one-rank resume after the workers
            shutil.copytree(stopped, root_dir / "one-rank")
            shutil.copytree(stopped, root_dir / "fsdp-then-ddp")
        torch.distributed.barrier()
        _train(_resume_config(stopped), errors, resume=stopped)
        to_ddp = root_dir / "fsdp-then-ddp"
        _train(_resume_config(to_ddp, ["backend.name=ddp"]), errors, resume=to_ddp)
        mixed = root_dir / "ddp-then-fsdp"
        _train(_config(root_dir, "ddp-then-fsdp", ["backend.name=ddp", f"run.stop_at_step={STOP}"]),
               errors)
        _train(_resume_config(mixed, ["backend.name=fsdp"]), errors, resume=mixed)
    except Exception:  # report, then leave: the other rank fails on its collective timeout
        errors.append(traceback.format_exc())
    queue.put((rank, errors))


def _run_two_ranks(root: Path, timeout: float = 400) -> dict[int, list[str]]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    workers = [context.Process(target=_worker, args=(rank, port, str(root), queue)) for rank in range(2)]
    for worker in workers:
        worker.start()
    try:
        return dict(queue.get(timeout=timeout) for _ in workers)
    finally:
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()


def _dcp_tensors(run: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the run's latest DCP checkpoint (model and optimizer state), full."""
    directory = run / FSDP_DIR
    target = tmp_path / f"{run.name}.pt"
    dcp_to_torch_save(directory / (directory / "latest").read_text(), target)
    found: dict[str, torch.Tensor] = {}

    def collect(value, key: str) -> None:
        if torch.is_tensor(value):
            found[key] = value
        elif isinstance(value, dict):
            for name, item in value.items():
                collect(item, f"{key}.{name}" if key else str(name))

    collect(torch.load(target, weights_only=False), "")
    return found


def _same_final(a: Path, b: Path, tolerance: dict | None = None) -> None:
    first, second = final_state(a), final_state(b)
    assert first["step"] == second["step"] == STEPS
    assert first["masks"].keys() == second["masks"].keys()
    for name, mask in first["masks"].items():
        assert torch.equal(mask, second["masks"][name]), name
    for name, value in first["model"].items():
        if tolerance is None:
            assert torch.equal(value, second["model"][name]), name
        else:
            assert torch.allclose(value, second["model"][name], **tolerance), name


def test_fsdp2_train_matches_ddp_resumes_bit_for_bit_and_on_one_rank(tmp_path, capsys):
    tiny_fortunes(tmp_path / "corpus")
    assert _run_two_ranks(tmp_path) == {0: [], 1: []}
    ddp, fsdp, stopped = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "stopped"

    # FSDP2 chose DDP's masks at every update and ends with DDP's weights, bit for bit.
    assert [step for step, _ in mask_update_fingerprints(ddp)] == [4, 8]
    assert mask_update_fingerprints(fsdp) == mask_update_fingerprints(ddp)
    _same_final(ddp, fsdp)
    final = final_state(fsdp)
    assert list(final["masks"]) == GPT_MASKED
    shapes = {name: tuple(mask.shape) for name, mask in final["masks"].items()}
    assert {name: int(mask.sum()) for name, mask in final["masks"].items()} == _erk_counts(shapes, 0.2)
    assert torch.equal(final["model"]["gpt2.lm_head.weight"], final["model"]["gpt2.transformer.wte.weight"])

    # Its checkpoint: one DCP tag named by `latest`, no last.pt; masked-off entries exactly 0 in
    # the weights and in AdamW's moments of the shards every rank wrote.
    directory = fsdp / FSDP_DIR
    assert (directory / "latest").read_text() == step_tag(STEPS)
    assert sorted(p.name for p in directory.iterdir()) == ["latest", step_tag(STEPS)]
    assert sorted(p.name for p in (directory / step_tag(STEPS)).glob("*.distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]
    assert not (fsdp / "checkpoints" / "last.pt").exists()
    tensors = _dcp_tensors(fsdp, tmp_path)
    for name, mask in final["masks"].items():
        for key in (f"model.{name}", f"optimizer.state.{name}.exp_avg",
                    f"optimizer.state.{name}.exp_avg_sq"):
            assert torch.count_nonzero(tensors[key][~mask]) == 0, key
        assert torch.equal(tensors[f"model.{name}"], final["model"][name]), name

    # Stopped at step 6 and resumed on 2 ranks: every tensor of the checkpoint (weights, AdamW's
    # moments and step counts), the masks after every update and the model file, bit for bit.
    assert mask_update_fingerprints(stopped) == mask_update_fingerprints(fsdp)
    _same_final(fsdp, stopped)
    resumed = _dcp_tensors(stopped, tmp_path)
    assert resumed.keys() == tensors.keys()
    for key, value in tensors.items():
        assert torch.equal(value, resumed[key]), key

    # DDP's last.pt at step 6 resumed under FSDP2 (full optimizer state sliced into the shards),
    # and FSDP2's DCP checkpoint at step 6 resumed under DDP (read into the bare model): DDP's run.
    for mixed in ("ddp-then-fsdp", "fsdp-then-ddp"):
        assert mask_update_fingerprints(tmp_path / mixed) == mask_update_fingerprints(ddp), mixed
        _same_final(ddp, tmp_path / mixed)
    assert not (tmp_path / "fsdp-then-ddp" / FSDP_DIR).exists()

    # The 2-rank step-6 checkpoint resumed on 1 rank (`distsparse train --resume`, as single):
    # the same masks at the next update and at the end; it then writes last.pt and the stale DCP
    # checkpoint and model file go, so evaluation reads the newest state.
    one = tmp_path / "one-rank"
    assert main(["train", "--resume", str(one)]) == 0, capsys.readouterr().err
    assert json.loads((one / "summary.json").read_text())["world_size"] == 1
    assert mask_update_fingerprints(one) == mask_update_fingerprints(fsdp)
    _same_final(fsdp, one, ONE_RANK_TOLERANCE)
    assert not (one / FSDP_DIR).exists() and not (one / "checkpoints" / "model.pt").exists()
    assert load_run(one).step == STEPS

    # evaluate, prune and export read an FSDP2 run's model.pt (load_run), as DeepSpeed's.
    assert resolve_run_dir(fsdp / "checkpoints" / "model.pt") == fsdp
    loaded = load_run(fsdp)
    assert loaded.step == STEPS
    assert all(torch.equal(loaded.masks[name], mask) for name, mask in final["masks"].items())
    for name, value in loaded.model.state_dict().items():  # float64, loaded exactly
        assert value.dtype == torch.float64 and torch.equal(value, final["model"][name]), name
    exported = tmp_path / "fsdp.safetensors"
    assert main(["export", str(fsdp), "--format", "sparse", "--dtype", "float32",
                 "--out", str(exported)]) == 0, capsys.readouterr().err
    dense = load_sparse(exported)
    for name, mask in final["masks"].items():
        assert torch.equal(dense[name], (final["model"][name] * mask).float()), name


def test_keys_only_deepspeed_takes_are_refused_with_fsdp(tmp_path, capsys):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["backend.name=fsdp", "backend.zero_stage=3"])
    assert str(error.value) == ("config key 'backend.zero_stage' = 3: expected 0 (unset): only "
                                "backend.name=deepspeed takes it")
    run = tmp_path / "run"
    status = main(["train", QUICKSTART, "backend.name=fsdp", "backend.deepspeed_config=ds.json",
                   f"run.dir={run}"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err and not run.exists()
    assert err == ("distsparse: error: config key 'backend.deepspeed_config' = 'ds.json': expected "
                   "unset: only backend.name=deepspeed takes it")
