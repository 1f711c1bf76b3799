"""The sparse safetensors layout: bit-packed masks and active values; `load_sparse` reads it back.

One safetensors file (huggingface/safetensors, no format of our own). For every masked weight
`NAME` of shape S (N entries, A of them active):

- `NAME.mask`: uint8, shape (ceil(N / 8),): the mask flattened in row-major order, eight entries a
  byte, the first in the most significant bit (`numpy.packbits(bitorder="big")`); the padding bits
  of the last byte are 0;
- `NAME.values`: shape (A,), the weight's entries at the active positions in row-major order
  (`weight[mask]`), in the file's dtype.

Every other state-dict entry is stored dense under its own name. A tensor that shares its storage
with an earlier entry (weight tying) is stored once, under the earlier name. The string metadata:
`format` "pt"; `layout` "distsparse-sparse/1"; `state_dict_keys` (JSON list, the state dict's
order); `sparse_layers` (JSON object NAME -> S); `aliases` (JSON object, tied name -> the stored
name); and what `export_model` describes (method, sparsity, per-layer density, config, step, dtype).

Reading needs only safetensors and torch: this module imports nothing else but distsparse.errors.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from distsparse.errors import CheckpointError

__all__ = ["SPARSE_LAYOUT", "load_sparse", "mask_key", "pack_mask", "unpack_mask", "values_key"]

SPARSE_LAYOUT = "distsparse-sparse/1"
"""The `layout` metadata of a sparse export (its version changes with the layout)."""
_BIT_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


def mask_key(name: str) -> str:
    """The tensor holding the bit-packed mask of masked weight `name`."""
    return f"{name}.mask"


def values_key(name: str) -> str:
    """The tensor holding the active values of masked weight `name`."""
    return f"{name}.values"


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask as uint8 bytes: row-major, most significant bit first, zero-padded."""
    flat = mask.detach().reshape(-1).to(torch.uint8).cpu()
    padded = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).reshape(-1, 8)
    return (padded << _BIT_SHIFTS).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The boolean mask of `shape` that `pack_mask` packed into `packed`."""
    bits = (packed.reshape(-1, 1) >> _BIT_SHIFTS) & 1
    return bits.reshape(-1)[: math.prod(shape)].bool().reshape(shape)


def load_sparse(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The dense state dict of a sparse export, masked-off entries exactly 0, in the file's dtype.

    CheckpointError names the file when it is missing, unreadable or not of this layout.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"sparse export {path} does not exist")
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            if metadata.get("layout") != SPARSE_LAYOUT:
                raise CheckpointError(f"{path} is not a distsparse sparse export "
                                      f"(metadata layout {metadata.get('layout')!r}, "
                                      f"expected {SPARSE_LAYOUT!r})")
            keys = json.loads(metadata["state_dict_keys"])
            layers = json.loads(metadata["sparse_layers"])
            aliases = json.loads(metadata["aliases"])
            stored = {key: _read(file, key, layers) for key in keys if key not in aliases}
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"sparse export {path} is corrupt or truncated ({detail})") from None
    return {key: stored[aliases.get(key, key)] for key in keys}


def _read(file, key: str, layers: Mapping[str, list[int]]) -> torch.Tensor:
    if key not in layers:
        return file.get_tensor(key)
    shape = tuple(layers[key])
    mask = unpack_mask(file.get_tensor(mask_key(key)), shape)
    values = file.get_tensor(values_key(key))
    if values.dim() != 1 or values.numel() != int(mask.sum()):
        raise ValueError(f"{key}: {values.numel()} values for {int(mask.sum())} active entries")
    return values.new_zeros(shape).masked_scatter_(mask, values)  # row-major, as weight[mask]
