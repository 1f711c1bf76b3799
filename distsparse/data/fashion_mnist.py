"""Reader for the Fashion-MNIST idx files (plain or gzipped)."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from distsparse.config import FASHION_MNIST_DIR

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "load_fashion_mnist"]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IMAGE_MAGIC = 2051
_LABEL_MAGIC = 2049
_IMAGE_SIZE = 28
_HINT = "set data.path to the directory holding the Fashion-MNIST idx files"


def _find_file(root: Path, name: str) -> Path:
    """Return ``root/name`` or ``root/name.gz``, whichever exists."""
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file not found: {root / name}.gz (or {root / name}); {_HINT}"
    )


def _read_bytes(path: Path) -> bytes:
    """Read a file, decompressing it when its name ends in ``.gz``."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: corrupt gzip stream ({exc})") from exc


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte idx file with the given magic and number of dims."""
    data = _read_bytes(path)
    header_size = 4 * (1 + ndim)
    if len(data) < header_size:
        raise ValueError(
            f"{path}: truncated header ({len(data)} bytes, expected at least {header_size})"
        )
    (found_magic,) = struct.unpack_from(">I", data, 0)
    if found_magic != magic:
        raise ValueError(f"{path}: bad magic number {found_magic}, expected {magic}")
    dims = struct.unpack_from(f">{ndim}I", data, 4)
    expected = header_size + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise ValueError(
            f"{path}: size {len(data)} bytes does not match dims {tuple(dims)} "
            f"(expected {expected} bytes; file truncated or corrupt)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)


def load_fashion_mnist(root: str | os.PathLike, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a Fashion-MNIST split as uint8 images [N, 28, 28] and int64 labels [N]."""
    if split not in _SPLIT_PREFIX:
        raise ValueError(
            f"unknown Fashion-MNIST split {split!r}; expected one of {', '.join(_SPLIT_PREFIX)}"
        )
    directory = Path(root)
    if not directory.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST directory not found: {directory}; {_HINT}")
    prefix = _SPLIT_PREFIX[split]
    image_path = _find_file(directory, f"{prefix}-images-idx3-ubyte")
    label_path = _find_file(directory, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(image_path, _IMAGE_MAGIC, 3)
    labels = _read_idx(label_path, _LABEL_MAGIC, 1)
    if images.shape[1:] != (_IMAGE_SIZE, _IMAGE_SIZE):
        raise ValueError(
            f"{image_path}: image dims {images.shape[1:]} are not "
            f"({_IMAGE_SIZE}, {_IMAGE_SIZE})"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{image_path} holds {images.shape[0]} images but "
            f"{label_path} holds {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(
            f"{label_path}: label {int(labels.max())} out of range "
            f"0..{len(FASHION_MNIST_CLASSES) - 1}"
        )
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
