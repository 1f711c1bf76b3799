"""A small torchvision `VisionTransformer` (Dosovitskiy et al., arXiv 2010.11929) for 28 px images.

`model.name=vit` with `model.kwargs`: image_size, patch_size, num_layers, num_heads, hidden_dim,
mlp_dim, dropout. The patch projection (`conv_proj`) takes the data's channels (1 for
Fashion-MNIST), initialized as torchvision initializes it.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from distsparse.errors import ConfigError
from distsparse.models.kwargs import merged_kwargs

__all__ = ["VIT_DEFAULTS", "build_vit", "check_vit_kwargs"]

VIT_DEFAULTS: dict[str, Any] = {"image_size": 28, "patch_size": 7, "num_layers": 4,
                                "num_heads": 4, "hidden_dim": 128, "mlp_dim": 256, "dropout": 0.0}
"""model.kwargs of `model.name=vit` and their defaults (16 patches of 7x7 px, 4 layers, 128 wide)."""

_INTEGERS = ("image_size", "patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim")


def check_vit_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """`model.kwargs` over `VIT_DEFAULTS`; ConfigError naming model.kwargs.<key> if invalid."""
    merged = merged_kwargs("vit", kwargs, VIT_DEFAULTS, _INTEGERS)
    if merged["image_size"] % merged["patch_size"]:
        raise ConfigError(f"config key 'model.kwargs.patch_size' = {merged['patch_size']}: "
                          f"expected a divisor of model.kwargs.image_size={merged['image_size']}")
    if merged["hidden_dim"] % merged["num_heads"]:
        raise ConfigError(f"config key 'model.kwargs.hidden_dim' = {merged['hidden_dim']}: "
                          f"expected a multiple of model.kwargs.num_heads={merged['num_heads']}")
    return merged


def build_vit(num_classes: int, in_channels: int, kwargs: Mapping[str, Any]) -> nn.Module:
    """torchvision's VisionTransformer of `model.kwargs` over `in_channels`-channel images."""
    from torchvision.models import VisionTransformer

    settings = check_vit_kwargs(kwargs)
    patch = settings["patch_size"]
    model = VisionTransformer(
        image_size=settings["image_size"], patch_size=patch, num_layers=settings["num_layers"],
        num_heads=settings["num_heads"], hidden_dim=settings["hidden_dim"],
        mlp_dim=settings["mlp_dim"], dropout=settings["dropout"],
        attention_dropout=settings["dropout"], num_classes=num_classes)
    stem = nn.Conv2d(in_channels, settings["hidden_dim"], kernel_size=patch, stride=patch)
    # torchvision's patchify-stem initialization, with this stem's fan-in.
    nn.init.trunc_normal_(stem.weight, std=math.sqrt(1 / (in_channels * patch * patch)))
    nn.init.zeros_(stem.bias)
    model.conv_proj = stem
    return model
