"""benchmarks/run_cost.py: the whole-run cost benchmark, in quick mode, and its per-segment peak-RSS meter."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["freeze", "lora", "full", "fishertune", "fim", "random"]
SEGMENTS = ["setup", "stage1", "stage2", "selection", "stage3", "evaluate", "save"]


def _load_run_cost():
    return load_script("benchmarks/run_cost.py")


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
    # the file-backed part (libraries mapped from disk) is recorded per segment and taken off the peak's reading aid
    assert all(0 < s["rss_file_end_bytes"] < s["rss_end_bytes"] for s in seg.values())
    assert out["whole_run_peak_rss_less_file_bytes"] == (seg["stage1"]["peak_rss_bytes"]
                                                         - seg["stage1"]["rss_file_end_bytes"])


def test_method_spec_parses_variants():
    rc = _load_run_cost()
    assert rc.method_spec("lora") == ("lora", "lora", {})
    assert rc.method_spec("ft_bf16:fishertune:delta_max=0.05;fisher_mode=per_sample") == (
        "ft_bf16", "fishertune", {"delta_max": 0.05, "fisher_mode": "per_sample"})
    with pytest.raises(SystemExit, match="key=value"):
        rc.method_spec("x:fishertune:delta_max")


def test_variant_keys_reach_their_config_sections(tmp_path):
    """A variant row's plain keys go to FisherTuneConfig, `training.X` to the training section and `method.X` to the
    method section, each overriding the benchmark's own value."""
    from types import SimpleNamespace

    rc = _load_run_cost()
    args = SimpleNamespace(decoder="linear", pyramid_channels=32, hidden=32, layers=2, heads=2, intermediate=64,
                           patch=8, crop=32, decoder_config=None, fisher_mode="batch", stages=[1, 2, 3], batch=2,
                           device="cpu", bf16=False, image_size=[64, 32])
    _, method, extra = rc.method_spec(
        "ft_k:fishertune:delta_max=0.05;training.deltas_in_weights=false;method.selection_update_steps=100")
    cfg = rc.run_config(args, method, extra, tmp_path, tmp_path)
    assert cfg["method"]["selection_update_steps"] == 100
    assert cfg["method"]["fishertune"]["delta_max"] == 0.05
    assert "selection_update_steps" not in cfg["method"]["fishertune"]
    assert cfg["training"]["deltas_in_weights"] is False
    # the benchmark's own: δ(t) every second stage-3 step (updates and plain steps alternate), every step with T3 <= 2
    assert rc.run_config(args, method, {}, tmp_path, tmp_path)["method"]["selection_update_steps"] == 2
    args.stages = [1, 2, 2]
    assert rc.run_config(args, method, {}, tmp_path, tmp_path)["method"]["selection_update_steps"] == 1


def test_profile_skip_needs_stages_longer_than_it(tmp_path):
    """--profile-skip K leaves out each stage's first K steps: stages 2 and 3 of fewer steps are refused up front (a
    profile would start inside the next stage), and so is K < 1."""
    rc = _load_run_cost()
    with pytest.raises(SystemExit, match="stages 2 and 3 need more steps"):
        rc.main(["--quick", "--workdir", str(tmp_path), "--stages", "1", "3", "2", "--methods", "fishertune",
                 "--torch-profile", f"fishertune={tmp_path / 'p.md'}", "--profile-skip", "2"])
    with pytest.raises(SystemExit, match="at least 1"):
        rc.main(["--quick", "--workdir", str(tmp_path), "--profile-skip", "0"])
    assert not (tmp_path / "runs").exists()


def test_a_refused_row_config_stops_the_benchmark_before_any_row_runs(tmp_path):
    """A variant whose config scripts/train.py would refuse stops run_cost up front, naming the row, before the rows
    listed ahead of it have run (no run directory, no result)."""
    rc = _load_run_cost()
    with pytest.raises(SystemExit, match="row 'bad'.*selection_update_steps"):
        rc.main(["--quick", "--workdir", str(tmp_path),
                 "--methods", "freeze,bad:fishertune:method.selection_update_steps=1000"])
    assert not (tmp_path / "runs").exists()


