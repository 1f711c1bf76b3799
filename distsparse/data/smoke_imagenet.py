"""A small ImageNet-format data set (train/ and val/ class folders of RGB JPEGs) for smoke runs.

Built from Fashion-MNIST: each 28 px garment is painted in its class's hue (jittered, random
saturation and brightness) on a dark background of random color, and resized to a random size and
aspect ratio, so the FFCV and torchvision pipelines see variable-size JPEGs as with ImageNet. The
class shows in the shape and in the color: a small ResNet learns it in a few hundred steps, and
a pipeline that pairs images with the wrong labels, or whose pixel statistics differ between
training and test (channel order, normalization), stays near chance. A pure function of the seed.
"""
from __future__ import annotations

import colorsys
import re
from pathlib import Path

import numpy as np
from PIL import Image

from distsparse.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_mnist
from distsparse.errors import DataError

__all__ = ["make_smoke_imagenet"]

_JPEG_QUALITY = 90
_HUE_JITTER = 0.03
"""Standard deviation of a garment's hue around its class's (hues of 10 classes are 0.1 apart)."""
_BACKGROUND_VALUE = 0.35
"""Brightest background (HSV value); garments are at least twice as bright."""
_ASPECT = (3 / 4, 4 / 3)
"""Range of width / height (the aspect ratios random resized crop draws from)."""


def _folder_name(label: int) -> str:
    return f"{label:02d}_" + re.sub(r"[^a-z0-9]+", "_", FASHION_MNIST_CLASSES[label].lower())


def _rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value)) * 255


def _colorized(image: np.ndarray, label: int, rng: np.random.Generator,
               sides: tuple[int, int]) -> Image.Image:
    gray = image.astype(np.float32)[..., None] / 255.0
    hue = label / len(FASHION_MNIST_CLASSES) + rng.normal(0.0, _HUE_JITTER)
    foreground = _rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(2 * _BACKGROUND_VALUE, 1.0))
    background = _rgb(rng.uniform(), rng.uniform(), rng.uniform(0.0, _BACKGROUND_VALUE))
    rgb = gray * foreground + (1.0 - gray) * background
    width = int(rng.integers(sides[0], sides[1] + 1))
    height = int(round(width / np.exp(rng.uniform(*np.log(_ASPECT)))))
    picture = Image.fromarray(rgb.round().astype(np.uint8), mode="RGB")
    return picture.resize((width, height), Image.Resampling.BICUBIC)


def make_smoke_imagenet(out: Path, train_per_class: int = 100, val_per_class: int = 30,
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
                _colorized(images[index].numpy(), label, rng, sides).save(
                    folder / f"{split}_{label}_{number:04d}.jpg", quality=_JPEG_QUALITY)
                written += 1
    return written
