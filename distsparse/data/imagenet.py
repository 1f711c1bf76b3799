"""ImageNet-format data: FFCV's ResNet recipe, or torchvision's ImageFolder as the fallback.

This module holds what both loaders share (pixel statistics, the resolution ramp);
`distsparse.data.loader.build_imagenet` builds them.

`data.loader=ffcv`: data.path holds train.beton and val.beton (written by `distsparse write-beton`).
Training follows libffcv/ffcv-imagenet's train_imagenet.py: random resized crop, horizontal flip,
progressive resizing by epoch, normalization; the test set is a center crop of `crop_ratio` of
the shorter side resized to `val_res`. Training is sharded by FFCV's `distributed=True` (PyTorch's
DistributedSampler: rank r takes every W-th sample of the epoch's permutation), so the samples a
rank sees, and the steps per epoch, depend on the world size: unlike the embedded loaders, FFCV
runs are not identical across world sizes.

`data.loader=torchvision`: data.path holds train/ and val/ ImageFolders; the same augmentation
with torchvision transforms (no FFCV needed). Like the embedded loaders, every global batch is a
pure function of (seed, epoch), each rank takes a contiguous slice of it, and a run sees the same
samples on 1 or N workers.

Both resume mid-epoch by skipping the epoch's first `first_batch` batches (FFCV still decodes them).
FFCV's crop and flip draws come from numba's unseeded per-thread generators: its order is a
function of (seed, epoch), its augmentation is not, so FFCV runs do not resume bit for bit.
"""
from __future__ import annotations

import numpy as np
import torch

from distsparse.config import ImageNetConfig

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PIXEL_MEAN", "PIXEL_STD", "resolution_at"]

IMAGENET_MEAN: np.ndarray = np.array([0.485, 0.456, 0.406]) * 255
"""Per-channel mean of ImageNet pixels in [0, 255] (RGB)."""
IMAGENET_STD: np.ndarray = np.array([0.229, 0.224, 0.225]) * 255
"""Per-channel standard deviation of ImageNet pixels in [0, 255] (RGB)."""

PIXEL_MEAN: torch.Tensor = torch.from_numpy(IMAGENET_MEAN / 255).float().reshape(1, 3, 1, 1)
"""IMAGENET_MEAN for [0, 1] pixels in the (1, C, 1, 1) layout of `BatchLoader.mean`."""
PIXEL_STD: torch.Tensor = torch.from_numpy(IMAGENET_STD / 255).float().reshape(1, 3, 1, 1)
"""IMAGENET_STD for [0, 1] pixels in the (1, C, 1, 1) layout of `BatchLoader.std`."""

_RESOLUTION_STEP = 32


def resolution_at(epoch: int, config: ImageNetConfig) -> int:
    """Training resolution of an epoch: min_res, a linear ramp rounded to a multiple of 32, max_res.

    ffcv-imagenet's get_resolution: min_res up to start_ramp, max_res from end_ramp on.
    """
    if epoch <= config.start_ramp:
        return config.min_res
    if epoch >= config.end_ramp:
        return config.max_res
    interpolated = np.interp(epoch, [config.start_ramp, config.end_ramp],
                             [config.min_res, config.max_res])
    return int(np.round(interpolated / _RESOLUTION_STEP)) * _RESOLUTION_STEP
