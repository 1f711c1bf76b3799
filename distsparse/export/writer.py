"""Export a model and its masks: the sparse safetensors layout, a dense safetensors, or ONNX.

Every format is written to a temporary file beside the target and renamed onto it only when
complete (ONNX: once onnxruntime agrees with torch); an existing target is never replaced.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from distsparse.export.files import ExportError, refuse_existing, staged
from distsparse.export.formats import DTYPE_NAMES, FORMATS
from distsparse.export.pretrained import pretrained_part, save_pretrained
from distsparse.export.sparse_format import SPARSE_LAYOUT, mask_key, pack_mask, values_key
from distsparse.sparsity.masks import canonical_name

__all__ = ["DENSE_LAYOUT", "ExportError", "check_request", "export_model", "masked_state",
           "unwrapped"]

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
DENSE_LAYOUT = "distsparse-dense/1"
"""The `layout` metadata of a dense export."""


def check_request(format: str, dtype: str, out: Path) -> None:
    """ExportError unless `format` and `dtype` go together and `out` is free."""
    if format not in FORMATS:
        raise ExportError(f"format {format!r}: expected one of {', '.join(FORMATS)}")
    if dtype not in DTYPE_NAMES:
        raise ExportError(f"dtype {dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
    if format == "onnx" and dtype != "float32":
        raise ExportError(f"--dtype {dtype}: ONNX export is float32 only "
                          "(onnxruntime on the CPU checks it)")
    refuse_existing(out)


def masked_state(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state dict by canonical names, masked-off entries of every masked weight +0.0."""
    state = {canonical_name(key): value.detach() for key, value in model.state_dict().items()}
    for name, mask in masks.items():
        if name not in state:
            raise ExportError(f"mask {name!r} names no tensor of the model's state dict")
        weight = state[name]
        if tuple(mask.shape) != tuple(weight.shape):
            raise ExportError(f"mask {name!r} has shape {tuple(mask.shape)}, the weight "
                              f"{tuple(weight.shape)} (export full masks, not ZeRO-3 pieces)")
        masked = weight.masked_fill(~mask.to(device=weight.device, dtype=torch.bool), 0)
        for key, value in state.items():  # the weight and every name tied to it
            if value is weight or (value.data_ptr() == weight.data_ptr() and
                                   value.shape == weight.shape and value.stride() == weight.stride()):
                state[key] = masked
    return state


def export_model(model: nn.Module, masks: Mapping[str, torch.Tensor], out: str | os.PathLike,
                 format: str = "sparse", dtype: str = "float32",
                 metadata: Mapping[str, Any] | None = None,
                 example_inputs: torch.Tensor | None = None) -> Path:
    """Write `model` with `masks` (full boolean masks by parameter name) to `out`; return it.

    `sparse`: the layout of `distsparse.export.sparse_format` (read with `load_sparse`); `dense`:
    the state dict as safetensors, or for a Hugging Face model (or a module wrapping one as its
    only child, as distsparse's gpt) a `save_pretrained` folder; `onnx`: `torch.onnx.export` of
    the model in eval mode, checked against onnxruntime on `example_inputs` (required) before it
    is kept. Masked-off entries are written as exact zeros. `metadata` (method, config, step, ...)
    is stored with the safetensors files as JSON strings, beside the measured sparsity and
    per-layer density. Bad input raises ExportError (a DistsparseError) and writes nothing.
    """
    out = Path(out)
    check_request(format, dtype, out)
    masks = {canonical_name(name): mask for name, mask in masks.items()}
    state = masked_state(model, masks)
    if format == "onnx":
        if example_inputs is None:
            raise ExportError("ONNX export needs example inputs (a batch the model takes)")
        from distsparse.export.onnx_export import export_onnx

        export_onnx(unwrapped(model), state, masks, example_inputs, out)
        return out
    tensors = {key: _cast(key, value, DTYPES[dtype]) for key, value in state.items()}
    info = {**_describe(masks), **(metadata or {}), "dtype": dtype}
    strings = {key: value if isinstance(value, str) else json.dumps(value)
               for key, value in info.items()}
    if format == "sparse":
        tensors, strings = _sparse_layout(tensors, masks, strings)
    elif (pretrained := pretrained_part(unwrapped(model))) is not None:
        save_pretrained(*pretrained, tensors, info, out)
        return out
    else:
        tensors = {key: value.clone() if _shares_storage(value, tensors, key) else value
                   for key, value in tensors.items()}
        strings = {**strings, "format": "pt", "layout": DENSE_LAYOUT}
    with staged(out) as temporary:
        save_file(tensors, str(temporary), metadata=strings)
    return out


def unwrapped(model: nn.Module) -> nn.Module:
    """The module inside DDP or a DeepSpeed engine."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _cast(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating-point tensors in `dtype` (a value beyond its range is refused), others as they are."""
    if not tensor.is_floating_point():
        return tensor.cpu().contiguous()
    cast = tensor.to(device="cpu", dtype=dtype).contiguous()
    if not torch.equal(torch.isfinite(cast), torch.isfinite(tensor.cpu())):
        raise ExportError(f"--dtype {str(dtype).removeprefix('torch.')}: {key} holds values beyond "
                          "its range (export in float32 or bfloat16)")
    return cast


def _describe(masks: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Measured sparsity over the masked weights and density per masked layer."""
    counts = {name: (int(mask.sum()), mask.numel()) for name, mask in masks.items()}
    total = sum(numel for _, numel in counts.values())
    active = sum(count for count, _ in counts.values())
    return {"sparsity": 1.0 - active / total if total else 0.0,
            "layer_density": {name: count / numel for name, (count, numel) in counts.items()}}


def _shares_storage(tensor: torch.Tensor, tensors: Mapping[str, torch.Tensor], key: str) -> bool:
    """Whether an earlier entry shares this tensor's storage (weight tying, views)."""
    pointer = tensor.untyped_storage().data_ptr()
    for other_key, other in tensors.items():
        if other_key == key:
            return False
        if other.untyped_storage().data_ptr() == pointer and tensor.numel() and other.numel():
            return True
    return False


def _sparse_layout(tensors: dict[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                   strings: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Masked weights as packed mask + active values; tied tensors once; the layout's metadata."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    for key, tensor in tensors.items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                    tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and identity in seen and key not in masks:
            aliases[key] = seen[identity]
            continue
        seen.setdefault(identity, key)
        if key in masks:
            mask = masks[key].cpu().bool()
            parts = {mask_key(key): pack_mask(mask), values_key(key): tensor[mask].contiguous()}
        else:  # a view into another entry's storage is copied: safetensors refuses shared memory
            parts = {key: tensor.clone() if _shares_storage(tensor, tensors, key) else tensor}
        clash = [name for name in parts if name in stored or (name != key and name in tensors)]
        if clash:
            raise ExportError(f"state dict entry {clash[0]!r} collides with the sparse layout's "
                              "names; export with --format dense")
        stored.update(parts)
    layers = {key: list(tensors[key].shape) for key in masks}
    strings = {**strings, "format": "pt", "layout": SPARSE_LAYOUT,
               "state_dict_keys": json.dumps(list(tensors)), "sparse_layers": json.dumps(layers),
               "aliases": json.dumps(aliases)}
    return stored, strings
