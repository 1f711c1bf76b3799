"""A user's own model: `model.name=pkg.module:factory`, any importable callable.

Contract: the factory is called as ``factory(**model.kwargs)``, plus ``num_classes=`` and
``in_channels=`` (from the data) for each of those names that its signature lists as a parameter;
it returns a ``torch.nn.Module``. The module is imported from ``sys.path`` and the current
directory (as ``python -m`` would).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Callable

from torch import nn

from distsparse.errors import ConfigError

__all__ = [
    "DATA_ARGUMENTS", "build_user_model", "check_factory", "is_factory_path", "resolve_factory",
]

DATA_ARGUMENTS = ("num_classes", "in_channels")
"""Arguments a factory receives from the data when its signature names them."""


def is_factory_path(name: str) -> bool:
    """Whether `name` has the form `pkg.module:attribute` (dotted names on both sides)."""
    module, colon, attribute = name.partition(":")
    return bool(colon) and all(
        part.isidentifier() for side in (module, attribute) for part in side.split("."))


def _fail(name: str, reason: str) -> ConfigError:
    return ConfigError(f"config key 'model.name' = {name!r}: {reason}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def resolve_factory(name: str) -> Callable[..., Any]:
    """Import `pkg.module:attribute` and return the callable; ConfigError names model.name."""
    module_name, _, attribute = name.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # missing, or the user's module raised while it was imported
        missing = getattr(exc, "name", None)
        if isinstance(exc, ModuleNotFoundError) and missing is not None and (
                module_name == missing or module_name.startswith(missing + ".")):
            raise _fail(name, f"no module named {missing!r}") from exc
        raise _fail(name, f"importing {module_name!r} failed: {_first_line(exc)}") from exc
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise _fail(name, f"{getattr(target, '__name__', module_name)!r} has no attribute "
                        f"{part!r}")
        target = getattr(target, part)
    if not callable(target):
        raise _fail(name, f"{attribute!r} is not callable ({type(target).__name__})")
    return target


def _data_parameters(factory: Callable[..., Any]) -> tuple[inspect.Signature | None, list[str]]:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have no signature: call with model.kwargs only
        return None, []
    named = [p for p in DATA_ARGUMENTS if p in signature.parameters
             and signature.parameters[p].kind is not inspect.Parameter.VAR_KEYWORD]
    return signature, named


def check_factory(name: str, kwargs: dict[str, Any]) -> None:
    """Raise ConfigError unless `name` imports and its signature accepts `model.kwargs`."""
    signature, named = _data_parameters(resolve_factory(name))
    for key in named:
        if key in kwargs:
            raise ConfigError(f"config key 'model.kwargs.{key}': {name} receives {key} from the "
                              "data; remove it")
    if signature is None:
        return
    try:
        signature.bind(**kwargs, **dict.fromkeys(named, 0))
    except TypeError as exc:
        raise ConfigError(f"config key 'model.kwargs' = {kwargs!r}: {name} does not accept them "
                          f"({exc}; its parameters: {', '.join(signature.parameters)})") from None


def build_user_model(name: str, num_classes: int, in_channels: int,
                     kwargs: dict[str, Any]) -> nn.Module:
    """Call the factory `name` by the module's contract; ConfigError names model.name."""
    factory = resolve_factory(name)
    data = {"num_classes": num_classes, "in_channels": in_channels}
    _, named = _data_parameters(factory)
    try:
        model = factory(**kwargs, **{key: data[key] for key in named})
    except Exception as exc:  # any failure of user code is the config's to report
        raise _fail(name, f"the factory raised {_first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise _fail(name, f"the factory returned {type(model).__name__}, expected a torch.nn.Module")
    return model
