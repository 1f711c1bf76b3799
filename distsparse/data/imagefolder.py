"""The torchvision fallback for ImageNet-format data: ImageFolder, PIL decoding, a DataLoader.

The same augmentation as the FFCV pipelines (random resized crop at the epoch's resolution, flip,
normalization; test: center crop of crop_ratio of the shorter side at val_res). The order is the
embedded loaders' rule: one permutation per (seed, epoch), rank r takes the r-th contiguous slice
of every global batch, so 1 and N workers see the same samples. Each sample's crop and flip come
from its own seed (seed, epoch, index), so batches do not depend on the world size or the number
of DataLoader workers, and a resumed run skips whole batches without decoding them and continues
with the same pixels.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from distsparse.config import ImageNetConfig
from distsparse.data.imagenet import PIXEL_MEAN, PIXEL_STD, resolution_at
from distsparse.errors import ConfigError, DataError

__all__ = ["CenterSquare", "ImageFolderLoader"]


class CenterSquare:
    """The centered square of side int(ratio * shorter side): FFCV's CenterCropRGBImageDecoder crop."""

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio

    def __call__(self, image: Image.Image) -> Image.Image:
        side = int(self.ratio * min(image.width, image.height))
        top, left = (image.height - side) // 2, (image.width - side) // 2
        return image.crop((left, top, left + side, top + side))


class _SeededSamples(Dataset):
    """An ImageFolder whose sample `index` is augmented with draws seeded by (seed, epoch, index)."""

    def __init__(self, folder: ImageFolder, seed: int) -> None:
        self.folder, self.seed = folder, seed

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + index)
            return self.folder[index]


class ImageFolderLoader:
    """Batches of one ImageFolder split through torchvision transforms and a DataLoader."""

    mean, std = PIXEL_MEAN, PIXEL_STD

    def __init__(self, root: Path, config: ImageNetConfig, global_batch: int, seed: int,
                 train: bool, rank: int = 0, world_size: int = 1) -> None:
        if global_batch % world_size:
            raise ConfigError(
                f"config key 'train.batch_size' = {global_batch}: expected a multiple of the "
                f"world size {world_size}"
            )
        try:
            self.dataset = ImageFolder(str(root))
        except (FileNotFoundError, OSError) as exc:
            raise DataError(f"{root}: {str(exc).splitlines()[0]}") from None
        self.num_classes = len(self.dataset.classes)
        self.config, self.global_batch, self.seed, self.train = config, global_batch, seed, train
        self.rank, self.world_size = rank, world_size
        self.normalize = transforms.Normalize(PIXEL_MEAN.flatten().tolist(),
                                              PIXEL_STD.flatten().tolist())

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.global_batch if self.train else -(-n // self.global_batch)

    def _transform(self, epoch: int) -> transforms.Compose:
        if self.train:
            side = resolution_at(epoch, self.config)
            steps = [transforms.RandomResizedCrop(side), transforms.RandomHorizontalFlip()]
        else:
            side = self.config.val_res
            steps = [CenterSquare(self.config.crop_ratio), transforms.Resize((side, side))]
        return transforms.Compose([*steps, transforms.ToTensor(), self.normalize])

    def _index_batches(self, epoch: int, start: int) -> list[list[int]]:
        n = len(self.dataset)
        if self.train:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        local = self.global_batch // self.world_size
        chosen = []
        for b in range(start, len(self)):
            begin = b * self.global_batch + self.rank * local
            chosen.append(order[begin: min(begin + local, n)])
        return [batch for batch in chosen if batch]

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's part of global batches start, start+1, ... of `epoch`."""
        self.dataset.transform = self._transform(epoch)
        samples = _SeededSamples(self.dataset, self.seed * 1_000_003 + epoch)
        yield from DataLoader(samples, batch_sampler=self._index_batches(epoch, start),
                              num_workers=self.config.num_workers)
