"""Checkpoints: written atomically, read with torch.load(weights_only=True), errors named."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from distsparse.errors import CheckpointError

__all__ = ["CHECKPOINT_NAME", "CHECKPOINT_FORMAT", "MODEL_KEYS", "MODEL_NAME", "load_checkpoint",
           "save_checkpoint", "write_atomically"]

CHECKPOINT_NAME = "checkpoints/last.pt"
"""Where a run directory keeps its latest checkpoint (single and DDP; DeepSpeed: native_checkpoint)."""
MODEL_NAME = "checkpoints/model.pt"
"""Where a DeepSpeed run keeps the model and masks it ended with, in the single-process layout."""
CHECKPOINT_FORMAT = 1
_REQUIRED = ("format", "config", "step", "model", "optimizer", "scheduler", "masks", "method", "rng")
MODEL_KEYS = ("format", "config", "step", "model", "masks")
"""What evaluation and pruning read: every checkpoint and model file holds these."""


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through `write` to a temporary file beside `path`, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write the checkpoint atomically (a crash leaves the previous file whole)."""
    write_atomically(path, lambda file: torch.save({"format": CHECKPOINT_FORMAT, **state}, file))


def load_checkpoint(path: Path, required: tuple[str, ...] = _REQUIRED) -> dict[str, Any]:
    """Load a checkpoint holding `required`; CheckpointError names the file and what is wrong."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({detail})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a distsparse checkpoint of format {CHECKPOINT_FORMAT}")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return state
