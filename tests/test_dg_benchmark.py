"""The benchmark command runs end to end (quick mode) and writes its tables (mIoU, active-set overlaps, paired
differences, the premise check), JSON and plot; the sweeps plan the runs issue 12 asks for; the run cache reuses
finished runs across invocations; the `premise` regime trains on its stand-in.

Kept small for CI: one quick main run (3 rows x 2 seeds) is shared by the tests that read it, reuse it from the
cache or add one run to it; every invocation pins the code version (the shared working tree may change under a
test; test_code_version_follows_the_sources checks the hash)."""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]


def _load():
    return load_script("benchmarks/dg_benchmark.py")


def _args(**kw):
    base = dict(methods=["freeze", "fim", "fishertune"], ablations=False, stages=[100, 20, 180], t2_values=None,
                lambdas=None, grid=None, delta_max_values=None)
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
    dmax = dg.plan(_args(delta_max_values=None), "delta_max")
    assert [(n, e.get("delta_max", 0.15)) for n, _, e in dmax] == [
        ("fishertune_dmax0.01", 0.01), ("supertuning_dmax0.01", 0.01), ("fishertune_dmax0.05", 0.05),
        ("supertuning_dmax0.05", 0.05), ("fishertune_dmax0.1", 0.1), ("supertuning_dmax0.1", 0.1),
        ("fishertune", 0.15), ("supertuning", 0.15)]  # δ_max = 15 % is the main rows: their runs are reused
    assert dg.references("delta_max", dmax) == {"supertuning_dmax0.01": "fishertune_dmax0.01",
                                                "supertuning_dmax0.05": "fishertune_dmax0.05",
                                                "supertuning_dmax0.1": "fishertune_dmax0.1",
                                                "supertuning": "fishertune"}
    assert dg._label("supertuning_dmax0.05").endswith(", δ_max = 0.05")
    flat = dg.plan(_args(), "flat")
    assert flat == [("fishertune", "fishertune", {}),
                    ("fishertune_flat", "fishertune", {"delta_min": 0.15, "delta_max": 0.15}),
                    ("magnitude", "magnitude", {}),
                    ("magnitude_flat", "magnitude", {"delta_min": 0.15, "delta_max": 0.15}),
                    ("fishertune_flat_no_pull", "fishertune", {"delta_min": 0.15, "delta_max": 0.15,
                                                               "prior_pull": False})]
    assert dg.references("flat", flat) == {"fishertune_flat": "fishertune", "magnitude_flat": "magnitude",
                                           "fishertune_flat_no_pull": "fishertune"}
    assert dg._label("magnitude_flat").endswith(", flat schedule")
    support = dg.plan(_args(), "support")
    assert [n for n, _, _ in support] == ["magnitude_flat", "magnitude_flat_per_layer", "magnitude_flat_200_steps",
                                          "magnitude_flat_no_pull", "magnitude_as_supertuning", "supertuning"]
    assert support[3][2] == {"delta_min": 0.15, "delta_max": 0.15, "prior_pull": False}
    assert support[4][2] == {"delta_min": 0.15, "delta_max": 0.15, "scope": "per_tensor", "stage2_steps": 0,
                             "stage3_steps": 200, "prior_pull": False}
    assert support[1][2]["scope"] == "per_tensor"
    assert support[2][2] == {"delta_min": 0.15, "delta_max": 0.15, "stage2_steps": 0, "stage3_steps": 200}
    assert set(dg.references("support", support).values()) == {"supertuning"}
    assert dg._label("magnitude_flat_200_steps").endswith(", flat schedule, 200 backbone steps")
    mode = dg.plan(_args(), "fisher_mode")
    assert mode == [("fishertune", "fishertune", {}), ("fishertune_per_sample", "fishertune", {"fisher_mode": "per_sample"})]
    assert dg.references("fisher_mode", mode) == {"fishertune_per_sample": "fishertune"}
    assert dg._label("fishertune_per_sample").endswith(", per-sample Fisher")
    assert set(dg.SWEEP_TITLES) == set(dg.SWEEPS)  # every sweep's report has its title
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


