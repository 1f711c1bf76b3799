"""Small host values (sizes, counts, offsets, boundaries) as tensors on the scores' device.

`torch.tensor(values, device="cuda")` copies from pageable host memory and then waits for the
device's stream to drain: inside a selection, a wait for every kernel queued before it. From pinned
memory the copy is queued behind that work instead, and the host goes on launching.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["device_tensor"]


def device_tensor(values: Sequence, device: torch.device | str,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype, device=device)` without a wait for a CUDA device: the
    values go through pinned memory (the caching host allocator holds it until the copy is done)."""
    host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
