"""Active-fraction schedules of stage 3 (METHOD.md, "Selection and schedule").

δ(t) for t ∈ [0, 1] through stage 3:

* linear: δ_min + (δ_max − δ_min)·t
* exp (default): δ_min·(δ_max/δ_min)^t
* cosine: δ_min + (δ_max − δ_min)·(1 − cos πt)/2

All three are non-decreasing and equal δ_min at t = 0 and δ_max at t = 1.
"""

from __future__ import annotations

import math
from typing import Optional

from .checks import check_fractions, finite_number

SCHEDULES = ("linear", "exp", "cosine")  # the one list of schedule names (FisherTuneConfig.schedule reads it)

# The default δ(t) update interval makes at most about this many updates in a stage 3 (`update_interval`).
AUTO_UPDATES = 1000


def active_fraction(t: float, delta_min: float, delta_max: float, kind: str = "exp") -> float:
    """Fraction of the candidate elements active at progress `t` ∈ [0, 1] of stage 3."""
    t = finite_number("t", t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t={t!r}; expected progress in [0, 1]")
    lo, hi = check_fractions(delta_min, delta_max)
    if kind == "linear":
        value = lo + (hi - lo) * t
    elif kind == "exp":
        value = lo * (hi / lo) ** t
    elif kind == "cosine":
        value = lo + (hi - lo) * (1.0 - math.cos(math.pi * t)) / 2.0
    else:
        raise ValueError(f"kind={kind!r}; expected one of {list(SCHEDULES)}")
    if t == 0.0:
        return lo
    if t == 1.0:
        return hi
    return min(max(value, lo), hi)  # guard rounding at the ends


def fraction_at_step(
    step: int, stage3_start: int, stage3_steps: int, delta_min: float, delta_max: float, kind: str = "exp"
) -> float:
    """δ at global training `step`: δ_min before/at `stage3_start`, δ_max from the last stage-3 step on.

    t = (step − stage3_start)/(stage3_steps − 1), clipped to [0, 1], so the first stage-3 step
    trains δ_min and the last trains δ_max (with `stage3_steps == 1`, that one step uses δ_max).
    """
    for name, value in (("step", step), ("stage3_start", stage3_start), ("stage3_steps", stage3_steps)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}={value!r}; expected an integer")
    if stage3_start < 0:
        raise ValueError(f"stage3_start={stage3_start!r}; expected an integer >= 0")
    if stage3_steps < 1:
        raise ValueError(f"stage3_steps={stage3_steps!r}; expected an integer >= 1")
    if step < 0:
        raise ValueError(f"step={step!r}; expected an integer >= 0")
    if stage3_steps == 1:
        t = 1.0 if step >= stage3_start else 0.0
    else:
        t = min(max((step - stage3_start) / (stage3_steps - 1), 0.0), 1.0)
    return active_fraction(t, delta_min, delta_max, kind)


def update_interval(tune_steps: int, requested: Optional[int] = None) -> int:
    """How many tuning steps apart δ(t) is recomputed: `requested` (an integer >= 1), or by default (None)
    max(1, tune_steps // AUTO_UPDATES): every step up to 1,999 tuning steps, every 28 at the paper's 28,000. One
    update rescans every candidate's rank (26 ms at DINOv2-B size on 2 CPU cores; on a GPU it reads the device),
    so at every step it costs about 1 % of a 28k-step run, while δ(t) moves by 0.3 % of itself over 28 steps of
    the exp schedule. The trainer also recomputes δ(t) on the last tuning step, so a run ends at δ_max whatever
    the interval."""
    if requested is None:
        return max(1, int(tune_steps) // AUTO_UPDATES)
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ValueError(f"selection_update_steps={requested!r}; expected an integer >= 1, or None for the default "
                         f"(every max(1, tuning steps // {AUTO_UPDATES}) steps)")
    return requested
