"""The Fisher engine's error type and argument checks (the bottom layer: imports nothing of the package)."""

from __future__ import annotations

import math


class FisherInputError(ValueError):
    """Bad input to an estimator (empty data, no loss, non-finite gradients, a batch that cannot be split, ...)."""


def finite_float(name: str, value, *, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise FisherInputError(f"{name}={value!r}; expected a finite{' positive' if positive else ''} number")
    return float(value)
