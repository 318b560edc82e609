"""benchmarks/fisher_cost.py: one estimator step and the floor of any DR-FIM step, in quick mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_fisher_cost_floor_quick():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fisher_cost.py"), "--quick", "--reps", "1",
                          "--threads", "1", "--cases", "floor,natural_batch"],
                         capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    rec = json.loads(out.splitlines()[0])
    fl, sec = rec["floor_seconds"], rec["seconds"]
    assert set(fl) == {"pass", "noise", "stage3", "empirical", "variational"}
    assert all(v > 0 for v in fl.values())
    decoder = sec["decoder step (AdamW, head only)"]
    # the floor is what it says: a decoder step and two weight-gradient passes, plus one noise draw
    assert abs(fl["empirical"] - (decoder + 2 * fl["pass"])) < 2e-3
    assert abs(fl["variational"] - (fl["empirical"] + fl["noise"])) < 2e-3
    for k in ("empirical", "variational"):
        # the JSON rounds seconds to 4 decimals: quick-mode steps are ~10 ms, so compare relatively
        assert rec["floor_stage2_x_stage3_step"][k] == pytest.approx(fl[k] / fl["stage3"], rel=0.02)
    # ratios are taken against FisherTune's own stage-3 step, which is a row and not an estimator
    assert fl["stage3"] == sec["stage-3 step, FisherTune at delta_max = 15 % (AdamW)"]
    assert list(rec["stage2_step_x_stage3_step"]) == ["DR-FIM variational natural, batch"]
    ratio = rec["stage2_step_x_stage3_step"]["DR-FIM variational natural, batch"]
    assert ratio == pytest.approx((sec["DR-FIM variational natural, batch"] + decoder) / fl["stage3"], rel=0.02)
    assert "lower bound (floor)" in out
