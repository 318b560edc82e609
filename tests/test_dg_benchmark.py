"""The benchmark command runs end to end (quick mode) and writes its tables (mIoU, active-set overlaps, paired
differences), JSON and plot; the sweeps plan the runs issue 12 asks for."""

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("dg_benchmark", ROOT / "benchmarks" / "dg_benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(**kw):
    base = dict(methods=["freeze", "fim", "fishertune"], ablations=False, stages=[100, 20, 180], t2_values=None,
                lambdas=None, grid=None)
    return argparse.Namespace(**{**base, **kw})


def test_sweep_plans_and_references():
    dg = _load()
    t2 = dg.plan(_args(), "t2")
    assert [(n, m, e) for n, m, e in t2][:2] == [("fim", "fim", {}), ("drfim_empirical", "drfim_empirical", {})]
    assert ("fim_t2_300", "fim", {"stage2_steps": 300}) in t2 and len(t2) == 6
    assert dg.references("t2", t2) == {"drfim_empirical": "fim", "drfim_empirical_t2_100": "fim_t2_100",
                                       "drfim_empirical_t2_300": "fim_t2_300"}
    lam = dg.plan(_args(), "lambda")
    assert [e.get("lambda_dr", 0.5) for _, _, e in lam] == [0.0, 0.3, 0.5, 0.7, 1.0]
    assert [n for n, _, _ in lam][2] == "fishertune"  # λ = 0.5 is the main row: its run is reused
    grid = dg.plan(_args(), "gamma_tau")
    assert len(grid) == 9 and len({n for n, _, _ in grid}) == 9
    assert ("fishertune", "fishertune", {}) in grid and ("fishertune_gamma0.005_tau0.02", "fishertune",
                                                         {"gamma": 0.005, "tau": 0.02}) in grid
    assert set(dg.references("gamma_tau", grid).values()) == {"fishertune"}
    pull = dg.plan(_args(), "prior_pull")
    assert pull == [("fim", "fim", {}), ("fim_no_pull", "fim", {"prior_pull": False}),
                    ("fishertune", "fishertune", {}), ("fishertune_no_pull", "fishertune", {"prior_pull": False})]
    assert dg.references("prior_pull", pull) == {"fim_no_pull": "fim", "fishertune_no_pull": "fishertune"}
    assert dg._label("fishertune_no_pull").endswith(", no prior pull")
    with pytest.raises(ValueError, match="sweep='nope'"):
        dg.plan(_args(), "nope")


def test_jaccard_and_paired_differences():
    dg = _load()
    a = {"l1": torch.tensor([0, 1, 2, 3]), "l2": torch.tensor([5])}
    b = {"l1": torch.tensor([2, 3, 4]), "l3": torch.tensor([7])}
    assert dg.jaccard(a, b) == pytest.approx(2 / 7)  # {l1:2,3} over {l1:0..4, l2:5, l3:7}
    assert dg.jaccard(a, a) == 1.0
    recs = [{"name": n, "seed": s, "table": {"fog": v}} for n, s, v in
            [("ref", 0, 10.0), ("ref", 1, 20.0), ("ref", 2, 30.0),
             ("same", 0, 10.1), ("same", 1, 19.8), ("same", 2, 30.2),  # noise around the reference
             ("up", 0, 12.0), ("up", 1, 22.1), ("up", 2, 31.9)]]  # +2 on every seed
    d = dg.paired_differences(recs, {"same": "ref", "up": "ref"}, ["fog"])
    assert d["up"]["diffs"] == pytest.approx([2.0, 2.1, 1.9]) and d["up"]["distinguishable"] is True
    assert d["same"]["distinguishable"] is False and math.isfinite(d["same"]["t"])
    assert d["up"]["t_crit_95"] == pytest.approx(4.303, abs=1e-3)


def test_dg_benchmark_quick(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dg_benchmark.py"), "--quick",
                           "--workdir", str(tmp_path / "work"), "--out", str(out), "--jobs", "1", "--threads", "2"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "dg_benchmark_quick.md").read_text()
    assert "| freeze (decoder only) |" in md and "| FisherTune (variational DR-FIM, exp) |" in md
    assert "sliding window 64" in md and "Wall time" in md
    data = json.loads((out / "dg_benchmark_quick.json").read_text())
    assert {r["method"] for r in data["records"]} == {"freeze", "fim", "fishertune"}
    assert sorted({r["seed"] for r in data["records"]}) == [0, 1]
    for r in data["records"]:
        assert 0.0 <= r["table"]["fog"] <= 100.0
    fishertune = next(r for r in data["records"] if r["method"] == "fishertune")
    assert fishertune["selection"]["num_active"] > 0
    assert (out / "dg_benchmark_quick.png").stat().st_size > 1000
    # the overlaps of the final active sets: FIM-only vs FisherTune per seed, and each across seeds
    ov = data["overlaps"]
    assert ov["rows"] == ["fim", "fishertune"]
    mean, sd, n = ov["between_rows"]["fim | fishertune"]
    assert 0.0 <= mean <= 1.0 and n == 2
    assert set(ov["across_seeds"]) == {"fim", "fishertune"}
    assert "Jaccard overlap of the final active sets" in md
    # paired differences against FisherTune, with a verdict
    diffs = data["paired_differences"]
    assert set(diffs) == {"freeze", "fim"} and all(len(d["diffs"]) == 2 for d in diffs.values())
    assert "Distinguishable from seed noise:" in md


def test_dg_benchmark_quick_lambda_sweep_reuses_the_main_run(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "dg_benchmark.py"), "--quick", "--seeds", "0",
           "--workdir", str(tmp_path / "work"), "--out", str(out), "--jobs", "1", "--threads", "2",
           "--sweep", "lambda"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "dg_benchmark_quick_sweep_lambda.json").read_text())
    assert data["sweep"] == "lambda"
    assert [r["name"] for r in data["records"]] == ["fishertune", "fishertune_lambda1.0"]
    assert data["overlaps"]["between_rows"]["fishertune | fishertune_lambda1.0"][2] == 1
    md = (out / "dg_benchmark_quick_sweep_lambda.md").read_text()
    assert "Sweep `lambda`" in md and "FisherTune, λ = 1.0" in md
    assert "n/a (one seed)" in md


