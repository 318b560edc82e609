import math

import pytest

from peft_fishertune.tuner import config as config_module
from peft_fishertune.tuner.schedule import SCHEDULES, active_fraction, fraction_at_step


@pytest.mark.parametrize("kind", ["linear", "exp", "cosine"])
def test_monotone_and_endpoints(kind):
    values = [active_fraction(i / 100, 0.01, 0.15, kind) for i in range(101)]
    assert values[0] == 0.01 and values[-1] == 0.15
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[50] < 0.15 and values[50] > 0.01


def test_formulas():
    assert active_fraction(0.5, 0.01, 0.15, "linear") == pytest.approx(0.08)
    assert active_fraction(0.5, 0.01, 0.15, "exp") == pytest.approx(math.sqrt(0.01 * 0.15))
    assert active_fraction(0.5, 0.01, 0.15, "cosine") == pytest.approx(0.08)
    assert active_fraction(0.25, 0.01, 0.15, "cosine") == pytest.approx(0.01 + 0.14 * (1 - math.cos(math.pi / 4)) / 2)
    assert active_fraction(0.3, 0.05, 0.05, "exp") == 0.05


def test_step_form():
    kw = dict(stage3_start=100, stage3_steps=11, delta_min=0.01, delta_max=0.15, kind="linear")
    assert fraction_at_step(0, **kw) == 0.01
    assert fraction_at_step(100, **kw) == 0.01
    assert fraction_at_step(105, **kw) == pytest.approx(0.08)
    assert fraction_at_step(110, **kw) == 0.15 and fraction_at_step(10_000, **kw) == 0.15
    seq = [fraction_at_step(s, 100, 11, 0.01, 0.15, "exp") for s in range(90, 120)]
    assert all(b >= a for a, b in zip(seq, seq[1:]))
    assert fraction_at_step(7, 7, 1, 0.01, 0.15) == 0.15


@pytest.mark.parametrize("call, match", [
    (lambda: active_fraction(1.5, 0.01, 0.15), "t=1.5"),
    (lambda: active_fraction(0.5, 0.2, 0.15), "delta_min=0.2 is larger than delta_max=0.15"),
    (lambda: active_fraction(0.5, 0.0, 0.15), "delta_min=0.0"),
    (lambda: active_fraction(0.5, 0.01, 1.5), "delta_max=1.5"),
    (lambda: active_fraction(0.5, 0.01, 0.15, "step"), "kind='step'"),
    (lambda: active_fraction(float("nan"), 0.01, 0.15), "t=nan"),
    (lambda: fraction_at_step(5, 0, 0, 0.01, 0.15), "stage3_steps=0"),
    (lambda: fraction_at_step(-1, 0, 5, 0.01, 0.15), "step=-1"),
    (lambda: fraction_at_step(1.5, 0, 5, 0.01, 0.15), "step=1.5"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_one_list_of_schedule_names():
    """FisherTuneConfig.schedule accepts exactly the schedules active_fraction computes."""
    assert config_module.SCHEDULES is SCHEDULES
    for kind in SCHEDULES:
        assert config_module.FisherTuneConfig(target_modules=["a"], schedule=kind).schedule == kind
        assert 0.01 <= active_fraction(0.5, 0.01, 0.15, kind) <= 0.15
