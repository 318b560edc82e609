"""Does FisherTune help on data it never saw? Every baseline, same budget, several seeds, held-out styles.

    python benchmarks/dg_benchmark.py                       # the full comparison (~1 h on 2 CPU cores)
    python benchmarks/dg_benchmark.py --quick               # a smoke run (tiny model, 2 seeds, 3 methods)
    python benchmarks/dg_benchmark.py --sweep t2 lambda gamma_tau   # the sweeps of issue 12 (see below)
    python benchmarks/dg_benchmark.py --regime premise      # the regime where the DG premise holds (below)

The stand-in for a vision foundation model is a small DINOv2 pretrained self-supervised (SimMIM) on
unlabeled images of *all* synthetic styles (scripts/pretrain_standin.py; built and cached if missing).
The domain-generalization task: fine-tune on labeled images of the clean style only, test on the held-out
styles: the GTA5-like "synthetic" style and the ACDC-like fog / night / rain / snow.

Regimes (`--regime`, dg_premise.py; given options override a regime's values): `default`, the historical one above;
`premise`, the stand-in `categories` (the demo's 4-block width-128 DINOv2 pretrained supervised on the 7 Cityscapes
categories of every style, so its frozen features transfer across styles; a new 19-class head downstream) at
backbone lr 1e-3, outputs `dg_premise*` and workdir outputs/dg_premise. `--standin PRESET` picks any stand-in preset.
Whenever freeze and full fine-tuning are both rows, the report checks the premise: full fine-tuning's
(source - held-out) gap minus freeze's, per seed; it holds at >= 2 points over 3 seeds (docs/benchmarks.md). Cost of `--regime premise` (2026-12-04, 2 cores loaded by other jobs, 2 runs at a time):
the stand-in ~26 min once, runs 1.5-4 min each; the 13-row main table (39 runs) ~50 min, split as
`--methods freeze full` (premise check), then `freeze full fishertune fim random magnitude supertuning`, then
`freeze full lora dora rein soma shira drfim_empirical`, then all rows from the cache.

Rows (`--methods`, default all): freeze, full fine-tuning, LoRA, DoRA, Rein, SoMA, SHiRA, Super-Tuning, random
sparse selection, magnitude sparse selection, FIM-only, DR-FIM (empirical), FisherTune (variational DR-FIM + exp
schedule) (what each trains: docs/training.md, "Baselines"); ablations of λ (supplementary Table 1) and of the
schedule (Table 2). Every run is `scripts/train.py` with the same stage lengths and seeds; `--jobs` runs go side by
side (default 2, `--threads` 1 each).

Resumable: every (method, seed, setting) result is cached in <workdir>/cache/<key>.json, the key a hash of the run's
resolved config (output_dir aside), the code version (a hash of src/peft_fishertune/**.py, scripts/train.py and the
torch / transformers / peft versions) and the inputs it names by path (the synthetic data's generation settings,
the stand-in VFM's content hash). A later invocation reuses every finished run whose key matches, whatever row or
sweep asks for it, so a table can be built over several invocations (e.g. `--methods` subsets, then all of them)
and rerun for free; an interrupted invocation loses only its unfinished runs. `--rerun` ignores the cache. Run
folders are <workdir>/runs/<row>_seed<seed>_<key[:10]>; the data <workdir>/data_<hash of its settings>.
Writes benchmarks/results/dg_benchmark.{md,json,png}: mean ± std mIoU per target and on average, the wall
time and every setting.

Beside every mIoU table: the Jaccard overlap of the final active sets (the elements each sparse run saved in its
adapter) between the sparse methods, per seed then mean ± std, and across seeds for the same method (how stable a
selection is), plus paired per-seed differences of the held-out average against a reference row, with a t statistic
(df = seeds - 1) and whether the difference is distinguishable from seed noise at 95 % (|t| > t_0.975).

Sweeps (`--sweep`, one output file each, `<name>_sweep_<sweep>.{md,json}`; rows whose settings equal a main row
reuse that run from the cache):
    t2         stage-2 length 20 / 100 / 300 (T1, T3 fixed) for DR-FIM (empirical) and FIM-only; reference FIM-only
               at the same T2; Jaccard DR-FIM vs FIM-only per T2 and each method's cross-seed stability
    lambda     FisherTune with λ = 0, 0.3, 0.5, 0.7, 1 (supplementary Table 1); reference λ = 0.5
    gamma_tau  FisherTune on the 3x3 grid γ, τ in 0.005 / 0.01 / 0.02 (Fig. 3); reference γ = τ = 0.01
    prior_pull FIM-only and FisherTune with Eq. 7's prior pull off (`prior_pull: false`); reference: the same
               method with the pull (the default)
    delta_max  FisherTune and Super-Tuning at δ_max = 1 / 5 / 10 / 15 % (the paper's Fig. 2; Super-Tuning's
               sparsity is 1 - δ_max, the same count); reference FisherTune at the same δ_max. FisherTune keeps
               delta_min 1 %, so at δ_max = 1 % its schedule is flat
    flat       FisherTune and magnitude sparse with a flat schedule (δ_min = δ_max = 15 %: every selected element
               trains from the first stage-3 step), and FisherTune flat without the prior pull; reference: the same
               method with its growing schedule
    support    flat magnitude sparse (FisherTune's machinery, |w| scores, global top-k), the same per layer
               (`scope: per_tensor`, Super-Tuning's top-k), and the same trained from the end of stage 1 for
               T2 + T3 steps (Super-Tuning's steps), and all three with no prior pull (Super-Tuning's whole
               setting, `magnitude_as_supertuning`); reference: Super-Tuning
    fisher_mode FisherTune with the per-sample Fisher (`fisher_mode: per_sample`: FisherTuneConfig's default and the
               paper configs'; every other row runs `batch`, the fast proxy); reference: FisherTune (batch)
Cost measured on 2 cores, 2 runs at a time (2026-12-03; ~3.3 min per default run): main with --no-ablations and the
8 rows of then (24 runs) 99 min (the 13 rows of now: ~2.7 h, so split it: e.g. `--methods` of 6 rows, then 7, then
all 13 from the cache); t2 12 new runs (longer ones) ~55 min; lambda 12 new runs ~22 min; gamma_tau 24 new runs ~45 min; prior_pull
6 new runs ~15 min. `--seeds 0 1 2` keeps the 3 seeds the paired differences need; fewer seeds or values are quicker.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dg_premise import QUICK_STANDIN, REGIMES, premise  # noqa: E402
from dg_report import (  # noqa: E402,F401
    LABELS,
    _label,
    _mean_sd,
    _t_crit,
    active_set,
    diff_markdown,
    jaccard,
    markdown,
    overlap_markdown,
    overlaps,
    paired_differences,
    plot_delta_max,
    summarize,
    trainable_count,
)

TARGETS = ["synthetic", "fog", "night", "rain", "snow"]
MAIN = ["freeze", "full", "lora", "dora", "rein", "soma", "shira", "supertuning", "random", "magnitude", "fim",
        "drfim_empirical", "fishertune"]
# rows whose saved adapter holds an element set (FisherTune layers, or Super-Tuning's indices): Jaccard overlaps
SPARSE = ("random", "magnitude", "supertuning", "fim", "drfim_empirical", "fishertune")
CACHE_FORMAT = 1
SWEEP_TITLES = {"t2": "stage-2 length, DR-FIM (empirical) vs FIM-only",
                "delta_max": "δ_max, the final active fraction: FisherTune vs Super-Tuning at the same size (Fig. 2)",
                "flat": "the growing schedule against a flat one (δ = δ_max from the selection on), FisherTune and magnitude",
                "support": "flat magnitude sparse against Super-Tuning: per-layer top-k, and Super-Tuning's 200 steps",
                "lambda": "λ of the DR-FIM combination (supplementary Table 1)",
                "gamma_tau": "γ / τ grid of the variational estimate (Fig. 3)",
                "prior_pull": "Eq. 7's prior pull on the active deltas, on (default) and off",
                "fisher_mode": "the per-sample Fisher (FisherTuneConfig's default, the paper configs') against batch mode"}


def run_config(args, method: str, seed: int, extra: dict, out: Path) -> dict:
    extra = dict(extra)
    t2 = extra.pop("stage2_steps", args.stages[1])  # the t2 / support sweeps' knobs; the rest: FisherTuneConfig fields
    t3 = extra.pop("stage3_steps", args.stages[2])
    model = {"backbone": "dinov2", "decoder": args.decoder, "pyramid_channels": 64}
    if args.quick and not args.standin:
        model["tiny_backbone"] = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
                                  "intermediate_size": 64, "patch_size": 8, "image_size": 64}
    else:
        model["model_name_or_path"] = str(args.vfm)
    ft = {"delta_min": 0.01, "delta_max": 0.15, "schedule": "exp", "lambda_dr": 0.5,
          "fisher_estimator": "variational", "fisher_mode": "batch", **extra}
    data_root = args.data_root
    size = args.crop
    return {
        "model": model,
        "data": {
            "train": {"name": "cityscapes", "root": str(data_root / "clean"), "split": "train"},
            "eval": [{"name": "cityscapes", "root": str(data_root / "clean"), "split": "val", "label": "clean (source)",
                      "max_images": args.eval_images}]
                    + [{"name": "cityscapes", "root": str(data_root / t), "split": "val", "label": t,
                        "max_images": args.eval_images} for t in args.targets],
            "crop_size": [size, size], "base_scale": list(args.image_size), "test_scale": list(args.image_size),
            "eval_mode": "slide", "window": [size, size], "stride": [size * 2 // 3, size * 2 // 3],
        },
        "method": {"name": method, "lora_r": 16, "selection_update_steps": 1, "fishertune": ft},
        "training": {"output_dir": str(out), "stage1_steps": args.stages[0], "stage2_steps": t2,
                     "stage3_steps": t3, "per_device_train_batch_size": args.batch,
                     "backbone_lr": args.backbone_lr, "decoder_lr": args.decoder_lr, "weight_decay": 0.01,
                     "logging_steps": 25, "use_cpu": True, "report_to": [], "disable_tqdm": True, "seed": seed,
                     "dataloader_num_workers": 0},
    }


# ------------------------------------------------------------------------------------------ the run cache
def _hash_files(root: Path, paths) -> str:
    """sha256 over (path relative to root, content) of each file, in the given order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(Path(p).relative_to(root)).encode() + b"\0")
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def code_version(root: Path = ROOT) -> str:
    """A hash of what a run executes: the package's Python sources, scripts/train.py and the versions of torch,
    transformers and peft. Any edit there (committed or not) makes every cached run miss (`--code-version` pins it
    instead)."""
    import peft
    import torch
    import transformers

    files = sorted((root / "src" / "peft_fishertune").rglob("*.py")) + [root / "scripts" / "train.py"]
    h = hashlib.sha256(_hash_files(root, files).encode())
    h.update(f"torch {torch.__version__} transformers {transformers.__version__} peft {peft.__version__}".encode())
    return h.hexdigest()[:16]


