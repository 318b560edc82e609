"""Argument checks shared across the package, with one message shape: `<name>=<value>; expected <what>`.

    lr = finite_number("PretrainConfig.lr", lr, low=0)                     # a float, or ValueError
    ratio = finite_number("mask_ratio", r, low=0, high=1, low_open=True)   # in (0, 1]
    steps = integer("PretrainConfig.steps", steps, low=1)                  # an int, or ValueError

`bool` is refused where a number is expected (`True` is an `int` to Python, never a learning rate), and NaN / inf are
refused, because either would train without an error and give a wrong result.
"""

from __future__ import annotations

import math
import numbers


def _bounds(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def _within(v, low, high, low_open: bool, high_open: bool) -> bool:
    if low is not None and not (v > low if low_open else v >= low):
        return False
    return high is None or (v < high if high_open else v <= high)


def finite_number(
    name: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False,
    high_open: bool = False,
) -> float:
    """`value` as a float: a real number (not a bool), finite, within [low, high] (either end open or absent).

    Raises ValueError naming `name`, the value and what was expected."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not _within(value, low, high, low_open, high_open):
        raise ValueError(f"{name}={value!r}; expected a finite number{_bounds(low, high, low_open, high_open)}")
    return float(value)


def integer(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int: an integer (not a bool, not a float such as 2.0) within [low, high]."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or not _within(value, low, high, False, False):
        raise ValueError(f"{name}={value!r}; expected an integer{_bounds(low, high, False, False)}")
    return int(value)


__all__ = ["finite_number", "integer"]