def test_run_key_ignores_the_output_folder_and_follows_config_code_and_inputs():
    dg = _load()
    cfg = {"model": {"backbone": "dinov2"}, "method": {"name": "fim"}, "training": {"output_dir": "a", "seed": 0}}
    key = dg.run_key(cfg, "code1", {"data": {"train": 4}})
    assert dg.run_key({**cfg, "training": {"output_dir": "b", "seed": 0}}, "code1", {"data": {"train": 4}}) == key
    assert cfg["training"]["output_dir"] == "a"  # the caller's config is left alone
    assert dg.run_key({**cfg, "training": {"output_dir": "a", "seed": 1}}, "code1", {"data": {"train": 4}}) != key
    assert dg.run_key(cfg, "code2", {"data": {"train": 4}}) != key
    assert dg.run_key(cfg, "code1", {"data": {"train": 5}}) != key

def test_code_version_follows_the_sources(tmp_path):
    dg = _load()
    (tmp_path / "src" / "peft_fishertune").mkdir(parents=True)
    (tmp_path / "scripts").mkdir()
    (tmp_path / "src" / "peft_fishertune" / "a.py").write_text("x = 1\n")
    (tmp_path / "scripts" / "train.py").write_text("main()\n")
    v = dg.code_version(tmp_path)
    assert len(v) == 16 and dg.code_version(tmp_path) == v
    (tmp_path / "src" / "peft_fishertune" / "a.py").write_text("x = 2\n")
    assert dg.code_version(tmp_path) != v


def test_dg_benchmark_caches_runs_across_invocations(tmp_path):
    """A second invocation takes every run from the cache (nothing trains); a changed setting misses it; the new
    baseline rows are accepted and Super-Tuning's support counts as an active set. (The code version is pinned:
    the shared working tree may change under a long test; test_code_version_follows_the_sources checks the hash.)"""
    work = tmp_path / "work"

    def bench(*extra):
        out = tmp_path / "results"
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dg_benchmark.py"), "--quick", "--seeds", "0",
                               "--workdir", str(work), "--out", str(out), "--jobs", "2", "--threads", "1",
                               "--code-version", "pinned-by-test", *extra],
                              capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((out / "dg_benchmark_quick.json").read_text()), proc.stdout

    first, _ = bench("--methods", "freeze", "supertuning")
    assert [r["cached"] for r in first["records"]] == [False, False]
    logs = {r["method"]: work / "runs" / f"{r['name']}_seed0_{r['key'][:10]}" / "stdout.log" for r in first["records"]}
    stamps = {m: p.stat().st_mtime_ns for m, p in logs.items()}
    assert len(list((work / "cache").glob("*.json"))) == 2
    st = next(r for r in first["records"] if r["method"] == "supertuning")
    assert dg_active_layers(st["adapter_dir"]) > 0

    again, out = bench("--methods", "freeze", "supertuning")
    assert [r["cached"] for r in again["records"]] == [True, True] and out.count(", cached ") == 2
    assert {r["key"] for r in again["records"]} == {r["key"] for r in first["records"]}
    assert [r["table"] for r in again["records"]] == [r["table"] for r in first["records"]]
    assert {m: p.stat().st_mtime_ns for m, p in logs.items()} == stamps  # nothing trained again
    assert "2 of 2 runs from the run cache" in (tmp_path / "results" / "dg_benchmark_quick.md").read_text()

    changed, _ = bench("--methods", "freeze", "--backbone-lr", "2e-4")
    (rec,) = changed["records"]
    assert rec["cached"] is False and rec["key"] not in {r["key"] for r in first["records"]}
    assert len(list((work / "cache").glob("*.json"))) == 3


def dg_active_layers(adapter_dir: str) -> int:
    return len(_load().active_set(adapter_dir))
