"""Model registry: built-in networks, torchvision's classification models, a user's factory.

`model.name` is a built-in name (``MODEL_NAMES``), ``torchvision:<name>`` (torchvision.models
.get_model, untrained) or ``pkg.module:factory`` (`distsparse.models.user` states the contract).
Of the built-ins only the transformers take `model.kwargs`: gpt (`distsparse.models.gpt`, a
byte-level language model) and vit (`distsparse.models.vit`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from distsparse.errors import ConfigError
from distsparse.models.gpt import GPT, build_gpt, check_gpt_kwargs
from distsparse.models.small_resnet import SmallResNet
from distsparse.models.torchvision_models import (
    TORCHVISION_PREFIX,
    build_torchvision,
    check_torchvision_name,
)
from distsparse.models.user import build_user_model, check_factory, is_factory_path
from distsparse.models.vit import build_vit, check_vit_kwargs

__all__ = ["GPT", "LANGUAGE_MODELS", "MODEL_NAMES", "SmallResNet", "build_model", "check_model"]

MODEL_NAMES: tuple[str, ...] = ("gpt", "mlp", "resnet18", "resnet50", "small_resnet", "vit")

LANGUAGE_MODELS: tuple[str, ...] = ("gpt",)
"""Built-in models of token sequences (a text data set); the others take images."""

_KWARGS_CHECKS = {"gpt": check_gpt_kwargs, "vit": check_vit_kwargs}

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


def check_model(name: str, kwargs: Mapping[str, Any]) -> None:
    """Raise ConfigError naming model.name or model.kwargs unless `build_model` can be called.

    A factory is imported here, so a bad one stops before anything is written.
    """
    if name in _KWARGS_CHECKS:
        _KWARGS_CHECKS[name](kwargs)
    elif name in MODEL_NAMES:
        if kwargs:
            raise ConfigError(
                f"config key 'model.kwargs' = {dict(kwargs)!r}: the built-in model {name} takes "
                "none (they go to gpt, vit, a torchvision:<name> model or a pkg.module:factory)")
    elif name.startswith(TORCHVISION_PREFIX):
        check_torchvision_name(name, dict(kwargs))
    elif is_factory_path(name):
        check_factory(name, dict(kwargs))
    else:
        raise ConfigError(
            f"config key 'model.name' = {name!r}: expected one of {', '.join(MODEL_NAMES)}, "
            "torchvision:<name> or an importable pkg.module:factory")


def build_model(name: str, num_classes: int, in_channels: int,
                kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build model `name` for `num_classes` classes (a language model's vocabulary) and
    `in_channels` input channels.

    `kwargs` (model.kwargs) go to gpt, vit, a torchvision model or a factory; checked by
    `check_model`.
    """
    kwargs = dict(kwargs or {})
    check_model(name, kwargs)
    if name == "mlp":
        return _build_mlp(num_classes, in_channels)
    if name == "gpt":
        return build_gpt(num_classes, kwargs)
    if name == "vit":
        return build_vit(num_classes, in_channels, kwargs)
    if name in ("resnet18", "resnet50"):
        return build_torchvision(name, num_classes, in_channels, {})
    if name == "small_resnet":
        return SmallResNet(num_classes=num_classes, in_channels=in_channels)
    if name.startswith(TORCHVISION_PREFIX):
        return build_torchvision(name.removeprefix(TORCHVISION_PREFIX), num_classes, in_channels,
                                 kwargs)
    return build_user_model(name, num_classes, in_channels, kwargs)
