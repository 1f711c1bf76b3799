"""In-memory batch loaders whose order is a pure function of (seed, epoch).

Each epoch draws one permutation of the whole training set from the seed; global batch b is
samples [b*B, (b+1)*B) of it, and rank r of W takes its contiguous slice, so N workers see the
same global batches as one worker. Resuming at (epoch, batch) replays the same batches exactly.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from distsparse.config import Config
from distsparse.data.bundle import BatchLoader, DataBundle
from distsparse.data.fashion_mnist import load_fashion_mnist
from distsparse.data.synthetic import synthetic_classification
from distsparse.data.text import BYTE_VOCABULARY, fortunes_loaders
from distsparse.errors import ConfigError, DataError

__all__ = ["BatchLoader", "DataBundle", "TensorLoader", "build_data", "build_imagenet"]

_PAD = 2


class TensorLoader:
    """Batches of normalized float images from uint8 tensors, optionally augmented."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, global_batch: int, seed: int,
        train: bool, augment: bool, mean: torch.Tensor, std: torch.Tensor,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        if global_batch % world_size:
            raise ConfigError(
                f"config key 'train.batch_size' = {global_batch}: expected a multiple of the "
                f"world size {world_size}"
            )
        self.images = images if images.dim() == 4 else images.unsqueeze(1)
        self.labels = labels
        self.global_batch, self.seed = global_batch, seed
        self.train, self.augment = train, augment and train
        self.rank, self.world_size = rank, world_size
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.global_batch if self.train else -(-n // self.global_batch)

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's part of global batches start, start+1, ... of `epoch`."""
        n = len(self.labels)
        if self.train:
            generator = self._generator(epoch)
            order = torch.randperm(n, generator=generator)
            flips = torch.rand(n, generator=generator) < 0.5
            shifts = torch.randint(0, 2 * _PAD + 1, (n, 2), generator=generator)
        else:
            order = torch.arange(n)
        local = self.global_batch // self.world_size
        for b in range(start, len(self)):
            begin = b * self.global_batch + self.rank * local
            index = order[begin : min(begin + local, n)]
            x = self.images[index].float() / 255.0
            if self.augment:
                x = _augment(x, flips[index], shifts[index])
            yield (x - self.mean) / self.std, self.labels[index]


def _augment(x: torch.Tensor, flips: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Horizontal flip and a random crop of the zero-padded image (per sample, precomputed)."""
    x = torch.where(flips[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (_PAD, _PAD, _PAD, _PAD))
    size_h, size_w = x.shape[2], x.shape[3]
    rows = shifts[:, 0:1] + torch.arange(size_h)
    cols = shifts[:, 1:2] + torch.arange(size_w)
    batch = torch.arange(x.shape[0])[:, None, None]
    cropped = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return cropped.permute(0, 3, 1, 2).contiguous()


def build_data(config: Config, rank: int = 0, world_size: int = 1,
               device: torch.device = torch.device("cpu")) -> DataBundle:
    """Loaders for the configured data set; a missing path raises ConfigError naming data.path."""
    data = config.data
    if data.name == "imagenet":
        return build_imagenet(config, rank, world_size, device)
    if data.name == "fortunes":
        train_blocks, validation_blocks = fortunes_loaders(
            data.path, data.text, config.train.batch_size, config.seed, rank, world_size)
        return DataBundle(train=train_blocks, test=validation_blocks,
                          num_classes=BYTE_VOCABULARY, in_channels=1, byte_level=True)
    if data.loader == "fmnist":
        try:
            train = load_fashion_mnist(data.path, "train")
            test = load_fashion_mnist(data.path, "test")
        except FileNotFoundError as exc:
            raise ConfigError(f"config key 'data.path' = {data.path!r}: {exc}") from None
        except ValueError as exc:
            raise ConfigError(f"config key 'data.path' = {data.path!r}: {exc}") from None
        num_classes, in_channels = 10, 1
    else:
        s = data.synthetic
        # One draw, then a split: both parts share the class prototypes the seed defines.
        images, labels = synthetic_classification(
            s.train_size + s.test_size, s.num_classes, s.image_size, s.channels, config.seed
        )
        train = images[: s.train_size], labels[: s.train_size]
        test = images[s.train_size :], labels[s.train_size :]
        num_classes, in_channels = s.num_classes, s.channels
    train_images = train[0] if train[0].dim() == 4 else train[0].unsqueeze(1)
    pixels = train_images.float() / 255.0
    mean, std = pixels.mean(dim=(0, 2, 3), keepdim=True), pixels.std(dim=(0, 2, 3), keepdim=True)
    batch = config.train.batch_size
    if batch > len(train[1]):
        raise ConfigError(
            f"config key 'train.batch_size' = {batch}: larger than the training set ({len(train[1])})"
        )
    return DataBundle(
        train=TensorLoader(*train, batch, config.seed, True, data.augment, mean, std, rank, world_size),
        test=TensorLoader(*test, batch, config.seed, False, False, mean, std, rank, world_size),
        num_classes=num_classes,
        in_channels=in_channels,
    )


def _require(path: Path, what: str, data_path: str) -> Path:
    exists = path.is_dir() if what == "folder" else path.is_file()
    if not exists:
        raise ConfigError(f"config key 'data.path' = {data_path!r}: {what} {path} not found")
    return path


def build_imagenet(config: Config, rank: int, world_size: int, device: torch.device) -> DataBundle:
    """Train and test loaders for data.name=imagenet (data.loader ffcv or torchvision)."""
    data, batch = config.data, config.train.batch_size
    root = Path(data.path)
    if data.loader == "ffcv":
        from distsparse.data.ffcv_loader import beton_num_classes, ffcv_train_loader, ffcv_val_loader

        train_file = _require(root / "train.beton", "file", data.path)
        val_file = _require(root / "val.beton", "file", data.path)
        train = ffcv_train_loader(train_file, data.imagenet, batch, config.seed, world_size, device)
        test = ffcv_val_loader(val_file, data.imagenet, batch, rank, world_size, device)
        num_classes = beton_num_classes(train_file)
    else:
        from distsparse.data.imagefolder import ImageFolderLoader

        train_dir = _require(root / "train", "folder", data.path)
        val_dir = _require(root / "val", "folder", data.path)
        train = ImageFolderLoader(train_dir, data.imagenet, batch, config.seed, True, rank,
                                  world_size)
        test = ImageFolderLoader(val_dir, data.imagenet, batch, config.seed, False, rank,
                                 world_size)
        if test.dataset.classes != train.dataset.classes:
            raise DataError(f"{val_dir} and {train_dir} hold different class folders")
        num_classes = train.num_classes
    if len(train) == 0:
        raise ConfigError(
            f"config key 'train.batch_size' = {batch}: larger than this rank's share of the "
            f"training set in {data.path}"
        )
    return DataBundle(train=train, test=test, num_classes=num_classes, in_channels=3)
