"""Read a finished (or paused) run directory back: its config, trained model and masks."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distsparse.config import Config, load_config
from distsparse.data.loader import DataBundle, build_data
from distsparse.engine.checkpoint import CHECKPOINT_NAME, MODEL_KEYS, MODEL_NAME, load_checkpoint
from distsparse.engine.native_checkpoint import latest_native
from distsparse.errors import CheckpointError
from distsparse.models import build_model

__all__ = ["TrainedRun", "load_run"]


@dataclass
class TrainedRun:
    """A run directory loaded for evaluation or post-training: model in eval mode, masks applied."""

    run_dir: Path
    config: Config
    model: torch.nn.Module
    masks: dict[str, torch.Tensor]
    data: DataBundle
    summary: dict[str, Any]
    step: int


def load_run(run_dir: Path, device: torch.device | str = "cpu",
             overrides: list[str] = ()) -> TrainedRun:
    """Load RUN_DIR's config.yaml and model (checkpoints/last.pt, or a sharded run's model.pt).

    CheckpointError names what is missing.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise CheckpointError(f"run directory {run_dir} has no config.yaml")
    path, checkpoint = _trained_state(run_dir)
    config = load_config(config_path, list(overrides))
    data = build_data(config)
    model = build_model(config.model.name, data.num_classes, data.in_channels, config.model.kwargs)
    model = model.to(dtype=getattr(torch, config.train.dtype))  # before loading: float64 stays exact
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path} does not fit model.name="
            f"{config.model.name!r}: {str(exc).splitlines()[0]}"
        ) from None
    model = model.to(device=device).eval()
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    masks = {name: mask.to(device) for name, mask in checkpoint["masks"].items()}
    return TrainedRun(run_dir, config, model, masks, data, summary, int(checkpoint["step"]))


def _trained_state(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The file holding the run's latest model and masks, and its contents.

    A sharded run (DeepSpeed, FSDP2) keeps its shards in checkpoints/deepspeed or checkpoints/fsdp
    and writes model.pt when training ends or stops; a run that died in between has no model.pt
    of its last step.
    """
    native = latest_native(run_dir)
    if native is None:
        path = run_dir / CHECKPOINT_NAME
        return path, load_checkpoint(path)
    path = run_dir / MODEL_NAME
    state = load_checkpoint(path, MODEL_KEYS) if path.is_file() else None
    if state is None or int(state["step"]) != native.step:
        raise CheckpointError(
            f"run {run_dir} has a sharded checkpoint ({native.directory.relative_to(run_dir)}) at "
            f"step {native.step} but "
            f"no {MODEL_NAME} of that step (written when training ends or stops); "
            f"finish it with distsparse train --resume {run_dir}")
    return path, state
