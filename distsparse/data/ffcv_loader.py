"""FFCV train and test pipelines (libffcv/ffcv-imagenet's recipe) behind the trainer's loader API.

Normalization runs in FFCV's CPU stage, before ToTensor, on every device: on the CPU a numba
operation after ToTensor hangs the Loader's constructor (FFCV 1.0.2), and FFCV's GPU
NormalizeImage needs cupy, which FFCV does not install. Batches are FFCV's reused buffers, so
`batches` hands out copies.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.reader import Reader
from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

from distsparse.config import ImageNetConfig
from distsparse.data.imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PIXEL_MEAN,
    PIXEL_STD,
    resolution_at,
)
from distsparse.errors import ConfigError, DataError

__all__ = ["FFCVLoader", "beton_num_classes", "ffcv_train_loader", "ffcv_val_loader"]


class FFCVLoader:
    """An FFCV Loader as the trainer sees a loader: `len` and `batches(epoch, first_batch)`."""

    mean, std = PIXEL_MEAN, PIXEL_STD

    def __init__(self, loader: Loader, decoder: RandomResizedCropRGBImageDecoder | None = None,
                 config: ImageNetConfig | None = None) -> None:
        self.loader, self.decoder, self.config = loader, decoder, config

    def __len__(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches start, start+1, ... of `epoch` (the order is a function of it)."""
        if self.decoder is not None:  # progressive resizing: the crop size of this epoch
            side = resolution_at(epoch, self.config)
            self.decoder.output_size = (side, side)
        self.loader.next_epoch = epoch  # FFCV seeds each epoch's order with seed + epoch
        iterator = iter(self.loader)
        try:
            for index, (images, labels) in enumerate(iterator):
                if index >= start:
                    yield images.clone(), labels.reshape(-1).to(torch.int64, copy=True)
        finally:
            iterator.close()


def _label_pipeline(device: torch.device) -> list:
    pipeline = [IntDecoder(), ToTensor()]
    return pipeline + [ToDevice(device, non_blocking=True)] if device.type == "cuda" else pipeline


def _image_pipeline(decoder, flip: bool, device: torch.device) -> list:
    pipeline = [decoder, RandomHorizontalFlip()] if flip else [decoder]
    pipeline += [NormalizeImage(IMAGENET_MEAN, IMAGENET_STD, np.float32), ToTensor()]
    if device.type == "cuda":
        pipeline.append(ToDevice(device, non_blocking=True))
    return pipeline + [ToTorchImage()]


def _open(path: Path) -> Reader:
    try:
        return Reader(str(path))
    except Exception as exc:  # FFCV raises bare errors (struct, numpy, assert) on foreign files
        raise DataError(f"{path} is not a readable .beton file ({type(exc).__name__})") from None


def _local_batch(global_batch: int, world_size: int) -> int:
    if global_batch % world_size:
        raise ConfigError(
            f"config key 'train.batch_size' = {global_batch}: expected a multiple of the world "
            f"size {world_size}"
        )
    return global_batch // world_size


def ffcv_train_loader(path: Path, config: ImageNetConfig, global_batch: int, seed: int,
                      world_size: int, device: torch.device,
                      indices: np.ndarray | None = None) -> FFCVLoader:
    """Random resized crop, flip, normalize; random order; sharded with FFCV's distributed=True.

    With several workers FFCV's DistributedSampler takes the rank from the process group.
    `indices`: only these samples of the file (a calibration set); default all.
    """
    _open(path)
    side = resolution_at(0, config)
    decoder = RandomResizedCropRGBImageDecoder((side, side))
    loader = Loader(
        str(path), batch_size=_local_batch(global_batch, world_size),
        num_workers=config.num_workers, order=OrderOption.RANDOM, os_cache=config.in_memory,
        drop_last=True, seed=seed, distributed=world_size > 1, indices=indices,
        pipelines={"image": _image_pipeline(decoder, True, device), "label": _label_pipeline(device)},
    )
    return FFCVLoader(loader, decoder, config)


def ffcv_val_loader(path: Path, config: ImageNetConfig, global_batch: int, rank: int,
                    world_size: int, device: torch.device,
                    indices: np.ndarray | None = None) -> FFCVLoader:
    """Center crop (crop_ratio of the shorter side) resized to val_res, in file order.

    Each rank reads a contiguous slice of the file instead of FFCV's distributed sampler, which
    pads the set to a multiple of the world size and would count repeated images in top-1.
    `indices`: only these samples of the file, in this order (one rank); default all.
    """
    count = _open(path).num_samples
    if indices is None:
        begin, end = rank * count // world_size, (rank + 1) * count // world_size
        indices = np.arange(begin, end, dtype=np.uint64)
    decoder = CenterCropRGBImageDecoder((config.val_res, config.val_res), ratio=config.crop_ratio)
    loader = Loader(
        str(path), batch_size=_local_batch(global_batch, world_size),
        num_workers=config.num_workers, order=OrderOption.SEQUENTIAL, os_cache=config.in_memory,
        drop_last=False, indices=indices,
        pipelines={"image": _image_pipeline(decoder, False, device),
                   "label": _label_pipeline(device)},
    )
    return FFCVLoader(loader)


def beton_num_classes(path: Path) -> int:
    """1 + the largest label in a .beton's `label` field."""
    reader = _open(path)
    names = list(reader.handlers)
    if "label" not in names or "image" not in names:
        raise DataError(f"{path}: expected the fields 'image' and 'label', found {', '.join(names)}")
    return int(reader.metadata[f"f{names.index('label')}"].max()) + 1
