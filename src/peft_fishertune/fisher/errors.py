"""The Fisher engine's error type and argument checks (the bottom layer: imports only the package's leaf checks)."""

from __future__ import annotations

from .._checks import finite_number


class FisherInputError(ValueError):
    """Bad input to an estimator (empty data, no loss, non-finite gradients, a batch that cannot be split, ...)."""


def finite_float(name: str, value, *, positive: bool = False, low: float | None = None) -> float:
    """The package's finite-number check (`peft_fishertune._checks`), raising the engine's error type."""
    try:
        return finite_number(name, value, low=0.0 if positive else low, low_open=positive)
    except ValueError as e:
        raise FisherInputError(str(e)) from None
