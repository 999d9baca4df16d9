"""Argument checks shared by the public functions: one place, one message style.

Every message names the argument, the value it got and what is allowed, so that a reader who
mistypes a hyperparameter in a notebook sees at once which one and why. Each raises
:class:`~mmtl_lib.errors.ConfigError`.
"""

from __future__ import annotations

import math
import numbers

from .errors import ConfigError


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name} = {value!r} is not allowed: it must be an integer >= 1")
    return int(value)


def positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ConfigError(f"{name} = {value!r} is not allowed: it must be a finite number > 0")
    return float(value)


def one_of(name: str, value, allowed) -> str:
    if value not in allowed:
        raise ConfigError(f"{name} = {value!r} is not allowed: it must be one of {sorted(allowed)}")
    return value


def known_names(name: str, names, params) -> list[str]:
    names = list(names)
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ConfigError(
            f"{name} names parameters that are not in params: {unknown}; "
            f"the parameters are {list(params)}"
        )
    if not names:
        raise ConfigError(f"{name} is empty: name at least one parameter to adapt")
    return names


def optional_positive_float(name: str, value) -> float | None:
    return None if value is None else positive_float(name, value)


def optional_positive_int(name: str, value) -> int | None:
    return None if value is None else positive_int(name, value)


def non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConfigError(f"{name} = {value!r} is not allowed: it must be an integer >= 0")
    return int(value)


def int_in_range(name: str, value, low: int, high: int | None = None) -> int:
    """An integer ``low <= value <= high`` (no upper bound when ``high`` is ``None``)."""
    bounded = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not bounded or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
        raise ConfigError(f"{name} = {value!r} is not allowed: it must be {allowed}")
    return int(value)
