"""Counter-based random numbers: a draw is a pure function of (seed, step, layer, element index).

No process-global RNG state is read or changed, so every rank, every world size and every
sharding draws the same numbers for the same element. The mixer is a 32-bit integer hash
(lowbias32); multiplications are split into 16-bit halves so int64 tensors never overflow and the
result is identical on every device.
"""
from __future__ import annotations

import zlib

import torch

__all__ = ["layer_key", "random_bits", "stream_key"]

_MASK32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 tensors holding values in [0, 2**32)."""
    low, high = x & 0xFFFF, x >> 16
    return (low * c + ((high * (c & 0xFFFF)) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MUL2)
    return x ^ (x >> 16)


def _hash32_int(x: int) -> int:
    return int(_hash32(torch.tensor([x & _MASK32], dtype=torch.int64))[0])


def layer_key(name: str) -> int:
    """A stable 32-bit key for a layer name (crc32; Python's hash() is salted per process)."""
    return zlib.crc32(name.encode("utf-8"))


def stream_key(seed: int, step: int, layer: str, purpose: str) -> int:
    """Combine (seed, step, layer, purpose) into one 32-bit key."""
    key = _hash32_int(seed & _MASK32)
    for part in (seed >> 32, step & _MASK32, step >> 32, layer_key(layer), layer_key(purpose)):
        key = _hash32_int(key ^ (part & _MASK32))
    return key


def random_bits(
    seed: int, step: int, layer: str, purpose: str, indices: torch.Tensor
) -> torch.Tensor:
    """Uniform 32-bit integers (int64 tensor) for the given global element indices."""
    key = stream_key(seed, step, layer, purpose)
    idx = indices.to(torch.int64)
    bits = _hash32(idx & _MASK32 ^ key)
    return _hash32(bits ^ (idx >> 32) ^ _MUL2)