def data_settings(args) -> dict:
    """What the generated synthetic data depends on (it lives in a folder named by their hash)."""
    return {"styles": ["clean", *args.targets], "train": args.train_images, "val": args.eval_images,
            "size": list(args.image_size), "seed": 1234}


def run_key(config: dict, code: str, inputs: dict) -> str:
    """The cache key of one run: its resolved train.py config (without output_dir), the code version and the
    inputs the config names by path (the data's generation settings, the stand-in VFM's content hash)."""
    c = copy.deepcopy(config)
    c["training"].pop("output_dir", None)
    if c.get("method", {}).get("name") == "freeze":  # no backbone weight trains: its lr changes nothing
        c["training"].pop("backbone_lr", None)
    blob = json.dumps({"format": CACHE_FORMAT, "config": c, "code": code, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _atomic_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def one_run(args, name: str, method: str, seed: int, extra: dict) -> dict:
    """One (method, seed, setting): from the cache when a run of the same key finished before (and not --rerun),
    else train it (scripts/train.py in a subprocess) and cache its result."""
    config = run_config(args, method, seed, extra, Path("."))
    key = run_key(config, args.code_version, args.inputs)
    out = args.workdir / "runs" / f"{name}_seed{seed}_{key[:10]}"
    config["training"]["output_dir"] = str(out)
    entry = args.workdir / "cache" / f"{key}.json"
    if entry.is_file() and not args.rerun:
        res = json.loads(entry.read_text())["result"]
        cached = True
    else:
        shutil.rmtree(out, ignore_errors=True)  # an interrupted earlier attempt: start clean
        out.mkdir(parents=True)
        cfg = out / "config.yaml"
        cfg.write_text(yaml.safe_dump(config))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        t0 = time.time()
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(cfg)],
                              capture_output=True, text=True, env=env)
        (out / "stdout.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"run {name} seed {seed} failed (exit {proc.returncode}); see {out / 'stdout.log'}")
        full = json.loads((out / "results.json").read_text())
        res = {k: full.get(k) for k in ("table", "wall_time_s", "selection", "adapter_dir", "model_dir")}
        res["subprocess_wall_s"] = time.time() - t0
        _atomic_json(entry, {"key": key, "code_version": args.code_version, "inputs": args.inputs,
                             "config": config, "name": name, "method": method, "seed": seed, "extra": extra,
                             "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "result": res})
        cached = False
    return {"name": name, "method": method, "seed": seed, "extra": extra, "table": res["table"],
            "wall_time_s": res["wall_time_s"], "selection": res.get("selection"), "adapter_dir": res.get("adapter_dir"),
            "model_dir": res.get("model_dir") or (str(out / "model") if method == "full" else None),
            "key": key, "cached": cached}


SWEEPS = ("t2", "lambda", "gamma_tau", "prior_pull", "delta_max", "flat", "support", "fisher_mode")
T2_VALUES, LAMBDAS, GRID = (20, 100, 300), (0.0, 0.3, 0.5, 0.7, 1.0), (0.005, 0.01, 0.02)
DELTA_MAX_VALUES = (0.01, 0.05, 0.10, 0.15)
DEFAULT_FT = {"lambda_dr": 0.5, "gamma": 0.01, "tau": 0.01, "delta_max": 0.15}


def plan(args, sweep: str | None = None) -> list[tuple[str, str, dict]]:
    """(run name, method, extra settings) of the main comparison or of one sweep. A run whose settings are the
    main row's keeps the main row's name, so the workdir's finished run is reused."""
    if sweep is None:
        runs = [(m, m, {}) for m in args.methods]
        if args.ablations:
            for lam in (0.0, 0.25, 0.75, 1.0):
                runs.append((f"fishertune_lambda{lam}", "fishertune", {"lambda_dr": lam}))
            for sched in ("linear", "cosine"):
                runs.append((f"fishertune_{sched}", "fishertune", {"schedule": sched}))
        return runs
    if sweep == "t2":
        values = args.t2_values or T2_VALUES
        return [(m if t2 == args.stages[1] else f"{m}_t2_{t2}", m, {} if t2 == args.stages[1] else {"stage2_steps": t2})
                for t2 in values for m in ("fim", "drfim_empirical")]
    if sweep == "lambda":
        return [("fishertune" if lam == DEFAULT_FT["lambda_dr"] else f"fishertune_lambda{lam}", "fishertune",
                 {} if lam == DEFAULT_FT["lambda_dr"] else {"lambda_dr": lam}) for lam in (args.lambdas or LAMBDAS)]
    if sweep == "gamma_tau":
        grid = args.grid or GRID
        return [("fishertune" if (g, t) == (DEFAULT_FT["gamma"], DEFAULT_FT["tau"]) else f"fishertune_gamma{g}_tau{t}",
                 "fishertune", {} if (g, t) == (DEFAULT_FT["gamma"], DEFAULT_FT["tau"]) else {"gamma": g, "tau": t})
                for g in grid for t in grid]
    if sweep == "prior_pull":
        return [r for m in ("fim", "fishertune") for r in ((m, m, {}), (f"{m}_no_pull", m, {"prior_pull": False}))]
    if sweep == "flat":  # δ_min = δ_max: every selected element trains from the first stage-3 step
        d = DEFAULT_FT["delta_max"]
        return [r for m in ("fishertune", "magnitude")
                for r in ((m, m, {}), (f"{m}_flat", m, {"delta_min": d, "delta_max": d}))] + [
            ("fishertune_flat_no_pull", "fishertune", {"delta_min": d, "delta_max": d, "prior_pull": False})]
    if sweep == "support":  # what separates flat magnitude sparse (FisherTune's machinery) from Super-Tuning
        d = DEFAULT_FT["delta_max"]
        flat = {"delta_min": d, "delta_max": d}
        t1, t2, t3 = args.stages
        return [("magnitude_flat", "magnitude", flat),
                ("magnitude_flat_per_layer", "magnitude", {**flat, "scope": "per_tensor"}),
                # the backbone trains from the end of stage 1, as Super-Tuning does (same total steps)
                (f"magnitude_flat_{t2 + t3}_steps", "magnitude", {**flat, "stage2_steps": 0, "stage3_steps": t2 + t3}),
                ("magnitude_flat_no_pull", "magnitude", {**flat, "prior_pull": False}),
                # all of Super-Tuning's setting at once, and no prior pull (Super-Tuning has none)
                ("magnitude_as_supertuning", "magnitude", {**flat, "scope": "per_tensor", "stage2_steps": 0,
                                                           "stage3_steps": t2 + t3, "prior_pull": False}),
                ("supertuning", "supertuning", {})]
    if sweep == "fisher_mode":  # the main rows run batch mode; FisherTuneConfig's default (the paper configs') is per_sample
        return [("fishertune", "fishertune", {}), ("fishertune_per_sample", "fishertune", {"fisher_mode": "per_sample"})]
    if sweep == "delta_max":  # Super-Tuning's sparsity follows delta_max (1 - δ_max): the same number of entries
        return [(m if d == DEFAULT_FT["delta_max"] else f"{m}_dmax{d:g}", m,
                 {} if d == DEFAULT_FT["delta_max"] else {"delta_max": d})
                for d in (args.delta_max_values or DELTA_MAX_VALUES) for m in ("fishertune", "supertuning")]
    raise ValueError(f"sweep={sweep!r}; expected one of {SWEEPS}")


def references(sweep: str | None, runs: list[tuple[str, str, dict]]) -> dict[str, str]:
    """Row -> the row it is compared with, seed by seed."""
    names = [r[0] for r in runs]
    if sweep is None:  # every row against FisherTune (the method under test)
        ref = "fishertune" if "fishertune" in names else names[0]
        return {n: ref for n in names if n != ref}
    if sweep == "t2":
        return {n: ("fim" if "_t2_" not in n else f"fim_t2_{n.rsplit('_', 1)[1]}")
                for n, m, _ in runs if m == "drfim_empirical"}
    if sweep == "support":
        return {n: "supertuning" for n, m, _ in runs if m != "supertuning"}
    if sweep in ("prior_pull", "flat"):
        return {n: m for n, m, _ in runs if n != m}
    if sweep == "delta_max":  # Super-Tuning against FisherTune at the same δ_max
        return {n: n.replace("supertuning", "fishertune") for n, m, _ in runs if m == "supertuning"}
    return {n: "fishertune" for n in names if n != "fishertune" and "fishertune" in names}


def write_jsonl(path: Path, recs: list[dict], command: str, settings: dict, wall: float) -> None:
    """One line per run (row, seed, mIoU table, training time, cache key, whether it came from the cache), after a
    header line with the command, the settings and the invocation's wall time: small enough to commit (the .json
    beside it holds the overlaps and differences too, and is not committed)."""
    keep = ("name", "method", "seed", "extra", "table", "wall_time_s", "key", "cached")
    lines = [json.dumps({"command": command, "wall_time_s": wall, "settings": settings})]
    lines += [json.dumps({k: r.get(k) for k in keep}) for r in recs]
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    """The options, with the chosen --regime's values as defaults and --quick's tiny settings applied."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--regime", choices=sorted(REGIMES), default="default")
    regime = pre.parse_known_args(argv)[0].regime
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regime", choices=sorted(REGIMES), default="default",
                    help="a named setting: its values become the defaults of the options below (given options "
                         "win); 'premise' = the regime where the DG premise holds (docs/benchmarks.md)")
    ap.add_argument("--quick", action="store_true", help="tiny random model, 2 seeds, freeze + FIM-only + fishertune, few steps (sweeps: 2 values each)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=None, choices=MAIN,
                    help="rows of the main comparison (default: all; --quick: freeze fim fishertune)")
    ap.add_argument("--no-ablations", dest="ablations", action="store_false")
    ap.add_argument("--stages", type=int, nargs=3, default=[100, 20, 180], metavar=("T1", "T2", "T3"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--image-size", type=int, nargs=2, default=[256, 128])
    ap.add_argument("--train-images", type=int, default=200)
    ap.add_argument("--eval-images", type=int, default=30)
    ap.add_argument("--targets", nargs="+", default=TARGETS)
    ap.add_argument("--decoder", default="linear", choices=["linear", "upernet", "mask2former"])
    ap.add_argument("--backbone-lr", type=float, default=1e-4)
    ap.add_argument("--decoder-lr", type=float, default=1e-3)
    ap.add_argument("--jobs", type=int, default=2, help="independent runs side by side (each --threads threads); "
                    "cached runs take no slot")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--vfm", type=Path, default=None, help="stand-in VFM checkpoint (default: the pretrain cache)")
    from peft_fishertune.standin import STANDIN_PRESETS

    ap.add_argument("--standin", choices=sorted(STANDIN_PRESETS), default=None,
                    help="backbone: this stand-in preset (standin:<preset>, built and cached on first use) instead of "
                         "the SimMIM stand-in `default`; with --quick its tiny twin")
    ap.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "dg_benchmark")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--code-version", default=None,
                    help="pin the code-version part of the cache key (default: a hash of the sources); e.g. to keep "
                         "runs across an edit known to change no number. You vouch for that: a wrong pin reuses "
                         "stale results")
    ap.add_argument("--rerun", action="store_true", help="ignore the run cache: train every run again (and re-cache it)")
    ap.add_argument("--name", default="dg_benchmark", help="file stem of the outputs under --out")
    ap.add_argument("--sweep", nargs="+", choices=SWEEPS, default=None,
                    help="run these sweeps instead of the main comparison (one output file each)")
    ap.add_argument("--t2-values", type=int, nargs="+", default=None, help=f"t2 sweep (default {T2_VALUES})")
    ap.add_argument("--lambdas", type=float, nargs="+", default=None, help=f"lambda sweep (default {LAMBDAS})")
    ap.add_argument("--grid", type=float, nargs="+", default=None, help=f"gamma_tau sweep values (default {GRID})")
    ap.add_argument("--delta-max-values", type=float, nargs="+", default=None,
                    help=f"delta_max sweep values (default {DELTA_MAX_VALUES})")
    reg = dict(REGIMES[regime])
    workdir_name = reg.pop("workdir_name", None)
    if workdir_name:
        reg["workdir"] = ROOT / "outputs" / workdir_name
    ap.set_defaults(**reg)
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.ablations = args.seeds[:2], False
        args.methods = args.methods or ["freeze", "fim", "fishertune"]
        args.stages, args.batch, args.crop, args.image_size = [1, 1, 2], 2, 64, [128, 64]
        args.train_images, args.eval_images, args.targets = 4, 2, ["fog"]
        args.delta_max_values = args.delta_max_values or [0.05, 0.15]
        args.t2_values, args.lambdas, args.grid = args.t2_values or [1, 2], args.lambdas or [0.5, 1.0], \
            args.grid or [0.01, 0.02]
    args.methods = args.methods or list(MAIN)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/dg_benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    from peft_fishertune.data import generate_synthetic_domains

    gen = data_settings(args)
    args.data_root = args.workdir / ("data_" + hashlib.sha256(json.dumps(gen, sort_keys=True).encode()).hexdigest()[:10])
    if not (args.data_root / "synthetic_domains.json").is_file():
        generate_synthetic_domains(args.data_root, styles=tuple(gen["styles"]),
                                   num_images={"train": gen["train"], "val": gen["val"]},
                                   size=tuple(gen["size"]), seed=gen["seed"], progress=not args.quick)
    vfm_hash = None
    args.backbone_label = "tiny random DINOv2 (--quick)"
    if args.standin:
        from peft_fishertune.standin import resolve_standin

        preset = QUICK_STANDIN.get(args.standin, args.standin) if args.quick else args.standin
        args.vfm = Path(resolve_standin("standin:" + preset, progress=not args.quick))
        args.backbone_label = f"stand-in `{preset}`"
    elif args.vfm is not None and (args.vfm / "config.json").is_file():
        args.backbone_label = f"checkpoint {args.vfm}"  # used as it is, whatever pretrained it
    elif not args.quick:
        from peft_fishertune.standin import default_cache_dir, pretrain_standin

        args.vfm = Path(pretrain_standin(output_dir=args.vfm or default_cache_dir()))
        args.backbone_label = "SimMIM stand-in `default`"
    if args.vfm is not None:
        vfm_hash = _hash_files(args.vfm, sorted(p for p in args.vfm.rglob("*") if p.is_file()))
    args.code_version = args.code_version or code_version()
    args.inputs = {"data": gen, "vfm_sha256": vfm_hash}
    sections = [None] if not args.sweep else list(dict.fromkeys(args.sweep))
    runs_of = {sec: plan(args, sec) for sec in sections}
    unique = {}
    for runs in runs_of.values():
        for name, method, extra in runs:
            unique.setdefault(name, (method, extra))
    jobs = [(name, method, seed, extra) for name, (method, extra) in unique.items() for seed in args.seeds]
    records = []
    with cf.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(one_run, args, *j): j for j in jobs}
        for i, fut in enumerate(cf.as_completed(futures), 1):
            rec = fut.result()
            records.append(rec)
            avg = sum(rec["table"][t] for t in args.targets) / len(args.targets)
            print(f"[{i}/{len(jobs)}] {rec['name']} seed {rec['seed']}: held-out avg {avg:.2f} "
                  f"({rec['wall_time_s']:.0f} s{', cached ' + rec['key'] if rec['cached'] else ''})", flush=True)
    wall = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    for sec in sections:
        runs = runs_of[sec]
        order = {name: i for i, (name, _, _) in enumerate(runs)}
        recs = sorted((r for r in records if r["name"] in order), key=lambda r: (order[r["name"]], r["seed"]))
        summary = summarize(recs, args.targets)
        sparse = [n for n, m, _ in runs if m in SPARSE]
        ov = overlaps(recs, sparse)
        diffs = paired_differences(recs, references(sec, runs), args.targets)
        prem = premise(recs, args.targets) if sec is None else None
        trainable = {}
        for r in recs:  # the first seed's saved run (the count is the same in every seed of a row)
            if r["name"] not in trainable:
                try:
                    trainable[r["name"]] = trainable_count(r)
                except Exception as e:  # noqa: BLE001 - a report column, never a reason to lose the table
                    print(f"trainable count of {r['name']}: {e}", file=sys.stderr)
                    trainable[r["name"]] = None
        stem = (f"{args.name}_quick" if args.quick else args.name) + (f"_sweep_{sec}" if sec else "")
        title = None if sec is None else f"Sweep `{sec}`: {SWEEP_TITLES[sec]} (stand-in VFM, synthetic domains)"
        stages = [args.stages[0], "T2 (per row)", args.stages[2]] if sec == "t2" else None
        md = markdown(summary, args.targets, args, wall, command, title=title, ov=ov, diffs=diffs, stages=stages,
                      cached=sum(r["cached"] for r in recs), runs=len(recs), prem=prem, trainable=trainable)
        (args.out / f"{stem}.md").write_text(md)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}  # incl. code_version
        (args.out / f"{stem}.json").write_text(json.dumps({"settings": settings, "sweep": sec, "wall_time_s": wall,
                                                            "records": recs, "summary": summary, "overlaps": ov,
                                                            "paired_differences": diffs, "premise": prem},
                                                           indent=2))
        write_jsonl(args.out / f"{stem}.jsonl", recs, command, settings, wall)
        if sec is None:
            try:
                from peft_fishertune.plotting import plot_results

                plot_results([{"method": LABELS.get(r["name"], r["name"]), "target": t, "seed": r["seed"],
                               "miou": r["table"][t]} for r in recs for t in args.targets],
                             path=str(args.out / f"{stem}.png"))
            except ImportError as e:
                print(f"no plot: {e}", file=sys.stderr)
        elif sec == "delta_max":
            try:
                plot_delta_max(recs, args.targets, str(args.out / f"{stem}.png"))
            except ImportError as e:
                print(f"no plot: {e}", file=sys.stderr)
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
