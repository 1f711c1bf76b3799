"""Tests for the Fashion-MNIST idx reader and the synthetic dataset."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from distsparse.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    load_fashion_mnist,
    synthetic_classification,
)


def _idx_bytes(magic: int, array: np.ndarray) -> bytes:
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(path: Path, payload: bytes, gz: bool) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)
    return path


def _make_split(
    root: Path, prefix: str, n_images: int, n_labels: int, gz: bool, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n_images, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n_labels,), dtype=np.uint8)
    _write(root / f"{prefix}-images-idx3-ubyte", _idx_bytes(2051, images), gz)
    _write(root / f"{prefix}-labels-idx1-ubyte", _idx_bytes(2049, labels), gz)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(("split", "prefix"), [("train", "train"), ("test", "t10k")])
def test_round_trip(tmp_path: Path, gz: bool, split: str, prefix: str) -> None:
    images, labels = _make_split(tmp_path, prefix, 7, 7, gz)
    x, y = load_fashion_mnist(tmp_path, split)
    assert x.dtype == torch.uint8 and x.shape == (7, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (7,)
    assert np.array_equal(x.numpy(), images)
    assert np.array_equal(y.numpy(), labels.astype(np.int64))
    assert x.numpy().flags.writeable


def test_truncated_file(tmp_path: Path) -> None:
    _make_split(tmp_path, "train", 5, 5, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path, "train")


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    _make_split(tmp_path, "train", 5, 5, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz"):
        load_fashion_mnist(tmp_path, "train")


def test_truncated_header(tmp_path: Path) -> None:
    _make_split(tmp_path, "t10k", 3, 3, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.*truncated header"):
        load_fashion_mnist(tmp_path, "test")


def test_wrong_magic(tmp_path: Path) -> None:
    _make_split(tmp_path, "train", 4, 4, gz=True)
    labels = np.zeros(4, dtype=np.uint8)
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(2051, labels), gz=True)
    with pytest.raises(ValueError, match="magic number 2051, expected 2049"):
        load_fashion_mnist(tmp_path, "train")


def test_wrong_image_dims(tmp_path: Path) -> None:
    _make_split(tmp_path, "train", 2, 2, gz=False)
    images = np.zeros((2, 32, 32), dtype=np.uint8)
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(2051, images), gz=False)
    with pytest.raises(ValueError, match=r"image dims \(32, 32\)"):
        load_fashion_mnist(tmp_path, "train")


def test_count_mismatch(tmp_path: Path) -> None:
    _make_split(tmp_path, "train", 6, 5, gz=False)
    with pytest.raises(ValueError, match="6 images but .* 5 labels"):
        load_fashion_mnist(tmp_path, "train")


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="set data.path") as info:
        load_fashion_mnist(missing, "train")
    assert str(missing) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    _make_split(tmp_path, "train", 2, 2, gz=True)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="set data.path") as info:
        load_fashion_mnist(tmp_path, "train")
    assert str(tmp_path / "train-labels-idx1-ubyte.gz") in str(info.value)


def test_bad_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'validation'.*train, test"):
        load_fashion_mnist(tmp_path, "validation")


@pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).is_dir(),
    reason=f"{FASHION_MNIST_DIR} absent (install the dataset-fashion-mnist package)",
)
@pytest.mark.parametrize(("split", "count"), [("train", 60000), ("test", 10000)])
def test_real_fashion_mnist(split: str, count: int) -> None:
    images, labels = load_fashion_mnist(FASHION_MNIST_DIR, split)
    assert images.shape == (count, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (count,) and labels.dtype == torch.int64
    per_class = torch.bincount(labels, minlength=len(FASHION_MNIST_CLASSES))
    assert per_class.tolist() == [count // 10] * 10


def test_synthetic_deterministic_and_seeded() -> None:
    first = synthetic_classification(64, 4, 12, 1, seed=3)
    second = synthetic_classification(64, 4, 12, 1, seed=3)
    other = synthetic_classification(64, 4, 12, 1, seed=4)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])


def test_synthetic_leaves_global_rng_untouched() -> None:
    before = torch.get_rng_state()
    synthetic_classification(32, 3, 8, 3, seed=0)
    assert torch.equal(torch.get_rng_state(), before)


def test_synthetic_balanced_labels_and_shapes() -> None:
    gray, gray_labels = synthetic_classification(100, 10, 28, 1, seed=0)
    rgb, rgb_labels = synthetic_classification(30, 3, 32, 3, seed=0)
    assert gray.shape == (100, 28, 28) and gray.dtype == torch.uint8
    assert rgb.shape == (30, 3, 32, 32) and rgb.dtype == torch.uint8
    assert gray_labels.dtype == torch.int64
    assert torch.bincount(gray_labels).tolist() == [10] * 10
    assert torch.bincount(rgb_labels).tolist() == [10] * 3
    assert not torch.equal(gray_labels, torch.arange(100) % 10)


def test_synthetic_is_learnable() -> None:
    images, labels = synthetic_classification(400, 4, 12, 1, seed=0)
    features = images.flatten(1).float() / 255.0
    centroids = torch.stack([features[labels == c].mean(0) for c in range(4)])
    predictions = torch.cdist(features, centroids).argmin(1)
    assert (predictions == labels).float().mean() > 0.9
