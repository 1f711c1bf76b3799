"""torchvision's classification models by name, untrained, with the stem fitted to the data."""

from __future__ import annotations

from typing import Any

from torch import nn

from distsparse.errors import ConfigError

__all__ = ["RESERVED_KWARGS", "TORCHVISION_PREFIX", "build_torchvision", "check_torchvision_name"]

TORCHVISION_PREFIX = "torchvision:"
"""`model.name=torchvision:<name>` builds torchvision.models.get_model(<name>)."""

RESERVED_KWARGS = ("weights", "num_classes")
"""get_model arguments distsparse sets itself: untrained, classes from the data."""

_RGB = 3


def _classification_models() -> list[str]:
    from torchvision import models

    return models.list_models(module=models)


def check_torchvision_name(name: str, kwargs: dict[str, Any]) -> None:
    """Raise ConfigError unless `name` is one of torchvision's classification models."""
    model = name.removeprefix(TORCHVISION_PREFIX)
    if model not in _classification_models():
        raise ConfigError(
            f"config key 'model.name' = {name!r}: torchvision has no classification model "
            f"{model!r}; see torchvision.models.list_models(module=torchvision.models)")
    for key in RESERVED_KWARGS:
        if key in kwargs:
            raise ConfigError(
                f"config key 'model.kwargs.{key}': set by distsparse for torchvision models "
                "(weights=None, num_classes from the data); remove it")


def build_torchvision(name: str, num_classes: int, in_channels: int,
                      kwargs: dict[str, Any]) -> nn.Module:
    """Untrained torchvision model `name` (torchvision.models.get_model, weights=None).

    With `in_channels` != 3 the first Conv2d (the stem) is replaced by one taking `in_channels`
    channels, initialized kaiming-normal (fan_out, ReLU) as torchvision initializes ResNet convs.
    """
    from torchvision import models

    model = models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != _RGB:
        _adapt_stem(model, name, in_channels)
    return model


def _adapt_stem(model: nn.Module, name: str, in_channels: int) -> None:
    """Replace the first Conv2d, which takes RGB, by one taking `in_channels` channels."""
    found = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if found is None or found[1].in_channels != _RGB or found[1].groups != 1:
        raise ConfigError(
            f"config key 'model.name' = '{TORCHVISION_PREFIX}{name}': its first layer is not a "
            f"Conv2d over 3 channels that could take the data's {in_channels}; use 3-channel data")
    path, stem = found
    parent, _, attribute = path.rpartition(".")
    conv = nn.Conv2d(in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding,
                     stem.dilation, bias=stem.bias is not None, padding_mode=stem.padding_mode)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    setattr(model.get_submodule(parent), attribute, conv)
