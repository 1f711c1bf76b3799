"""Datasets: Fashion-MNIST idx reader, synthetic test data; ImageNet-format data (FFCV or
torchvision) lives in data.imagenet, data.ffcv_loader, data.imagefolder and data.beton."""

from distsparse.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    load_fashion_mnist,
)
from distsparse.data.synthetic import synthetic_classification

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "load_fashion_mnist",
    "synthetic_classification",
]
