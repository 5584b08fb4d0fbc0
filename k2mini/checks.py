"""Argument checks shared by the library: an int that is not a bool, a finite real, a bool.

Python's `bool` is a subclass of `int`, so `isinstance(True, int)` holds and `True` would pass as a
layer count or a step count; every check here refuses it. Errors name the argument (and `where` it was
given, e.g. a config field or a function) and the offending value: TypeError for the wrong type,
ValueError for a value out of range. The wrong-type error is an `ArgumentTypeError`, a TypeError that is
also a ValueError, so callers whose contract has always been "a bad value is a ValueError" (a config.json
field, a training setting, an environment variable) keep it while moving to these checks.
"""

from __future__ import annotations

import math

__all__ = ["ArgumentTypeError", "check_int", "check_real", "check_bool"]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type: a TypeError, and a ValueError for callers that catch bad values as such."""


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def _bounds(low, high, low_open: bool = False) -> str:
    """The allowed range in words, e.g. '>= 1', '> 0', 'in [0, 1]'."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}]"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    return f"<= {high}"


def check_int(value, name: str, *, low=None, high=None, where: str = "") -> int:
    """`value` if it is an int (not a bool) with low <= value <= high (each bound optional)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{_prefix(where)}{name} must be an int, got {type(value).__name__} {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{_prefix(where)}{name} must be {_bounds(low, high)}, got {value!r}")
    return value


def check_real(
    value, name: str, *, low=None, high=None, low_open: bool = False, finite: bool = True, where: str = ""
) -> float:
    """`value` as a float if it is an int or float (not a bool) in range.

    The range is low <= value <= high (low < value with `low_open`), each bound optional; NaN is always
    refused, and +-inf too unless `finite=False`.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{_prefix(where)}{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{_prefix(where)}{name} must be {'finite' if finite else 'a number'}, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        raise ValueError(f"{_prefix(where)}{name} must be {_bounds(low, high, low_open)}, got {value!r}")
    return value


def check_bool(value, name: str, *, where: str = "") -> bool:
    """`value` if it is a bool (not 0/1 or a truthy object)."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{_prefix(where)}{name} must be a bool, got {type(value).__name__} {value!r}")
    return value
