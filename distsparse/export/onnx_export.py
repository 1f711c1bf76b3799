"""ONNX export of a masked model, kept only when onnxruntime agrees with torch on a batch."""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distsparse.export.files import ExportError, staged

__all__ = ["ONNX_TOLERANCE", "export_onnx"]

ONNX_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
"""onnxruntime's outputs must satisfy |ort - torch| <= atol + rtol * |torch| elementwise (float32;
the exporter folds batch norm into convolutions, so the arithmetic is not the same)."""
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def export_onnx(model: nn.Module, state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                inputs: torch.Tensor, out: Path) -> None:
    """`torch.onnx.export` (dynamo) of `model` (unwrapped) in eval mode with the masked float32
    `state`, checked against onnxruntime on `inputs`, masked-off initializer entries checked to be
    exact zeros; the file is renamed onto `out` only when both checks pass."""
    import onnx
    import onnxruntime
    from onnx import numpy_helper

    module = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    module.load_state_dict({key: value.float() if value.is_floating_point() else value
                            for key, value in state.items()})
    inputs = inputs.detach().cpu()
    inputs = inputs.float() if inputs.is_floating_point() else inputs
    with torch.no_grad():
        expected = _first_tensor(module(inputs)).numpy()
    with staged(out) as temporary:
        _torch_export(module, inputs, temporary)
        graph = onnx.load(str(temporary)).graph
        initializers = {item.name: item for item in graph.initializer}
        for name, mask in masks.items():
            if name in initializers:
                array = numpy_helper.to_array(initializers[name])
                if array.shape == tuple(mask.shape) and np.any(array[~mask.cpu().numpy()] != 0):
                    raise ExportError(f"ONNX initializer {name} is not zero where its mask is off")
        session = onnxruntime.InferenceSession(str(temporary), providers=["CPUExecutionProvider"])
        actual = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
        if actual.shape != expected.shape or not np.allclose(actual, expected, **ONNX_TOLERANCE):
            difference = (np.abs(actual - expected).max() if actual.shape == expected.shape
                          else f"shape {actual.shape} vs {expected.shape}")
            raise ExportError(f"onnxruntime and torch disagree on the test batch (max |difference| "
                              f"{difference}; tolerance {ONNX_TOLERANCE}); nothing written")


def _torch_export(module: nn.Module, inputs: torch.Tensor, path: Path) -> None:
    """torch.onnx.export, its logging and warnings silenced; a model it cannot trace: one line."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    noise = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(noise), \
                contextlib.redirect_stderr(noise):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (inputs,), str(path), dynamo=True, external_data=False,
                              verbose=False, input_names=["input"], output_names=["output"],
                              dynamic_shapes=({0: torch.export.Dim.AUTO},))
    except Exception as exc:  # torch.export raises many types; the model is what the user can change
        raise ExportError(f"the model cannot be exported to ONNX: {_cause(exc)}") from None
    finally:
        logger.setLevel(level)


def _cause(exc: Exception) -> str:
    """The first line of the error torch.export reports, without its colour codes."""
    text = _ANSI.sub("", str(exc))
    summary = re.search(r"## Exception summary\s+(.+)", text)
    line = summary.group(1) if summary else (text.strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"<class '(?:[\w]+\.)*(\w+)'>", r"\1", line).strip()


def _first_tensor(output: Any) -> torch.Tensor:
    """The model's output tensor (the first of a tuple, `logits` of a model output object)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return _first_tensor(output[0])
