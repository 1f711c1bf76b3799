"""DeepSpeed's native checkpoints in a run directory: the layout, `latest`, the sidecar, checks.

`RUN/checkpoints/deepspeed/` is the save_dir of `engine.save_checkpoint`: one directory per tag
(`step_000000042`) with every rank's shards and DeepSpeed's model-states file, which holds the
trainer's client_state (masks, method, scheduler, step, RNG, FLOPs, config). After every rank has
written the tag, rank 0 writes `distsparse.json` into it (step, world size, ZeRO stage, config),
then points `latest` at it (both by rename), then removes the older tags. DeepSpeed's own `latest`
is not used: rank 0 writes it before the other ranks finish and not atomically. So a crash at any
point leaves `latest` naming a complete tag, and the checks on resume read only small JSON files.
This module imports neither DeepSpeed nor the trainer: evaluation and launchers use it too.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distsparse.config import BackendConfig
from distsparse.engine.checkpoint import write_atomically
from distsparse.errors import CheckpointError

__all__ = ["DEEPSPEED_DIR", "NativeCheckpoint", "check_native_resume", "commit_native",
           "latest_native", "step_tag"]

DEEPSPEED_DIR = "checkpoints/deepspeed"
"""Where a DeepSpeed run directory keeps DeepSpeed's own checkpoints."""
SIDECAR = "distsparse.json"
_TAG_PREFIX = "step_"


@dataclass(frozen=True)
class NativeCheckpoint:
    """The newest complete DeepSpeed checkpoint of a run, as its sidecar describes it."""

    directory: Path
    tag: str
    step: int
    world_size: int
    zero_stage: int
    config: dict[str, Any]

    @property
    def source(self) -> Path:
        return self.directory / self.tag

    def check(self, backend: BackendConfig, world_size: int) -> None:
        """`check_native_resume` with this run's backend keys."""
        check_native_resume(self, backend.name, world_size, backend.zero_stage)

    def restore_unwrapped(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Nothing: DeepSpeed loads its shards into the engine."""

    def restore_wrapped(self, checkpointer: Any) -> dict[str, Any]:
        """Model, optimizer and engine state through the DeepSpeed backend's checkpointer."""
        return checkpointer.load(self)


def step_tag(step: int) -> str:
    """The tag of the checkpoint written after `step` optimizer steps."""
    return f"{_TAG_PREFIX}{step:09d}"


def latest_native(run_dir: Path) -> NativeCheckpoint | None:
    """The checkpoint `latest` names, or None when the run has none; CheckpointError if unreadable."""
    directory = Path(run_dir) / DEEPSPEED_DIR
    latest = directory / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text(encoding="utf-8").strip()
    sidecar = directory / tag / SIDECAR
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        return NativeCheckpoint(directory, tag, int(record["step"]), int(record["world_size"]),
                                int(record["zero_stage"]), dict(record["config"]))
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {directory}: {tag}/{SIDECAR} is missing or corrupt") from None


def check_native_resume(checkpoint: NativeCheckpoint, backend: str, world_size: int,
                        zero_stage: int) -> None:
    """Stop with one line unless this run can load `checkpoint` exactly as it was written.

    DeepSpeed cannot re-partition ZeRO 1-3 optimizer state for another data-parallel world size,
    and only a DeepSpeed engine of the same stage reads the shard layout; at stage 0 every file
    holds full tensors, so any world size above 1 loads it.
    """
    written = (f"checkpoint {checkpoint.directory} was written by {checkpoint.world_size} ranks at "
               f"ZeRO stage {checkpoint.zero_stage}")
    if backend != "deepspeed":
        raise CheckpointError(f"{written}; resume with backend.name=deepspeed (got {backend})")
    if zero_stage != checkpoint.zero_stage:
        raise CheckpointError(f"{written}; resume with backend.zero_stage={checkpoint.zero_stage} "
                              f"(got {zero_stage})")
    if world_size == 1 or (checkpoint.zero_stage > 0 and world_size != checkpoint.world_size):
        raise CheckpointError(f"{written}; resume with --nproc {checkpoint.world_size} (got {world_size})")


def commit_native(directory: Path, tag: str, record: dict[str, Any]) -> None:
    """Rank 0, once every rank has written `tag`: its sidecar, then `latest`, then older tags go."""
    write_atomically(directory / tag / SIDECAR, lambda file: file.write(json.dumps(record).encode()))
    write_atomically(directory / "latest", lambda file: file.write(tag.encode()))
    for entry in directory.iterdir():
        if entry.is_dir() and entry.name.startswith(_TAG_PREFIX) and entry.name != tag:
            shutil.rmtree(entry)
