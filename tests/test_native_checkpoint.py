"""DeepSpeed's checkpoint layout in a run directory, without DeepSpeed: `latest` names only a
complete tag, older tags go after the new one is committed, and resumes that cannot load stop."""
from __future__ import annotations

import pytest

from distsparse.engine.native_checkpoint import (
    DEEPSPEED_DIR,
    NativeCheckpoint,
    check_native_resume,
    commit_native,
    latest_native,
    step_tag,
)
from distsparse.errors import CheckpointError


def _write_tag(directory, step: int) -> str:
    """What every rank's engine.save_checkpoint leaves: the tag directory with shards."""
    tag = step_tag(step)
    (directory / tag).mkdir(parents=True)
    (directory / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"shard")
    return tag


def test_latest_names_the_last_committed_tag_and_older_ones_are_removed(tmp_path):
    directory = tmp_path / DEEPSPEED_DIR
    assert latest_native(tmp_path) is None
    record = {"step": 4, "world_size": 2, "zero_stage": 3, "config": {"seed": 0}}
    commit_native(directory, _write_tag(directory, 4), record)
    _write_tag(directory, 8)  # a save that died before its commit: the run resumes from step 4
    assert latest_native(tmp_path) == NativeCheckpoint(directory, "step_000000004", 4, 2, 3, {"seed": 0})
    commit_native(directory, _write_tag(directory, 12), {**record, "step": 12})
    assert sorted(p.name for p in directory.iterdir()) == ["latest", "step_000000012"]
    assert latest_native(tmp_path).step == 12
    (directory / "step_000000012" / "distsparse.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"step_000000012/distsparse.json is missing or corrupt"):
        latest_native(tmp_path)


@pytest.mark.parametrize(("backend", "world_size", "stage", "expected"), [
    ("deepspeed", 2, 3, None),
    ("deepspeed", 1, 3, "resume with --nproc 2 (got 1)"),
    ("deepspeed", 4, 3, "resume with --nproc 2 (got 4)"),
    ("deepspeed", 2, 2, "resume with backend.zero_stage=3 (got 2)"),
    ("ddp", 2, 3, "resume with backend.name=deepspeed (got ddp)"),
])
def test_resume_needs_the_backend_stage_and_world_size_it_was_written_with(
        tmp_path, backend, world_size, stage, expected):
    checkpoint = NativeCheckpoint(tmp_path, "step_000000004", 4, 2, 3, {})
    if expected is None:
        check_native_resume(checkpoint, backend, world_size, stage)
        return
    with pytest.raises(CheckpointError) as error:
        check_native_resume(checkpoint, backend, world_size, stage)
    assert str(error.value) == (f"checkpoint {tmp_path} was written by 2 ranks at ZeRO stage 3; "
                                f"{expected}")


def test_stage_0_files_hold_full_tensors_and_load_on_another_world_size(tmp_path):
    checkpoint = NativeCheckpoint(tmp_path, "step_000000004", 4, 2, 0, {})
    check_native_resume(checkpoint, "deepspeed", 4, 0)
    with pytest.raises(CheckpointError, match=r"--nproc 2 \(got 1\)"):
        check_native_resume(checkpoint, "deepspeed", 1, 0)