def test_run_cost_quick_has_every_segment_for_every_method(tmp_path):
    out, md = tmp_path / "cost.json", tmp_path / "cost.md"
    # an allocator tunable in the environment (it moves peaks and step times) is recorded and shown
    env = {**os.environ, "MALLOC_ARENA_MAX": "4"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_cost.py"), "--quick", "--workdir",
                           str(tmp_path / "work"), "--out", str(out), "--md", str(md)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["setting"]["env"].get("MALLOC_ARENA_MAX") == "4"
    command = next(line for line in md.read_text().splitlines() if line.startswith("Command: `"))
    assert "MALLOC_ARENA_MAX=4 " in command and "python benchmarks/run_cost.py --quick" in command
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
        # the δ(t) update, timed inside the step: every growing stage-3 step runs one, nothing else does
        upd = r["step_update_s"]
        assert len(upd["stage3"]) == 2 and upd["stage1"] == [0.0] and upd["stage2"] == [0.0, 0.0], m
        if m in ("fishertune", "fim", "random"):
            assert all(0 < u < t for u, t in zip(upd["stage3"], r["step_s"]["stage3"])), (m, upd)
        else:
            assert upd["stage3"] == [0.0, 0.0] and "update" not in r["whole_run_time"], m
    rat = data["ratios"]
    assert set(rat) >= {"rss_overhead_fishertune_over_full (<= 0.75)", "rss_overhead_fishertune_over_lora (<= 1.5)",
                        "step_stage2_over_stage3_fishertune (<= 2.5)", "time_fishertune_over_full (<= 0.85)",
                        "time_fishertune_over_lora (<= 1.3)"}
    _check_whole_run_time_arithmetic(data)
    assert rat["step_stage2_over_stage3_fishertune (<= 2.5)"] > 0
    table = md.read_text()
    for label in ("| freeze |", "| LoRA r=16 |", "| full fine-tuning |", "| FisherTune |", "| FIM-only |",
                  "| random sparse |"):
        assert label in table
    assert "clear_refs" in table and "stages 1 + 2 + 2" in table
    assert "FisherTune with δ(t) recomputed every 100 stage-3 steps" in table
    assert "whole run s** (10,000 + 2,000 + 28,000 steps)" in table
    ft = data["results"]["fishertune"]["whole_run_time"]
    assert "| FisherTune | " in table and f"**{ft['total_s']:,.0f}**" in table


# what a step of stage 1, 2, 3 computes per method of --quick: d(ecoder alone), e(stimate), b(ackbone trains)
QUICK_KINDS = {"freeze": "ddd", "lora": "dbb", "full": "dbb", "fishertune": "deb", "fim": "deb", "random": "ddb"}


def _steady_and_warm_up(kinds: str, steps: dict) -> tuple[list, float]:
    """The steady step of each stage and the warm-up's excess, as the whole-run figure defines them, written out:
    stages of one kind share the median of the last such stage's steps (less its first step where that is the
    kind's first); the steps left out count once at their excess."""
    runs = [steps[f"stage{i}"] for i in (1, 2, 3)]
    steady, excess = [None] * 3, 0.0
    for kind in set(kinds):
        where = [i for i, k in enumerate(kinds) if k == kind]
        last = runs[where[-1]]
        if len(where) > 1:
            sample, warm = last, [t for i in where[:-1] for t in runs[i]]
        else:
            sample, warm = (last[1:], last[:1]) if len(last) > 1 else (last, [])
        s = statistics.median(sample)
        excess += sum(max(0.0, t - s) for t in warm)
        for i in where:
            steady[i] = s
    return steady, excess


def _check_whole_run_time_arithmetic(data):
    """The JSON's whole-run time = T1 x steady stage-1 step + T2 x stage-2 + T3 x stage-3 + the selection segment +
    the warm-up's excess once, at the paper's 10k : 2k : 28k, with the stage kinds of each method; its ratios are
    those totals divided."""
    totals = {}
    for m, r in data["results"].items():
        w = r["whole_run_time"]
        assert w["stages"] == [10_000, 2_000, 28_000], m
        med = [statistics.median(r["step_s"][f"stage{i}"]) for i in (1, 2, 3)]
        assert med == [r["step_s_median"][f"stage{i}"] for i in (1, 2, 3)], m
        assert w["selection_s"] == r["segments"]["selection"]["wall_s"], m
        steady, excess = _steady_and_warm_up(QUICK_KINDS[m], r["step_s"])
        assert [w["step_s"][f"stage{i}"] for i in (1, 2, 3)] == steady, m
        assert w["one_off_s"] == pytest.approx(excess, rel=1e-12), m
        expected = 10_000 * steady[0] + 2_000 * steady[1] + 28_000 * steady[2] + w["selection_s"] + excess
        assert w["total_s"] == pytest.approx(expected, rel=1e-12), m
        totals[m] = w["total_s"]
    # LoRA and full fine-tuning charge stage 2 at their stage-3 step; freeze all three stages
    for m in ("lora", "full"):
        w = data["results"][m]["whole_run_time"]["step_s"]
        assert w["stage2"] == w["stage3"] == statistics.median(data["results"][m]["step_s"]["stage3"]), m
    rat = data["ratios"]
    assert rat["time_fishertune_over_full (<= 0.85)"] == pytest.approx(totals["fishertune"] / totals["full"], rel=1e-12)
    assert rat["time_fishertune_over_lora (<= 1.3)"] == pytest.approx(totals["fishertune"] / totals["lora"], rel=1e-12)
    # the growing row at the paper configs' δ(t) interval: each step after the first less its update, one update per
    # 100 steps
    r = data["results"]["fishertune"]
    steps, upd = r["step_s"]["stage3"][1:], r["step_update_s"]["stage3"][1:]
    less = statistics.median(t - u for t, u in zip(steps, upd))
    expected = (totals["fishertune"] - 28_000 * r["whole_run_time"]["step_s"]["stage3"] + 28_000 * less
                + 280 * statistics.median(upd))
    u = r["whole_run_time"]["update"]
    assert u["every"] == 100 and u["total_s"] == pytest.approx(expected, rel=1e-12)
    assert u["total_s"] < totals["fishertune"]
    assert rat["time_fishertune_over_lora, δ(t) every 100 steps"] == pytest.approx(u["total_s"] / totals["lora"],
                                                                                  rel=1e-12)


def test_whole_run_time_and_its_ratios_on_made_up_medians():
    """Known numbers: the issue's step medians (s) give FisherTune 1.39x full fine-tuning's time at 10k : 2k : 28k."""
    rc = _load_run_cost()

    def result(m1, m2, m3, sel):
        return {"step_s_median": {"stage1": m1, "stage2": m2, "stage3": m3},
                "segments": {"selection": {"wall_s": sel}}}

    results = {"lora": result(0.95, 2.03, 1.48, 0.0), "full": result(0.63, 4.19, 2.15, 0.5),
               "fishertune": result(0.71, 8.71, 2.85, 4.0), "fishertune_d0.05": result(0.7, 8.0, 1.6, 4.0),
               "fishertune_d0.15": result(0.7, 8.0, 1.9, 4.0)}
    for r in results.values():
        r["whole_run_time"] = rc.whole_run_time(r)
    assert results["fishertune"]["whole_run_time"]["total_s"] == pytest.approx(7100 + 17420 + 79800 + 4.0)
    assert results["full"]["whole_run_time"]["total_s"] == pytest.approx(6300 + 8380 + 60200 + 0.5)
    rat = rc.ratios(results)
    assert rat["time_fishertune_over_full (<= 0.85)"] == pytest.approx(104324.0 / 74880.5)
    assert rat["time_fishertune_over_lora (<= 1.3)"] == pytest.approx(104324.0 / (9500 + 4060 + 41440))
    assert rat["step_stage3_fishertune_d0.05_over_lora (<= 1.15)"] == pytest.approx(1.6 / 1.48)
    assert rat["step_stage3_fishertune_d0.15_over_full (<= 0.9)"] == pytest.approx(1.9 / 2.15)
    assert rc.whole_run_time(result(0.7, None, 1.0, 0.0)) is None  # a stage without steps: no figure


def test_whole_run_time_at_the_paper_configs_update_interval_on_made_up_steps():
    """A growing row whose steps timed their δ(t) update: the figure at an update every 100 steps replaces T3 x the
    median step by T3 x median(step - update) + 280 x median(update); rows where under half the steps updated (a fixed
    δ, a baseline) get none; over rounds it is recomputed from the medians of its two parts."""
    rc = _load_run_cost()

    def result(s3, u3):
        r = {"step_s_median": {"stage1": 0.6, "stage2": 6.0, "stage3": statistics.median(s3)},
             "step_s": {"stage1": [0.6], "stage2": [6.0], "stage3": s3},
             "step_update_s": {"stage1": [0.0], "stage2": [0.0], "stage3": u3},
             "segments": {"selection": {"wall_s": 0.0}}, "wall_s": 10.0}
        r["whole_run_time"] = rc.whole_run_time(r)
        return r

    grow = result([3.0, 1.5, 1.6, 1.7], [0.5, 0.03, 0.02, 0.04])
    w = grow["whole_run_time"]
    # the first step (the selection's) counts once at its excess; the steps after it give the steady figures
    assert w["step_s"]["stage3"] == pytest.approx(1.6) and w["one_off_s"] == pytest.approx(1.4)
    assert w["total_s"] == pytest.approx(10_000 * 0.6 + 2_000 * 6.0 + 28_000 * 1.6 + 1.4)
    assert w["update"]["step_less_update_s"] == pytest.approx(1.58)  # median of 1.47, 1.58, 1.66
    assert w["update"]["update_s"] == pytest.approx(0.03)
    assert w["update"]["total_s"] == pytest.approx(w["total_s"] - 28_000 * 1.6 + 28_000 * 1.58 + 280 * 0.03)
    assert "update" not in result([3.0, 1.5, 1.6, 1.7], [0.5, 0.0, 0.0, 0.0])["whole_run_time"]  # a fixed δ
    rows = {"lora": result([1.4, 1.4], [0.0, 0.0]), "full": result([1.9, 1.9], [0.0, 0.0]), "fishertune": grow}
    rat = rc.ratios(rows)
    assert rat["time_fishertune_over_lora, δ(t) every 100 steps"] == pytest.approx(
        w["update"]["total_s"] / rows["lora"]["whole_run_time"]["total_s"])
    rounds = [{"fishertune": grow}, {"fishertune": result([1.8, 1.8, 1.8], [0.05, 0.05, 0.05])},
              {"fishertune": result([1.7, 1.7, 1.7], [0.01, 0.01, 0.01])}]
    comb = rc.combine_rounds(rounds)["fishertune"]["whole_run_time"]
    assert comb["step_s"]["stage3"] == pytest.approx(1.7)  # median of 1.6, 1.8, 1.7
    assert comb["update"]["step_less_update_s"] == pytest.approx(1.69)  # median of 1.58, 1.75, 1.69
    assert comb["update"]["update_s"] == pytest.approx(0.03)  # median of 0.03, 0.05, 0.01
    assert comb["update"]["total_s"] == pytest.approx(comb["total_s"] - 28_000 * 1.7 + 28_000 * 1.69 + 280 * 0.03)


def test_whole_run_time_of_a_growing_row_alternating_updates_and_plain_steps():
    """run_cost's growing row recomputes δ(t) every second stage-3 step: T3 x the plain steps' mean, plus the updates
    a 28k-step run makes at the library's default interval (every 28: 1,001, the first inside the first step, which
    counts once at its excess), each at the median of (update step - mean of its plain neighbours)."""
    rc = _load_run_cost()
    rep = load_script("benchmarks/run_cost_report.py")
    assert rep.updates_in_run(28_000, 28) == 1_001 and rep.updates_in_run(28_000, 100) == 281
    assert rep.updates_in_run(10, 2) == 6 and rep.updates_in_run(11, 2) == 6  # 0, 2, 4, 6, 8 and the last
    assert rep.default_update_interval(28_000) == 28

    def result(s3, u3):
        r = {"method": "fishertune", "step_s": {"stage1": [0.6, 0.55], "stage2": [9.0, 6.0, 6.2], "stage3": s3},
             "step_s_median": {"stage1": 0.575, "stage2": 6.2, "stage3": statistics.median(s3)},
             "step_update_s": {"stage1": [0.0, 0.0], "stage2": [0.0] * 3, "stage3": u3},
             "segments": {"selection": {"wall_s": 0.01}}, "wall_s": 10.0}
        r["whole_run_time"] = rc.whole_run_time(r)
        return r

    s3 = [5.0, 1.50, 1.58, 1.52, 1.62, 1.56, 1.66, 1.60, 1.70, 1.64, 1.72]
    u3 = [0.5, 0.0, 0.03, 0.0, 0.03, 0.0, 0.03, 0.0, 0.03, 0.0, 0.03]
    r = result(s3, u3)
    g = rep.growth_steps(r)
    assert g["plain"] == [1.50, 1.52, 1.56, 1.60, 1.64] and g["plain_s"] == pytest.approx(1.564)
    assert g["excess"] == pytest.approx([0.07, 0.08, 0.08, 0.08, 0.08]) and g["excess_s"] == pytest.approx(0.08)
    w = r["whole_run_time"]
    assert w["step_s"] == {"stage1": 0.55, "stage2": 6.1, "stage3": pytest.approx(1.564)}
    assert w["one_off_s"] == pytest.approx(0.05 + 2.9 + (5.0 - 1.564))
    assert w["updates"] == {"every": 28, "count": 1_000, "excess_s": pytest.approx(0.08), "charge_s": pytest.approx(80)}
    assert w["total_s"] == pytest.approx(10_000 * 0.55 + 2_000 * 6.1 + 28_000 * 1.564 + 0.01 + w["one_off_s"] + 80)
    assert "update" not in w  # no reading aid: the figure is the run's own
    # a row that updated at every step keeps the arithmetic of its day; a fixed δ has no updates to charge
    every = result([5.0, 1.6, 1.7, 1.65], [0.5, 0.03, 0.03, 0.03])["whole_run_time"]
    assert "updates" not in every and every["update"]["every"] == 100
    assert rep.growth_steps(result([5.0, 1.6, 1.7, 1.65], [0.5, 0.0, 0.0, 0.0])) is None
    # over rounds: the medians of the plain steps' means and of the excesses, charged as in one round
    r2 = result([5.0] + [t + 0.1 for t in s3[1:]], [0.5] + [x * 2 for x in u3[1:]])
    r3 = result([5.0] + [t + 0.2 for t in s3[1:]], u3)
    comb = rc.combine_rounds([{"fishertune": r}, {"fishertune": r2}, {"fishertune": r3}])["fishertune"]
    cw = comb["whole_run_time"]
    assert cw["step_s"]["stage3"] == pytest.approx(1.664) and cw["updates"]["excess_s"] == pytest.approx(0.08)
    assert cw["total_s"] == pytest.approx(10_000 * 0.55 + 2_000 * 6.1 + 28_000 * 1.664 + 0.01 + cw["one_off_s"] + 80)


def test_whole_run_time_counts_a_backbones_first_training_steps_once():
    """Full fine-tuning's stage 2 and 3 run the same step; its first training steps are slow while the allocator
    settles (measured: 5.0, 2.47, 2.30 s against ~1.9 s later). The whole run charges T2 + T3 steps at the stage-3
    step and those three once at their excess, where a stage-2 median would charge 2.47 s x 2,000. FisherTune's
    stage 2 (the estimator) keeps its own steps; freeze's three stages are one kind."""
    rc = _load_run_cost()

    def result(method, s1, s2, s3):
        r = {"method": method, "step_s": {"stage1": s1, "stage2": s2, "stage3": s3},
             "step_s_median": {f"stage{i}": statistics.median(s) for i, s in enumerate((s1, s2, s3), 1)},
             "segments": {"selection": {"wall_s": 0.5}}}
        r["whole_run_time"] = rc.whole_run_time(r)
        return r

    full = result("full", [0.6, 0.55], [5.0, 2.47, 2.30], [1.95, 1.9, 1.85, 1.9])
    w = full["whole_run_time"]
    assert w["step_s"] == {"stage1": 0.55, "stage2": 1.9, "stage3": 1.9}
    assert w["one_off_s"] == pytest.approx(0.05 + 3.1 + 0.57 + 0.4)
    assert w["total_s"] == pytest.approx(10_000 * 0.55 + 30_000 * 1.9 + 0.5 + 4.12)
    assert w["total_s"] < 10_000 * 0.55 + 2_000 * 2.47 + 28_000 * 1.9 - 1_000  # the stage-2 median's figure
    ft = result("fishertune", [0.6, 0.55], [7.0, 6.0, 6.2], [9.0, 1.5, 1.6, 1.7])
    assert ft["whole_run_time"]["step_s"] == {"stage1": 0.55, "stage2": 6.1, "stage3": 1.6}
    assert ft["whole_run_time"]["one_off_s"] == pytest.approx(0.05 + 0.9 + 7.4)
    freeze = result("freeze", [0.7, 0.6], [0.6, 0.58], [0.55, 0.57, 0.56])
    assert freeze["whole_run_time"]["step_s"] == {"stage1": 0.56, "stage2": 0.56, "stage3": 0.56}
    assert freeze["whole_run_time"]["one_off_s"] == pytest.approx(0.14 + 0.04 + 0.04 + 0.02)
    # a method not in the table (made-up results): each stage its own kind
    rep = load_script("benchmarks/run_cost_report.py")
    assert rep.stage_kinds({"method": "nope"}) == ("stage1", "stage2", "stage3")
    assert rep.stage_kinds({"method": "lora"}) == ("decoder", "backbone", "backbone")


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


def test_torch_profile_tables_of_stage_2_and_3(tmp_path):
    """--torch-profile LABEL=FILE: that row's stage-2 and stage-3 steps after each stage's first, profiled; the
    estimator's labelled regions are in stage 2's table, and stage 3's has none of them."""
    prof = tmp_path / "prof.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run_cost.py"), "--quick", "--stages", "1", "3", "3",
           "--methods", "ft_prof:fishertune", "--torch-profile", f"ft_prof={prof}", "--workdir", str(tmp_path / "w"),
           "--out", str(tmp_path / "out.json")]
    proc = subprocess.run(cmd + ["--profile-skip", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = prof.read_text()
    stage2, stage3 = text.split("## stage3")
    # stages 1 + 3 + 3 steps, the first two of stages 2 and 3 left out: steps 3 and 6 profiled
    assert "## stage2" in stage2 and "1 step(s) from step 3" in stage2 and "1 step(s) from step 6" in stage3
    assert "fishertune::weight_sample" in stage2 and "fishertune::weight_sample" not in stage3
    assert json.loads((tmp_path / "out.json").read_text())["results"]["ft_prof"]["torch_profile"] == str(prof)


def test_combine_rounds_takes_medians_and_keeps_each_rounds_ratios():
    """--repeats: per method, the median over rounds of each figure; the whole-run time recomputed from those medians;
    each target ratio also per round (paired within the round)."""
    rc = _load_run_cost()

    def result(m3, peak, sel=0.0):
        r = {"step_s_median": {"stage1": 1.0, "stage2": 2.0, "stage3": m3},
             "step_s": {"stage1": [1.0], "stage2": [2.0], "stage3": [m3]},
             "segments": {"selection": {"wall_s": sel, "peak_rss_bytes": peak}, "stage3": {"peak_rss_bytes": peak}},
             "whole_run_peak_rss_bytes": peak, "wall_s": 10.0 * m3}
        r["whole_run_time"] = rc.whole_run_time(r)
        return r

    rounds = [{"freeze": result(1.0, 100), "lora": result(m, 200), "full": result(2.0, 300),
               "fishertune": result(f, p)} for m, f, p in ((1.5, 1.8, 240), (1.4, 2.2, 280), (1.6, 1.9, 250))]
    comb = rc.combine_rounds(rounds)
    assert list(comb) == ["freeze", "lora", "full", "fishertune"]
    ft = comb["fishertune"]
    assert ft["rounds"] == 3 and ft["step_s_median"]["stage3"] == 1.9 and ft["whole_run_peak_rss_bytes"] == 250
    assert ft["step_s_rounds"]["stage3"] == [1.8, 2.2, 1.9] and ft["segments"]["stage3"]["peak_rss_bytes"] == 250
    assert ft["whole_run_time"]["total_s"] == pytest.approx(10_000 * 1.0 + 2_000 * 2.0 + 28_000 * 1.9)
    assert ft["whole_run_time"]["total_s_rounds"] == [r["fishertune"]["whole_run_time"]["total_s"] for r in rounds]
    assert comb["lora"]["step_s_median"]["stage3"] == 1.5
    per = rc.ratio_rounds(rounds)
    key = "rss_overhead_fishertune_over_full (<= 0.75)"
    assert per[key] == pytest.approx([140 / 200, 180 / 200, 150 / 200])
    assert rc.ratios(comb)[key] == pytest.approx(150 / 200)  # the medians' ratio, beside the per-round ones
    args = type("A", (), {"device": "cpu", "no_stage_reset": False, "hidden": 8, "layers": 1, "heads": 1,
                          "intermediate": 8, "patch": 2, "decoder": "linear", "crop": 8, "batch": 2, "bf16": False,
                          "stages": [1, 1, 1], "threads": 1, "fisher_mode": "batch"})()
    for r in comb.values():
        r["segments"] = {s: r["segments"].get(s, {}) for s in SEGMENTS}
    md = rc.markdown(comb, rc.ratios(comb), args, "cmd", per)
    assert "3 rounds, interleaved" in md and "(per round: 0.700, 0.900, 0.750)" in md


def test_run_cost_repeats_rounds_interleaved(tmp_path):
    """--repeats 2: each method runs twice, each round in its own directory, the second round in rotated order; the
    JSON holds both rounds, the medians and the per-round ratios."""
    out = tmp_path / "out.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run_cost.py"), "--quick", "--methods", "freeze,fishertune",
           "--repeats", "2", "--workdir", str(tmp_path / "w"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    order = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("[run_cost]")]
    assert order == ["freeze", "fishertune", "fishertune", "freeze"]
    data = json.loads(out.read_text())
    assert len(data["rounds"]) == 2 and list(data["results"]) == ["freeze", "fishertune"]
    for label in ("freeze", "fishertune"):
        assert (tmp_path / "w" / "runs" / "round1" / label / "cost.json").is_file()
        medians = [r[label]["step_s_median"]["stage3"] for r in data["rounds"]]
        assert data["results"][label]["step_s_median"]["stage3"] == pytest.approx(sum(medians) / 2)
    assert all(len(v) == 2 for v in data["ratios_per_round"].values())
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(cmd[:-4] + ["--repeats", "0"], check=True, capture_output=True, timeout=120)


def test_pooling_runs_takes_every_round_and_refuses_other_settings(tmp_path):
    """run_cost_report.py A.jsonl B.jsonl: the rounds of both runs (a --repeats run and a single run), the methods
    both have, medians over all rounds; a run measured at another size is refused, naming the field."""
    rep = load_script("benchmarks/run_cost_report.py")

    def result(m3, peak):
        r = {"step_s_median": {"stage1": 1.0, "stage2": 2.0, "stage3": m3},
             "step_s": {"stage1": [1.0], "stage2": [2.0], "stage3": [m3]},
             "segments": {s: {"peak_rss_bytes": peak, "wall_s": 0.0} for s in SEGMENTS},
             "whole_run_peak_rss_bytes": peak, "wall_s": 10.0}
        r["whole_run_time"] = rep.whole_run_time(r)
        return r

    setting = {"device": "cpu", "hidden": 8, "layers": 1, "heads": 1, "intermediate": 8, "patch": 2,
               "decoder": "linear", "decoder_config": None, "crop": 8, "image_size": [16, 8], "batch": 2,
               "stages": [1, 1, 1], "paper_stages": [10000, 2000, 28000], "threads": 1, "fisher_mode": "batch",
               "bf16": False, "no_stage_reset": False}
    rounds_a = [{"freeze": result(1.0, 100), "full": result(2.0, 300), "fishertune": result(f, 250), "x": result(1, 1)}
                for f in (1.6, 1.8)]
    single_b = {"freeze": result(1.0, 100), "full": result(2.0, 300), "fishertune": result(2.4, 250)}
    a = {"command": "a", "setting": setting, "results": {}, "rounds": rounds_a}
    b = {"command": "b", "setting": setting, "results": single_b}
    for name, line in (("a", a), ("b", b)):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(line) + "\n")
    out, md = tmp_path / "pooled.jsonl", tmp_path / "pooled.md"
    assert rep.main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--out", str(out), "--md", str(md)]) == 0
    pooled = json.loads(out.read_text())
    assert list(pooled["results"]) == ["freeze", "full", "fishertune"]  # "x" is not in run b
    assert pooled["results"]["fishertune"]["step_s_rounds"]["stage3"] == [1.6, 1.8, 2.4]
    assert pooled["results"]["fishertune"]["step_s_median"]["stage3"] == 1.8
    assert len(pooled["ratios_per_round"]["time_fishertune_over_full (<= 0.85)"]) == 3
    assert "3 rounds" in md.read_text() and "Pooled: `a`, `b`" in md.read_text()
    other = dict(b, setting=dict(setting, hidden=16))
    (tmp_path / "c.jsonl").write_text(json.dumps(other) + "\n")
    with pytest.raises(SystemExit, match="hidden"):
        rep.main([str(tmp_path / "a.jsonl"), str(tmp_path / "c.jsonl")])