def test_run_key_ignores_the_output_folder_and_follows_config_code_and_inputs():
    dg = _load()
    cfg = {"model": {"backbone": "dinov2"}, "method": {"name": "fim"}, "training": {"output_dir": "a", "seed": 0}}
    key = dg.run_key(cfg, "code1", {"data": {"train": 4}})
    assert dg.run_key({**cfg, "training": {"output_dir": "b", "seed": 0}}, "code1", {"data": {"train": 4}}) == key
    assert cfg["training"]["output_dir"] == "a"  # the caller's config is left alone
    assert dg.run_key({**cfg, "training": {"output_dir": "a", "seed": 1}}, "code1", {"data": {"train": 4}}) != key
    assert dg.run_key(cfg, "code2", {"data": {"train": 4}}) != key
    assert dg.run_key(cfg, "code1", {"data": {"train": 5}}) != key
    # a frozen backbone trains no backbone weight: its lr is left out of the key (one freeze run serves every lr)
    frz = {"method": {"name": "freeze"}, "training": {"output_dir": "a", "seed": 0, "backbone_lr": 1e-4}}
    assert dg.run_key(frz, "c", {}) == dg.run_key({**frz, "training": {**frz["training"], "backbone_lr": 1e-3}}, "c", {})
    full = {**frz, "method": {"name": "full"}}
    assert dg.run_key(full, "c", {}) != dg.run_key({**full, "training": {**frz["training"], "backbone_lr": 1e-3}},
                                                   "c", {})

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


def test_premise_figures():
    """gap = source - held-out avg per seed; full's gap minus freeze's, paired by seed; holds at >= 2 with 3 seeds."""
    _load()  # puts benchmarks/ on sys.path
    import dg_premise

    def rec(name, seed, src, fog, snow):
        return {"name": name, "seed": seed, "table": {"clean (source)": src, "fog": fog, "snow": snow}}

    recs = [rec("freeze", 0, 40.0, 30.0, 32.0), rec("freeze", 1, 42.0, 31.0, 33.0), rec("freeze", 2, 41.0, 30.0, 34.0),
            rec("full", 0, 50.0, 32.0, 34.0), rec("full", 1, 53.0, 33.0, 35.0), rec("full", 2, 52.0, 31.0, 35.0)]
    p = dg_premise.premise(recs, ["fog", "snow"])
    assert p["frozen"]["gap"][0] == pytest.approx((9 + 10 + 9) / 3)  # 40-31, 42-32, 41-32
    assert p["widening_per_seed"] == pytest.approx([8.0, 9.0, 10.0])  # (50-33)-(9), (53-34)-10, (52-33)-9
    assert p["holds"] is True and p["seeds"] == [0, 1, 2]
    assert p["frozen_transfer_ratio"][0] == pytest.approx((31 / 40 + 32 / 42 + 32 / 41) / 3)
    small = [r if r["name"] == "freeze" else {**r, "table": {**r["table"], "clean (source)": r["table"]["fog"] + 10}}
             for r in recs]  # full's source = fog + 10: gaps 9, 9, 8 against freeze's 9, 10, 9
    q = dg_premise.premise(small, ["fog", "snow"])
    assert q["widening"][0] < 2 and q["holds"] is False
    assert dg_premise.premise(recs[:3], ["fog", "snow"]) is None  # no full row: no premise figures
    two = dg_premise.premise([r for r in recs if r["seed"] < 2], ["fog", "snow"])
    assert two["holds"] is False and two["holds_with_fewer_seeds"] is True  # 3 seeds are required
    md = "\n".join(dg_premise.premise_markdown(p))
    assert "**holds**" in md and "+8.00, +9.00, +10.00" in md
    assert "**does not hold**" in "\n".join(dg_premise.premise_markdown(q))


