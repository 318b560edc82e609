"""benchmarks/run_cost.py: the whole-run cost benchmark, in quick mode, and its per-segment peak-RSS meter."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["freeze", "lora", "full", "fishertune", "fim", "random"]
SEGMENTS = ["setup", "stage1", "stage2", "selection", "stage3", "evaluate", "save"]


def _load_run_cost():
    spec = importlib.util.spec_from_file_location("run_cost", ROOT / "benchmarks" / "run_cost.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stage_meter_peak_of_each_segment_is_its_own():
    """A 200 MiB spike inside one segment shows in that segment's peak and not in the next one's."""
    rc = _load_run_cost()
    meter = rc.StageMeter("cpu", (1, 1, 1))
    if not rc._reset_hwm():
        pytest.skip("/proc/self/clear_refs cannot reset the peak-RSS counter here")
    meter.switch("stage1")  # closes "setup"
    spike = bytearray(200 * 2**20)
    spike[::4096] = b"\x01" * len(spike[::4096])  # touch every page so it is resident
    del spike
    meter.switch("stage2")
    meter.switch("stage3")
    seg = meter.segments
    assert seg["stage1"]["peak_rss_bytes"] >= seg["stage1"]["rss_start_bytes"] + 190 * 2**20
    assert seg["stage2"]["peak_rss_bytes"] < seg["stage1"]["peak_rss_bytes"] - 150 * 2**20
    out = meter.finish()
    assert out["whole_run_peak_rss_bytes"] == seg["stage1"]["peak_rss_bytes"]
    assert out["reset_per_segment"] is True


def test_method_spec_parses_variants():
    rc = _load_run_cost()
    assert rc.method_spec("lora") == ("lora", "lora", {})
    assert rc.method_spec("ft_bf16:fishertune:delta_max=0.05;fisher_mode=per_sample") == (
        "ft_bf16", "fishertune", {"delta_max": 0.05, "fisher_mode": "per_sample"})
    with pytest.raises(SystemExit, match="key=value"):
        rc.method_spec("x:fishertune:delta_max")


def test_run_cost_quick_has_every_segment_for_every_method(tmp_path):
    out, md = tmp_path / "cost.json", tmp_path / "cost.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_cost.py"), "--quick", "--workdir",
                           str(tmp_path / "work"), "--out", str(out), "--md", str(md)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert list(data["results"]) == METHODS
    for m, r in data["results"].items():
        assert r["reset_per_segment"] is True, m
        assert list(r["segments"]) == SEGMENTS, m
        peaks = {s: r["segments"][s]["peak_rss_bytes"] for s in SEGMENTS}
        assert all(p > 50 * 2**20 for p in peaks.values()), (m, peaks)  # a Python process with torch: > 50 MiB
        whole = r["whole_run_peak_rss_bytes"]
        assert whole == max(peaks.values()), m
        for s in SEGMENTS:  # a segment's peak is at least what it started and ended with
            seg = r["segments"][s]
            assert seg["peak_rss_bytes"] >= max(seg["rss_start_bytes"], seg["rss_end_bytes"]), (m, s)
            assert seg["wall_s"] >= 0, (m, s)
        # the kernel's own whole-process figure can only miss what came after the last reset
        assert r["ru_maxrss_bytes"] <= whole * 1.05, m
        assert [len(r["step_s"][f"stage{i}"]) for i in (1, 2, 3)] == [1, 2, 2], m
        assert all(t > 0 for ts in r["step_s"].values() for t in ts), m
        assert r["wall_s"] >= sum(s["wall_s"] for s in r["segments"].values()) * 0.99, m
        if m in ("fishertune", "fim", "random"):
            assert 0 < r["selection"]["num_active"] <= r["selection"]["num_candidates"] < r["selection"]["num_targeted"]
    rat = data["ratios"]
    assert set(rat) >= {"rss_overhead_fishertune_over_full (<= 0.75)", "rss_overhead_fishertune_over_lora (<= 1.5)",
                        "step_stage2_over_stage3_fishertune (<= 2.5)"}
    assert rat["step_stage2_over_stage3_fishertune (<= 2.5)"] > 0
    table = md.read_text()
    for label in ("| freeze |", "| LoRA r=16 |", "| full fine-tuning |", "| FisherTune |", "| FIM-only |",
                  "| random sparse |"):
        assert label in table
    assert "clear_refs" in table and "stages 1 + 2 + 2" in table


def test_whole_run_peak_matches_the_kernels_figure_without_resets(tmp_path):
    """The largest segment peak (with resets) is what /usr/bin/time -f %M (ru_maxrss) reports for a run without."""
    runs = {}
    for mode in ("reset", "no-reset"):
        out = tmp_path / f"{mode}.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "run_cost.py"), "--quick", "--methods", "fishertune",
               "--workdir", str(tmp_path / mode), "--out", str(out)] + (["--no-stage-reset"] if mode == "no-reset" else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[mode] = json.loads(out.read_text())["results"]["fishertune"]
    assert runs["no-reset"]["reset_per_segment"] is False
    kernel = runs["no-reset"]["ru_maxrss_bytes"]
    assert abs(runs["no-reset"]["whole_run_peak_rss_bytes"] - kernel) <= 0.02 * kernel  # same process: same figure
    assert abs(runs["reset"]["whole_run_peak_rss_bytes"] - kernel) <= 0.10 * kernel  # two processes, same work
