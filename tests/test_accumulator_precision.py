"""benchmarks/accumulator_precision.py runs end to end (2 steps) and reports overlaps in [0, 1], for both comparisons."""

import json

import torch
from script_modules import load_script, run_main


def _run(capsys, *args: str) -> dict:
    mod = load_script("benchmarks/accumulator_precision.py")
    assert run_main(mod, [*args, "--steps", "2", "--threads", str(torch.get_num_threads())]) == 0
    return json.loads(capsys.readouterr().out.splitlines()[0])


def test_accumulator_precision_benchmark_runs(capsys):
    rows = _run(capsys)["rows"]
    assert [r["estimator"] for r in rows] == ["variational", "empirical"]
    for r in rows:
        assert 0.0 <= r["jaccard_fp32_seed0_vs_seed1"] <= 1.0
        assert 0.5 < r["jaccard_bf16_vs_fp32"] <= 1.0  # two steps: bf16 rounding barely moves the top 15 %


def test_mode_comparison_compares_two_different_selections(capsys):
    """--compare mode: batch vs per-sample Fisher. Their top 15 % differ (the keyword reaches the estimator: the same
    setting twice would give Jaccard 1), and the output names what was compared."""
    out = _run(capsys, "--compare", "mode")
    assert out["compare"] == "mode" and out["fixed"]["per_sample_method"] == "loop"
    assert [r["estimator"] for r in out["rows"]] == ["variational", "empirical"]
    for r in out["rows"]:
        assert 0.0 < r["jaccard_batch_vs_per_sample"] < 1.0
        assert 0.0 <= r["jaccard_per_sample_seed0_vs_seed1"] <= 1.0