def test_regimes_set_defaults_and_given_options_win():
    dg = _load()
    default = dg.parse_args([])
    assert default.regime == "default" and default.standin is None and default.backbone_lr == 1e-4
    assert default.name == "dg_benchmark" and default.workdir == dg.ROOT / "outputs" / "dg_benchmark"
    prem = dg.parse_args(["--regime", "premise"])
    assert prem.standin == "categories" and prem.backbone_lr == 1e-3 and prem.name == "dg_premise"
    assert prem.workdir == dg.ROOT / "outputs" / "dg_premise"
    assert prem.stages == dg.REGIMES["premise"].get("stages", [100, 20, 180])
    assert dg.parse_args(["--regime", "premise", "--backbone-lr", "3e-4"]).backbone_lr == 3e-4
    with pytest.raises(SystemExit):
        dg.parse_args(["--regime", "nope"])


def _bench(work, out, *extra, env=None):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dg_benchmark.py"), "--quick",
                           "--workdir", str(work), "--out", str(out), "--jobs", "2", "--threads", "1",
                           "--code-version", "pinned-by-test", *extra],
                          capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def quick_main(tmp_path_factory):
    """One quick main comparison (freeze, FIM-only, FisherTune x seeds 0, 1) in a workdir the tests below share."""
    root = tmp_path_factory.mktemp("dg")
    _bench(root / "work", root / "main")
    return root


def test_dg_benchmark_quick(quick_main):
    out = quick_main / "main"
    md = (out / "dg_benchmark_quick.md").read_text()
    assert "| freeze (decoder only) |" in md and "| FisherTune (variational DR-FIM, exp) |" in md
    assert "sliding window 64" in md and "Wall time" in md and "regime `default`" in md
    data = json.loads((out / "dg_benchmark_quick.json").read_text())
    assert {r["method"] for r in data["records"]} == {"freeze", "fim", "fishertune"}
    assert sorted({r["seed"] for r in data["records"]}) == [0, 1]
    assert not any(r["cached"] for r in data["records"])
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
    assert data["premise"] is None and "Premise check" not in md  # no full fine-tuning row
    lines = [json.loads(x) for x in (out / "dg_benchmark_quick.jsonl").read_text().splitlines()]
    assert "--quick" in lines[0]["command"] and len(lines) == 1 + 6  # a header, then one line per run
    assert [(x["name"], x["seed"], x["table"]) for x in lines[1:]] == [(r["name"], r["seed"], r["table"])
                                                                      for r in data["records"]]


def test_dg_benchmark_quick_lambda_sweep_reuses_the_main_run(quick_main):
    out = quick_main / "lambda"
    _bench(quick_main / "work", out, "--seeds", "0", "--sweep", "lambda")
    data = json.loads((out / "dg_benchmark_quick_sweep_lambda.json").read_text())
    assert data["sweep"] == "lambda"
    assert [(r["name"], r["cached"]) for r in data["records"]] == [("fishertune", True), ("fishertune_lambda1.0", False)]
    assert data["overlaps"]["between_rows"]["fishertune | fishertune_lambda1.0"][2] == 1
    md = (out / "dg_benchmark_quick_sweep_lambda.md").read_text()
    assert "Sweep `lambda`" in md and "FisherTune, λ = 1.0" in md
    assert "n/a (one seed)" in md


