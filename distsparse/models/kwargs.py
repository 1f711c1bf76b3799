"""`model.kwargs` of the built-in models that take them: defaults, names and value checks."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from distsparse.errors import ConfigError

__all__ = ["merged_kwargs"]


def merged_kwargs(model: str, kwargs: Mapping[str, Any], defaults: Mapping[str, Any],
                  integers: Iterable[str]) -> dict[str, Any]:
    """`kwargs` over `defaults`: no unknown key, `integers` >= 1, `dropout` in [0, 1).

    ConfigError names `model.kwargs.<key>`; checks between keys stay with the model.
    """
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ConfigError(f"config key 'model.kwargs.{unknown[0]}': model {model} takes "
                          f"{', '.join(defaults)}")
    merged = {**defaults, **kwargs}
    for key in integers:
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"config key 'model.kwargs.{key}' = {value!r}: expected an "
                              "integer >= 1")
    dropout = merged["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"config key 'model.kwargs.dropout' = {dropout!r}: expected a value in "
                          "[0, 1)")
    return merged
