"""benchmarks/adapter_cost.py at a tiny size: every method's worker runs, and the two floors (inputgrad,
densegrad) train what they say: inputgrad no block weight, densegrad every weight's gradient with only the head
updated."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_adapter_cost_floors_and_targets(tmp_path):
    out = tmp_path / "cost.jsonl"
    methods = "frozen,inputgrad,densegrad,full,lora,fishertune@0.05,fishertune@0.15,fishertune@0.05+dw+eagerT"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "adapter_cost.py"), "--hidden", "32", "--layers",
                           "2", "--heads", "2", "--image-size", "28", "--steps", "2", "--warmup", "1", "--threads", "1",
                           "--no-match-shira", "--methods", methods, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    res = data["results"]
    assert list(res) == methods.split(",")
    assert res["frozen"]["trainable_backbone"] == 0
    # inputgrad trains the patch projection's weight only (3 x 14 x 14 per output channel): backward runs through
    # every block, and no block weight gets a gradient
    assert res["inputgrad"]["trainable_backbone"] == 32 * 3 * 14 * 14
    assert res["densegrad"]["trainable_backbone"] == res["full"]["trainable_backbone"] > 0
    assert 0 < res["fishertune@0.05"]["trainable_backbone"] < res["fishertune@0.15"]["trainable_backbone"]
    # the suffixes change how a step is computed, not what: the same values trained, the same loss after the steps
    variant = res["fishertune@0.05+dw+eagerT"]
    assert variant["trainable_backbone"] == res["fishertune@0.05"]["trainable_backbone"]
    assert variant["loss"] == res["fishertune@0.05"]["loss"]
    for r in res.values():
        assert r["step_s_median"] > 0 and len(r["step_s_all"]) == 2
    ratios = data["ratios"]
    for key in ("step_ft5_over_lora (<=1.15)", "step_ft15_over_full (<=0.9)", "floor_inputgrad_over_lora",
                "floor_densegrad_over_full"):
        assert ratios[key] is not None and ratios[key] > 0, key