def test_dg_benchmark_caches_runs_across_invocations(quick_main):
    """A second invocation takes every run from the cache (nothing trains); a changed setting misses it; the new
    baseline rows are accepted and Super-Tuning's support counts as an active set."""
    work, out = quick_main / "work", quick_main / "again"
    first = json.loads((quick_main / "main" / "dg_benchmark_quick.json").read_text())
    logs = [work / "runs" / f"{r['name']}_seed{r['seed']}_{r['key'][:10]}" / "stdout.log" for r in first["records"]]
    stamps = [p.stat().st_mtime_ns for p in logs]
    entries = len(list((work / "cache").glob("*.json")))

    stdout = _bench(work, out)
    again = json.loads((out / "dg_benchmark_quick.json").read_text())
    assert all(r["cached"] for r in again["records"]) and stdout.count(", cached ") == 6
    assert [(r["key"], r["table"]) for r in again["records"]] == [(r["key"], r["table"]) for r in first["records"]]
    assert [p.stat().st_mtime_ns for p in logs] == stamps  # nothing trained again
    assert "6 of 6 runs from the run cache" in (out / "dg_benchmark_quick.md").read_text()
    assert len(list((work / "cache").glob("*.json"))) == entries

    _bench(work, out, "--seeds", "0", "--methods", "freeze", "supertuning", "fim", "--backbone-lr", "2e-4")
    changed = {r["method"]: r for r in json.loads((out / "dg_benchmark_quick.json").read_text())["records"]}
    assert changed["freeze"]["cached"] is True  # the frozen backbone's run does not depend on the backbone lr
    assert changed["fim"]["cached"] is False and changed["supertuning"]["cached"] is False
    assert changed["fim"]["key"] not in {r["key"] for r in first["records"]}
    assert len(list((work / "cache").glob("*.json"))) == entries + 2
    assert len(_load().active_set(changed["supertuning"]["adapter_dir"])) > 0


def test_premise_regime_quick(tmp_path):
    """--regime premise trains on its stand-in (with --quick: the tiny `categories_quick`, pretrained into the cache
    on first use) and reports the premise check when freeze and full fine-tuning are both rows."""
    env = {**os.environ, "PEFT_FISHERTUNE_CACHE": str(tmp_path / "cache")}
    _bench(tmp_path / "work", tmp_path / "out", "--regime", "premise", "--methods", "freeze", "full", "--seeds", "0",
           env=env)
    assert len(list((tmp_path / "cache" / "standin").glob("categories_quick-*"))) == 1
    md = (tmp_path / "out" / "dg_premise_quick.md").read_text()
    assert "regime `premise`, backbone stand-in `categories_quick`" in md and "backbone lr 0.001" in md
    data = json.loads((tmp_path / "out" / "dg_premise_quick.json").read_text())
    p = data["premise"]
    assert p["seeds"] == [0] and p["holds"] is False  # one seed never satisfies it
    assert p["widening_per_seed"][0] == pytest.approx(p["full"]["gap"][0] - p["frozen"]["gap"][0])
    assert "Premise check" in md and ("(3 needed)" in md or "**does not hold**" in md)
    assert data["records"][0]["table"]["clean (source)"] >= 0.0


def test_dg_benchmark_quick_delta_max_sweep_and_its_plot(quick_main):
    """The δ_max sweep (Fig. 2): FisherTune and Super-Tuning at the same sizes, FisherTune's δ_max = 15 % run taken
    from the main comparison, Super-Tuning's support growing with δ_max, and the figure written."""
    out = quick_main / "delta_max"
    _bench(quick_main / "work", out, "--seeds", "0", "--sweep", "delta_max")
    data = json.loads((out / "dg_benchmark_quick_sweep_delta_max.json").read_text())
    assert [(r["name"], r["cached"]) for r in data["records"]] == [
        ("fishertune_dmax0.05", False), ("supertuning_dmax0.05", False), ("fishertune", True), ("supertuning", False)]
    assert set(data["paired_differences"]) == {"supertuning_dmax0.05", "supertuning"}
    by_name = {r["name"]: r for r in data["records"]}
    assert by_name["fishertune_dmax0.05"]["selection"]["num_active"] < by_name["fishertune"]["selection"]["num_active"]
    md = (out / "dg_benchmark_quick_sweep_delta_max.md").read_text()
    assert "Sweep `delta_max`" in md and "Super-Tuning, δ_max = 0.05" in md and "FisherTune, δ_max = 0.05" in md
    assert (out / "dg_benchmark_quick_sweep_delta_max.png").stat().st_size > 1000
