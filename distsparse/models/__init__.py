"""Model registry: build networks by configuration name."""

from __future__ import annotations

from torch import nn

from distsparse.models.small_resnet import SmallResNet

__all__ = ["MODEL_NAMES", "SmallResNet", "build_model"]

MODEL_NAMES: tuple[str, ...] = ("mlp", "resnet18", "resnet50", "small_resnet")

_MLP_INPUT_SIZE = 28
_MLP_HIDDEN = 128


def _build_mlp(num_classes: int, in_channels: int) -> nn.Module:
    """Two-layer MLP for 28x28 inputs, used by fast unit tests."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * _MLP_INPUT_SIZE * _MLP_INPUT_SIZE, _MLP_HIDDEN),
        nn.ReLU(),
        nn.Linear(_MLP_HIDDEN, num_classes),
    )


def _build_torchvision_resnet(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """Untrained torchvision ResNet whose stem accepts ``in_channels`` channels."""
    from torchvision import models

    model = getattr(models, name)(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """Build the model registered under ``name`` (one of ``MODEL_NAMES``)."""
    if name == "mlp":
        return _build_mlp(num_classes, in_channels)
    if name in ("resnet18", "resnet50"):
        return _build_torchvision_resnet(name, num_classes, in_channels)
    if name == "small_resnet":
        return SmallResNet(num_classes=num_classes, in_channels=in_channels)
    raise ValueError(f"unknown model.name {name!r}; expected one of {', '.join(MODEL_NAMES)}")
