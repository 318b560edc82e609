"""The value checks the tuner shares: one place for the δ range, the scope names and finite numbers.

`FisherTuneConfig`, `select_parameters` / `set_active_fraction` and the stage-3 schedule all accept δ_min, δ_max
and a scope; each calls these, so the rule and its wording are the same everywhere. `where` prefixes the field
name in messages (e.g. ``"FisherTuneConfig."``).
"""

from __future__ import annotations

from .._checks import finite_number as _finite_number

SCOPES = ("global", "per_tensor")


def finite_number(name: str, value, where: str = "") -> float:
    """`value` as a float; a ValueError naming `where + name` unless it is a finite real number (not bool)."""
    return _finite_number(f"{where}{name}", value)


def check_choice(name: str, value, allowed, where: str = "") -> None:
    if not (value is None or isinstance(value, str)) or value not in allowed:
        raise ValueError(f"{where}{name}={value!r} is not allowed; expected one of {list(allowed)}")


def check_scope(scope, where: str = "") -> str:
    check_choice("scope", scope, SCOPES, where)
    return scope


def check_fractions(delta_min, delta_max, where: str = "") -> tuple[float, float]:
    """δ_min and δ_max: fractions in (0, 1] with δ_min <= δ_max."""
    lo = finite_number("delta_min", delta_min, where)
    hi = finite_number("delta_max", delta_max, where)
    if not 0.0 < lo <= 1.0:
        raise ValueError(f"{where}delta_min={delta_min!r} is out of range; expected a fraction in (0, 1]")
    if not 0.0 < hi <= 1.0:
        raise ValueError(f"{where}delta_max={delta_max!r} is out of range; expected a fraction in (0, 1]")
    if lo > hi:
        raise ValueError(
            f"{where}delta_min={delta_min!r} is larger than delta_max={delta_max!r}; expected delta_min <= delta_max"
        )
    return lo, hi
