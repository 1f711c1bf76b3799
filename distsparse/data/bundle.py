"""What every data source hands the trainer: loaders of global batches and the data's shape."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["BatchLoader", "DataBundle", "model_input"]


class BatchLoader(Protocol):
    """What the trainer needs of a loader: batches per epoch and this rank's batches of an epoch.

    `mean` and `std` (shape (1, C, 1, 1)) are the per-channel statistics of [0, 1] pixels the
    loader normalized with, so evaluation can undo the normalization and corrupt the pixels.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __len__(self) -> int: ...

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's (inputs, int64 targets) of global batches start, start+1, ... of `epoch`.

        Targets are labels of shape (B,), or next tokens of shape (B, T) for a language model
        whose output is (B, T, vocabulary).
        """
        ...



@dataclass
class DataBundle:
    """Train and test loaders and what a model needs to know about the data."""

    train: BatchLoader
    test: BatchLoader
    num_classes: int
    in_channels: int
    byte_level: bool = False
    """Targets are bytes of text (a byte-level language model): evaluation adds bits per byte."""


def model_input(x: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """A batch's inputs on `device`: images in the model's `dtype`, tokens (integers) as they are."""
    return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
