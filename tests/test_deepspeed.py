"""DeepSpeed ZeRO 0-3 on 2 gloo processes: masks hold in every copy; same network as DDP; resume.

At stage 3 mask updates work on each rank's pieces: a full weight or gradient gather inside an
update raises, and the selection's bytes on the wire per update are recorded and bounded.

All runs happen in one pair of spawned workers (DeepSpeed's start-up is paid once). Every check
runs on both ranks in the same order (the read-backs are collectives) and records a message
instead of raising, so a failed check never leaves the other rank waiting in a collective.
Checkpoints are DeepSpeed's own (every rank writes its shards); a resumed run must end with every
tensor of every rank's files equal to an uninterrupted run's, and a resume that cannot load them
(another world size, ZeRO stage or backend) must stop with one line and change nothing.
Float32 (and bf16 at stages 0-3 for the every-copy check): DeepSpeed's ZeRO master copy is float32
whatever the model's dtype.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import deepspeed
import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from distsparse.cli import main
from distsparse.config import load_config
from distsparse.sparsifier import deepspeed_access
from distsparse.engine.backends.deepspeed import deepspeed_config
from distsparse.engine.native_checkpoint import DEEPSPEED_DIR, step_tag
from distsparse.engine.post_training import resolve_run_dir
from distsparse.engine.runs import load_run
from distsparse.errors import CheckpointError, ConfigError
from tests.conftest import SMALL, final_state, free_port, mask_update_fingerprints, selection_bytes_bound

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
BASE = [*SMALL, "model.name=mlp", "launcher.num_workers=2"]
STAGES = (0, 1, 2, 3)
FULL_GATHERS = ("safe_get_full_fp32_param", "safe_get_full_grad", "safe_get_full_optimizer_state")
# RigL skips the optimizer step on update steps (DeepSpeed's step then only clears gradients);
# GraNet-ST prunes and regrows after the step. Both grow by the dense gradient.
CASES = (("sgd", "rigl"), ("adamw", "granet_st"))
STAGE3_METHODS = {
    "gmp-global": ["method.name=gmp", "method.prune_scope=global"],
    "gmp-layer": ["method.name=gmp", "method.prune_scope=layer"],
    "set": ["method.name=set"],
}
"""More methods at stage 3 against DDP (SGD): global and layer-wise top-k, random growth by index."""
WEIGHT_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
"""DDP vs DeepSpeed weights in float32 (reductions may group differently); masks must be equal."""


def _copies(trainer) -> dict[str, dict[str, torch.Tensor]]:
    """Full model weight, fp32 master and every optimizer-state tensor of each masked layer."""
    backend = trainer.backend
    copies = {}
    for name, param in trainer.masks.params.items():
        if backend.stage == 3:
            with deepspeed.zero.GatheredParameters([param]):
                weight = param.data.detach().clone()
        else:
            weight = param.detach().clone()
        found = {"weight": weight}
        if backend.stage == 0 and backend.input_dtype is not None:
            found.update(_fp16_optimizer_copies(backend, param))
        elif backend.stage == 0:
            found.update({key: value for key, value in backend.optimizer.state.get(param, {}).items()
                          if torch.is_tensor(value) and value.dim() > 0})
        else:
            found["fp32 master"] = safe_get_full_fp32_param(param).reshape(weight.shape)
            for key in backend.access._state_keys():
                found[key] = safe_get_full_optimizer_state(param, key).reshape(weight.shape)
        copies[name] = found
    return copies


def _fp16_optimizer_copies(backend, param) -> dict[str, torch.Tensor]:
    """Stage 0 in bf16/fp16: the fp32 copy and state of `param`, found through DeepSpeed's
    FP16_UnfusedOptimizer (`fp16_groups` beside `fp32_groups`), not through the backend."""
    wrapper = backend.model.optimizer
    for params, copies in zip(wrapper.fp16_groups, wrapper.fp32_groups):
        for other, copy in zip(params, copies):
            if other is param:
                found = {"fp32 master": copy.detach().clone()}
                found.update({key: value for key, value in backend.optimizer.state.get(copy, {}).items()
                              if torch.is_tensor(value) and value.dim() > 0})
                return found
    raise KeyError("parameter in no optimizer group")


def _check_zero_at(trainer, positions: dict[str, torch.Tensor], what: str, step: int,
                   errors: list[str], require_state: bool) -> None:
    for name, found in _copies(trainer).items():
        if require_state and len(found) < (2 if trainer.backend.stage == 0 else 3):
            errors.append(f"stage {trainer.backend.stage} step {step}: {name} lacks copies {list(found)}")
        for copy_name, tensor in found.items():
            bad = int((tensor[positions[name]] != 0).sum())
            if bad:
                errors.append(f"stage {trainer.backend.stage} step {step}: {bad} {what} entries of "
                              f"{name} are non-zero in the {copy_name}")


def _instrument(trainer, errors: list[str]) -> None:
    """After every step: masked-off entries are 0 in every copy; regrown ones start at 0."""
    train_step, update_masks = trainer._train_step, trainer.sparsifier._update_masks

    def checked_update(step, grads):
        before = trainer.masks.full_masks()
        update_masks(step, grads)
        after = trainer.masks.full_masks()
        regrown = {name: after[name] & ~before[name] for name in before}
        trainer.regrown_total = getattr(trainer, "regrown_total", 0) + sum(
            int(r.sum()) for r in regrown.values())
        _check_zero_at(trainer, regrown, "regrown", step, errors, require_state=True)

    def checked_step(x, y):
        result = train_step(x, y)
        masked_off = {name: ~mask for name, mask in trainer.masks.full_masks().items()}
        _check_zero_at(trainer, masked_off, "masked-off", trainer.step, errors, require_state=True)
        return result

    trainer.sparsifier._update_masks, trainer._train_step = checked_update, checked_step


def _refuse(what: str):
    def refused(*args, **kwargs):
        raise AssertionError(f"{what} called inside a stage-3 mask update")

    return refused


def _forbid_full_gathers(trainer, errors: list[str], notes: list[str]) -> None:
    """Stage 3: make full gathers raise in gradient reads and updates; record the bytes.

    Patched: DeepSpeed's full-tensor getters (in `deepspeed.utils` and where the access imported
    them) and `deepspeed.zero.GatheredParameters`. The instrumented checks run outside the guard.
    """
    access, update_masks = trainer.backend.access, trainer.sparsifier._update_masks
    grads = access.grads
    layout = trainer.masks.layout
    label = trainer.config.run.dir

    def guarded(call):
        def run(*args):
            saved = [(module, name, getattr(module, name)) for module in (deepspeed.utils,
                     deepspeed_access) for name in FULL_GATHERS if hasattr(module, name)]
            saved.append((deepspeed.zero, "GatheredParameters", deepspeed.zero.GatheredParameters))
            for module, name, _ in saved:
                setattr(module, name, _refuse(name))
            try:
                return call(*args)
            finally:
                for module, name, original in saved:
                    setattr(module, name, original)

        return run

    sent_per_update: list[tuple[int, int]] = []

    def measured_update(step, grads):
        sent, gathered = layout.bytes_sent, layout.bytes_gathered
        before = trainer.sparsifier.mask_set.layer_fingerprints()  # this rank's pieces
        try:
            guarded(update_masks)(step, grads)
        except AssertionError as error:
            errors.append(f"{label} step {step}: {error}")
            raise
        selection = layout.bytes_sent - sent
        sent_per_update.append((selection, layout.bytes_gathered - gathered))
        numels = [layout.numel(name) for name in layout.names]
        # A changed piece was selected (bytes sent); an update without swaps may send nothing.
        changed = trainer.sparsifier.mask_set.layer_fingerprints() != before
        if selection > selection_bytes_bound(numels) or (changed and not selection):
            errors.append(f"{label} step {step}: the selection sent {selection} bytes")

    access.grads, trainer.sparsifier._update_masks = guarded(grads), measured_update
    trainer.note = lambda: notes.append(
        f"{Path(label).name} rank {access.rank}, bytes per update (selection and counts, "
        f"bit-packed mask gathers for the fingerprint log and persistent layers): {sent_per_update}")


def _train(overrides: list[str], errors: list[str] | None = None, resume: Path | None = None,
           notes: list[str] | None = None, regrows: bool = True):
    from distsparse.engine.trainer import Trainer

    if resume is None:
        config = load_config(QUICKSTART, [*BASE, *overrides])
    else:
        config = load_config(resume / "config.yaml",
                             ["run.stop_at_step=null", "launcher.num_workers=2", *overrides])
    trainer = Trainer(config, resume)
    if notes is not None and trainer.backend.stage == 3:
        if not trainer.masks.sharded:
            errors.append(f"{config.run.dir}: stage 3 holds full masks")
        if list(trainer.backend.access.persistent_masks) != [trainer.masks.names[-1]]:
            errors.append(f"{config.run.dir}: expected only the small last layer to be persistent")
        _forbid_full_gathers(trainer, errors, notes)
    if errors is not None:
        _instrument(trainer, errors)
    trainer.fit()
    if hasattr(trainer, "note"):
        trainer.note()
    torch.distributed.barrier()  # rank 0 has written the run's last checkpoint
    if errors is not None and regrows and not getattr(trainer, "regrown_total", 0):
        errors.append(f"{config.run.dir}: no update regrew a connection (nothing was shown)")
    return trainer


def _native_tensors(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor in every rank's files of the run's latest DeepSpeed tag, by file and key."""
    directory = run / DEEPSPEED_DIR
    found: dict[str, torch.Tensor] = {}

    def collect(value, key: str) -> None:
        if torch.is_tensor(value):
            found[key] = value
        elif isinstance(value, dict):
            for name, item in value.items():
                collect(item, f"{key}.{name}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                collect(item, f"{key}.{index}")

    for file in sorted((directory / (directory / "latest").read_text()).glob("*.pt")):
        collect(torch.load(file, map_location="cpu", weights_only=False), file.name)
    return found


def _digest(run: Path) -> dict[str, str]:
    """Every file of a run directory and a hash of its bytes."""
    return {str(f.relative_to(run)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(run.rglob("*")) if f.is_file()}


def _compare(a: Path, b: Path, label: str, errors: list[str], exact: bool) -> None:
    if mask_update_fingerprints(a) != mask_update_fingerprints(b) or not mask_update_fingerprints(a):
        errors.append(f"{label}: masks after the updates differ or there were none")
    first, second = final_state(a), final_state(b)
    for name in first["masks"]:
        if not torch.equal(first["masks"][name], second["masks"][name]):
            errors.append(f"{label}: final mask of {name} differs")
    for part in ("model",):
        for name, value in first[part].items():
            other = second[part][name]
            same = torch.equal(value, other) if exact else torch.allclose(value, other, **WEIGHT_TOLERANCE)
            if not same:
                errors.append(f"{label}: {part} {name} differs by {float((value - other).abs().max())}")
    if exact:  # all of DeepSpeed's files: weights, fp32 masters, optimizer state, client_state
        whole, resumed = _native_tensors(a), _native_tensors(b)
        if not whole or sorted(whole) != sorted(resumed):
            errors.append(f"{label}: the DeepSpeed checkpoints hold different tensors")
        errors.extend(f"{label}: {key} differs" for key, value in whole.items()
                      if key in resumed and not torch.equal(value, resumed[key]))


def _check_layout(run: Path, step: int, label: str, errors: list[str]) -> None:
    """One complete tag (older ones removed), named by `latest`; the model file of that step."""
    directory = run / DEEPSPEED_DIR
    tags = sorted(entry.name for entry in directory.iterdir() if entry.is_dir())
    latest = (directory / "latest").read_text()
    if tags != [step_tag(step)] or latest != step_tag(step):
        errors.append(f"{label}: tags {tags}, latest {latest!r}; expected only {step_tag(step)}")
    if not (directory / latest / "distsparse.json").is_file():
        errors.append(f"{label}: {latest} has no distsparse.json")
    if (run / "checkpoints" / "last.pt").exists():
        errors.append(f"{label}: a DeepSpeed run wrote last.pt")
    if final_state(run)["step"] != step:
        errors.append(f"{label}: model.pt is of step {final_state(run)['step']}, expected {step}")


def _check_refusals(run: Path, errors: list[str]) -> None:
    """Resuming the stage-3 run with another ZeRO stage or backend: one line, nothing changed."""
    before = _digest(run)
    for override, expected in (("backend.zero_stage=2", "resume with backend.zero_stage=3 (got 2)"),
                               ("backend.name=ddp", "resume with backend.name=deepspeed (got ddp)")):
        try:
            _train([override], resume=run)
            errors.append(f"resume with {override} did not stop")
        except CheckpointError as exc:
            if expected not in str(exc) or "\n" in str(exc):
                errors.append(f"resume with {override}: {exc}")
    if _digest(run) != before:
        errors.append("a refused resume changed the run directory")


def _worker(rank: int, port: int, root: str, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    errors: list[str] = []
    notes: list[str] = []
    try:
        root_dir = Path(root)
        for optimizer, method in CASES:
            common = [f"train.optimizer={optimizer}", f"method.name={method}"]
            if optimizer == "adamw":
                common.append("train.lr=0.01")
            ddp = root_dir / f"ddp-{optimizer}"
            _train([*common, "backend.name=ddp", f"run.dir={ddp}"])
            for stage in STAGES:
                run = root_dir / f"ds{stage}-{optimizer}"
                _train([*common, "backend.name=deepspeed", f"backend.zero_stage={stage}",
                        f"run.dir={run}"], errors, notes=notes)
                _compare(ddp, run, f"DDP vs ZeRO-{stage} {optimizer}", errors, exact=False)
        for label, method in STAGE3_METHODS.items():
            ddp, run = root_dir / f"ddp-{label}", root_dir / f"ds3-{label}"
            _train([*method, "backend.name=ddp", f"run.dir={ddp}"])
            _train([*method, "backend.name=deepspeed", "backend.zero_stage=3", f"run.dir={run}"],
                   errors, notes=notes, regrows=label == "set")
            _compare(ddp, run, f"DDP vs ZeRO-3 {label}", errors, exact=False)
        for stage in STAGES:
            common = ["method.name=rigl", "backend.name=deepspeed", f"backend.zero_stage={stage}"]
            whole, parts = root_dir / f"ds{stage}-sgd", root_dir / f"resumed{stage}"
            _train([*common, f"run.dir={parts}", "run.stop_at_step=7"])
            _check_layout(parts, 7, f"ZeRO-{stage} stopped", errors)
            _train([f"run.dir={parts}"], resume=parts)
            _compare(whole, parts, f"ZeRO-{stage} resume", errors, exact=True)
            _check_layout(parts, 16, f"ZeRO-{stage} resumed", errors)
        _check_refusals(root_dir / "resumed3", errors)
        # A DDP run's last.pt resumes under ZeRO-3 (scattered into the partitions), which then
        # writes its own checkpoints; the later reads take those, not the older last.pt.
        mixed = root_dir / "ddp-then-ds3"
        _train(["method.name=rigl", "backend.name=ddp", f"run.dir={mixed}", "run.stop_at_step=7"])
        _train(["backend.name=deepspeed", "backend.zero_stage=3"], resume=mixed)
        _compare(root_dir / "ds3-sgd", mixed, "DDP resumed as ZeRO-3", errors, exact=False)
        bf16 = root_dir / "bf16.json"
        bf16.write_text(json.dumps({"bf16": {"enabled": True}}))
        for stage in STAGES:
            run = root_dir / f"bf16-ds{stage}"
            trainer = _train(["method.name=rigl", "backend.name=deepspeed",
                              f"backend.zero_stage={stage}", f"backend.deepspeed_config={bf16}",
                              f"run.dir={run}"], errors)
            dtypes = {param.dtype for param in trainer.masks.params.values()}
            if dtypes != {torch.bfloat16}:
                errors.append(f"bf16 at ZeRO-{stage}: the model's weights are {dtypes}")
        parts = root_dir / "bf16-resumed3"  # the bf16 weights come back from the fp32 masters
        _train(["method.name=rigl", "backend.name=deepspeed", "backend.zero_stage=3",
                f"backend.deepspeed_config={bf16}", f"run.dir={parts}", "run.stop_at_step=7"])
        _train([f"run.dir={parts}"], resume=parts)
        _compare(root_dir / "bf16-ds3", parts, "bf16 ZeRO-3 resume", errors, exact=True)
    except Exception:  # report, then leave: the other rank fails on its collective timeout
        errors.append(traceback.format_exc())
    queue.put((rank, errors, notes))


def run_two_ranks(worker, root: Path, timeout: float = 500) -> list:
    """Spawn `worker(rank, port, root, queue)` on 2 ranks; the reports they put on the queue."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    workers = [context.Process(target=worker, args=(rank, port, str(root), queue))
               for rank in range(2)]
    for worker_process in workers:
        worker_process.start()
    try:
        return [queue.get(timeout=timeout) for _ in workers]
    finally:
        for worker_process in workers:
            worker_process.join(timeout=30)
            if worker_process.is_alive():
                worker_process.terminate()


def test_masks_hold_in_every_copy_match_ddp_and_resume_exactly(tmp_path, capsys):
    reports = run_two_ranks(_worker, tmp_path)
    results = {rank: errors for rank, errors, _ in reports}
    print("\n" + "\n".join(note for _, _, notes in sorted(reports) for note in notes))
    assert results == {0: [], 1: []}, "\n".join(results.get(0, [])[:40] + results.get(1, [])[:5])
    _check_one_rank_resume_refused(tmp_path / "resumed3", capsys)
    _check_model_file_read(tmp_path / "ds3-sgd", tmp_path / "crashed")
    _check_ray_report_and_restore(tmp_path / "ds3-sgd", tmp_path)


def _check_one_rank_resume_refused(run: Path, capsys) -> None:
    """A ZeRO-3 checkpoint of 2 ranks resumed by 1: one line naming both, exit 2, nothing changed."""
    before = _digest(run)
    capsys.readouterr()
    status = main(["train", "--resume", str(run)])
    expected = (f"distsparse: error: checkpoint {run / DEEPSPEED_DIR} was written by 2 ranks at "
                "ZeRO stage 3; resume with --nproc 2 (got 1)")
    assert (status, capsys.readouterr().err.strip()) == (2, expected)
    assert _digest(run) == before


def _check_model_file_read(run: Path, crashed: Path) -> None:
    """evaluate/prune read a DeepSpeed run's model.pt; without one of the last step: one line."""
    assert resolve_run_dir(run / "checkpoints" / "model.pt") == run  # `prune RUN/checkpoints/model.pt`
    loaded, final = load_run(run), final_state(run)
    assert loaded.step == 16 and all(torch.equal(loaded.masks[n], m) for n, m in final["masks"].items())
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, final["model"][name]), name
    shutil.copytree(run, crashed)
    (crashed / "checkpoints" / "model.pt").unlink()  # as if the run died before it ended
    with pytest.raises(CheckpointError, match=r"at step 16 but no checkpoints/model.pt .*--resume"):
        load_run(crashed)


def test_config_merge_keeps_distsparse_keys_and_rejects_conflicts(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_clipping": 1.0, "zero_optimization": {"reduce_bucket_size": 5}}))
    merged = deepspeed_config(2, 64, 2, str(path))
    assert merged["gradient_clipping"] == 1.0
    assert merged["zero_optimization"] == {"reduce_bucket_size": 5, "stage": 2}
    assert (merged["train_batch_size"], merged["train_micro_batch_size_per_gpu"]) == (64, 32)
    path.write_text(json.dumps({"train_batch_size": 128}))
    with pytest.raises(ConfigError, match="train_batch_size=128"):
        deepspeed_config(2, 64, 2, str(path))
    path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="'optimizer'"):
        deepspeed_config(2, 64, 2, str(path))
    with pytest.raises(ConfigError, match="backend.zero_stage"):
        load_config(None, ["backend.name=deepspeed", "backend.zero_stage=4"])
    path.write_text(json.dumps({"bf16": {"enabled": True}}))
    assert deepspeed_config(1, 64, 2, str(path))["bf16"] == {"enabled": True}
    assert deepspeed_config(0, 64, 2, str(path))["bf16"] == {"enabled": True}


def _check_ray_report_and_restore(run: Path, tmp_path: Path) -> None:
    """Ray reports every rank's shards of the latest tag and `latest` (last); restored, they are
    the checkpoint a resume reads."""
    from distsparse.orchestrate.ray_train import _reported_files, _restore_reported, _stage_reported

    names = _reported_files(run)
    shards = {str(f.relative_to(run)) for f in (run / DEEPSPEED_DIR / step_tag(16)).rglob("*")
              if f.is_file()}
    assert names[0] == "config.yaml" and names[-1] == f"{DEEPSPEED_DIR}/latest"
    assert set(names[1:-1]) == shards and any("zero_pp_rank_1_" in name for name in shards)
    _stage_reported(run, tmp_path / "staged")
    assert _restore_reported(tmp_path / "staged", tmp_path / "restored") == 16
    assert _digest(tmp_path / "restored") == {name: digest for name, digest in _digest(run).items()
                                              if name in names}


def test_deepspeed_launcher_trains_as_nproc_does(tmp_path):
    """DeepSpeed's own launcher sets the variables torchrun sets: the same masks as --nproc 2."""
    common = [*BASE, "method.name=rigl", "backend.name=deepspeed", "backend.zero_stage=3",
              "run.progress=false"]
    port = free_port()
    launched, local = tmp_path / "launched", tmp_path / "local"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--no_local_rank",
         "--master_port", str(port), "--module", "distsparse.cli", "train", QUICKSTART, *common,
         "launcher.name=torchrun", f"run.dir={launched}"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(["train", QUICKSTART, "--nproc", "2", *common, f"run.dir={local}"]) == 0
    first, second = (json.loads((run / "summary.json").read_text()) for run in (launched, local))
    assert first["world_size"] == second["world_size"] == 2 and first["backend"] == "deepspeed"
    assert first["completed"] and first["mask_fingerprint"] == second["mask_fingerprint"]
