"""Dense export of a Hugging Face model as `save_pretrained` output that `from_pretrained` loads."""
from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distsparse.export.files import staged

__all__ = ["EXPORT_INFO", "pretrained_part", "save_pretrained"]

EXPORT_INFO = "distsparse_export.json"
"""Beside config.json: method, sparsity, per-layer density, config, step and dtype."""


def pretrained_part(model: nn.Module) -> tuple[Any, str] | None:
    """The `transformers.PreTrainedModel` the model is, or wraps as its only child (distsparse's
    `gpt` holds `GPT2LMHeadModel` as `gpt2`), and the state-dict prefix of its keys; else None."""
    transformers = sys.modules.get("transformers")  # not imported: the model cannot be one
    if transformers is None:
        return None
    if isinstance(model, transformers.PreTrainedModel):
        return model, ""
    children = list(model.named_children())
    if len(children) == 1 and isinstance(children[0][1], transformers.PreTrainedModel):
        return children[0][1], f"{children[0][0]}."
    return None


def save_pretrained(pretrained: Any, prefix: str, state: Mapping[str, torch.Tensor],
                    info: Mapping[str, Any], out: Path) -> None:
    """`pretrained.save_pretrained(out, state_dict=...)` with the masked, cast `state` (safetensors;
    the tied head once, as transformers saves it) and `EXPORT_INFO`, written to a folder beside
    `out` and renamed onto it."""
    from transformers.utils import logging as hf_logging

    own = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the command prints one line
    try:
        with staged(out, directory=True) as folder:
            pretrained.save_pretrained(folder, state_dict=own, safe_serialization=True)
            (folder / EXPORT_INFO).write_text(json.dumps(dict(info), indent=1), encoding="utf-8")
    finally:
        if bars:
            hf_logging.enable_progress_bar()
