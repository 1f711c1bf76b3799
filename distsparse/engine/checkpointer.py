"""One checkpointer over a run's stateful parts, whatever wraps the model.

A checkpoint holds the model and optimizer (written by the backend, in its wrapper's format) and
the run's other stateful parts as one dict: the Sparsifier (masks, method, step), the LR
scheduler, FLOPs, RNG, wall time and the config (torchtitan's `components/checkpointer` shape).
Each backend's `checkpointer` writes its format: `FileCheckpointer` one `last.pt` of full state
dicts (single process, DDP), DeepSpeed its own sharded tags (`engine/backends/deepspeed.py`).
`find_checkpoint` reads whichever a run directory holds, as a `SavedCheckpoint` the trainer
checks, then restores in two phases around wrapping, without knowing which backend runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from distsparse.config import BackendConfig
from distsparse.engine.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from distsparse.engine.native_checkpoint import latest_native
from distsparse.errors import CheckpointError

__all__ = ["Checkpointer", "FileCheckpoint", "FileCheckpointer", "SavedCheckpoint",
           "ShardedCheckpointer", "find_checkpoint"]


class Checkpointer(Protocol):
    """Writes a run's checkpoints in the format of the backend that owns it."""

    def save(self, run_dir: Path, step: int, state: dict[str, Any]) -> None:
        """Write the model, the optimizer and `state` as the checkpoint of `step` (a collective)."""

    def finish(self, run_dir: Path, state: dict[str, Any]) -> None:
        """When training ends or stops: leave the model and masks where evaluation reads them."""


class ShardedCheckpointer(Checkpointer, Protocol):
    """A checkpointer whose format only its own wrapper reads (DeepSpeed's tags)."""

    def load(self, checkpoint: Any) -> dict[str, Any]:
        """Load the model and optimizer of `checkpoint` into the wrapped model (a collective);
        return the run's other state."""


class SavedCheckpoint(Protocol):
    """A checkpoint found in a run directory: checked, then restored around wrapping."""

    step: int
    config: dict[str, Any]
    source: Path

    def check(self, backend: BackendConfig, world_size: int) -> None:
        """Stop with one line unless this backend and world size can load it."""

    def restore_unwrapped(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Load what this format loads into the bare model and optimizer, before wrapping."""

    def restore_wrapped(self, checkpointer: ShardedCheckpointer) -> dict[str, Any]:
        """Load what this format loads through the wrapper; return the run's other state."""


@dataclass(frozen=True)
class FileCheckpoint:
    """`last.pt`: full state dicts that any backend and world size can load."""

    source: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def config(self) -> dict[str, Any]:
        return self.state["config"]

    def check(self, backend: BackendConfig, world_size: int) -> None:
        """Full tensors: every backend and world size loads them."""

    def restore_unwrapped(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The model, and the optimizer once a step was taken (at step 0 the current config's)."""
        try:
            model.load_state_dict(self.state["model"])
        except RuntimeError as exc:
            raise CheckpointError(
                f"checkpoint {self.source} does not fit the model: {str(exc).splitlines()[0]}"
            ) from None
        if self.step > 0:
            optimizer.load_state_dict(self.state["optimizer"])

    def restore_wrapped(self, checkpointer: ShardedCheckpointer) -> dict[str, Any]:
        """Nothing more to load: the state is in the file."""
        return self.state


class FileCheckpointer:
    """Rank 0 writes `last.pt` from the full model and optimizer state dicts (single, DDP)."""

    def __init__(self, backend: Any) -> None:
        """`backend`: its `model_state_dict()`, `optimizer` and `rank` are read at each save."""
        self.backend = backend

    def save(self, run_dir: Path, step: int, state: dict[str, Any]) -> None:
        backend = self.backend
        full = {**state, "model": backend.model_state_dict(),
                "optimizer": backend.optimizer.state_dict()}
        if backend.rank == 0:
            save_checkpoint(full, run_dir / CHECKPOINT_NAME)

    def finish(self, run_dir: Path, state: dict[str, Any]) -> None:
        """Nothing: `last.pt` holds the model and masks."""


def find_checkpoint(run_dir: Path) -> SavedCheckpoint:
    """The newest checkpoint of a run: a backend's own format if it wrote one, else `last.pt`."""
    native = latest_native(run_dir)
    if native is not None:
        return native
    path = run_dir / CHECKPOINT_NAME
    return FileCheckpoint(path, load_checkpoint(path))
