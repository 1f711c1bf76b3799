"""Deterministic synthetic image classification data for tests."""

from __future__ import annotations

import torch

__all__ = ["synthetic_classification"]

_NOISE_STD = 48.0


def synthetic_classification(
    num_samples: int, num_classes: int, image_size: int, channels: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return uint8 images ([N, H, W] if channels == 1 else [N, C, H, W]) and int64 labels."""
    for name, value in (
        ("num_samples", num_samples),
        ("num_classes", num_classes),
        ("image_size", image_size),
        ("channels", channels),
    ):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    generator = torch.Generator().manual_seed(seed)
    shape = (channels, image_size, image_size)
    prototypes = torch.randint(32, 224, (num_classes, *shape), generator=generator).float()
    labels = torch.arange(num_samples, dtype=torch.int64) % num_classes
    labels = labels[torch.randperm(num_samples, generator=generator)]
    noise = torch.randn((num_samples, *shape), generator=generator) * _NOISE_STD
    images = (prototypes[labels] + noise).round().clamp(0, 255).to(torch.uint8)
    if channels == 1:
        images = images.squeeze(1)
    return images, labels
