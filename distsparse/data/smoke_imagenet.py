"""A small ImageNet-format data set (train/ and val/ class folders of RGB JPEGs) for smoke runs.

Built from Fashion-MNIST: each 28 px image is colorized (a random foreground and background
color) and resized to a random size and aspect ratio, so the FFCV and torchvision pipelines see
variable-size JPEGs as with ImageNet. A pure function of the seed.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from distsparse.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_mnist
from distsparse.errors import DataError

__all__ = ["make_smoke_imagenet"]

_JPEG_QUALITY = 90


def _folder_name(label: int) -> str:
    return f"{label:02d}_" + re.sub(r"[^a-z0-9]+", "_", FASHION_MNIST_CLASSES[label].lower())


def _colorized(image: np.ndarray, rng: np.random.Generator, sides: tuple[int, int]) -> Image.Image:
    gray = image.astype(np.float32)[..., None] / 255.0
    foreground, background = rng.integers(0, 256, size=(2, 3))
    rgb = gray * foreground + (1.0 - gray) * background
    width, height = rng.integers(sides[0], sides[1] + 1, size=2)
    picture = Image.fromarray(rgb.round().astype(np.uint8), mode="RGB")
    return picture.resize((int(width), int(height)), Image.Resampling.BICUBIC)


def make_smoke_imagenet(out: Path, train_per_class: int = 32, val_per_class: int = 10,
                        seed: int = 0, source: str = FASHION_MNIST_DIR,
                        sides: tuple[int, int] = (40, 128)) -> int:
    """Write out/train and out/val (10 class folders each, image sides drawn from `sides`).

    Returns the number of images written.
    """
    if out.exists() and any(out.iterdir()):
        raise DataError(f"output folder {out} already exists and is not empty")
    try:
        train_images, train_labels = load_fashion_mnist(source, "train")
        val_images, val_labels = load_fashion_mnist(source, "test")
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(str(exc)) from None
    rng = np.random.default_rng(seed)
    written = 0
    for split, images, labels, per_class in (("train", train_images, train_labels, train_per_class),
                                             ("val", val_images, val_labels, val_per_class)):
        labels = labels.numpy()
        for label in range(len(FASHION_MNIST_CLASSES)):
            folder = out / split / _folder_name(label)
            folder.mkdir(parents=True)
            chosen = rng.permutation(np.flatnonzero(labels == label))[:per_class]
            for number, index in enumerate(sorted(chosen)):
                _colorized(images[index].numpy(), rng, sides).save(
                    folder / f"{split}_{label}_{number:04d}.jpg", quality=_JPEG_QUALITY)
                written += 1
    return written
