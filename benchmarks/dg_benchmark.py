"""Does FisherTune help on data it never saw? Every baseline, same budget, several seeds, held-out styles.

    python benchmarks/dg_benchmark.py                       # the full comparison (~1 h on 2 CPU cores)
    python benchmarks/dg_benchmark.py --quick               # a smoke run (tiny model, 1 seed, 2 methods)

The stand-in for a vision foundation model is a small DINOv2 pretrained self-supervised (SimMIM) on
unlabeled images of *all* synthetic styles (scripts/pretrain_standin.py; built and cached if missing).
The domain-generalization task: fine-tune on labeled images of the clean style only, test on the held-out
styles: the GTA5-like "synthetic" style and the ACDC-like fog / night / rain / snow.

Rows: freeze, full fine-tuning, LoRA, random sparse selection, FIM-only, DR-FIM (empirical), FisherTune
(variational DR-FIM + exp schedule); ablations of λ (supplementary Table 1) and of the schedule (Table 2).
Every run is `scripts/train.py` with the same stage lengths and seeds; runs go 2 at a time, 1 thread each.
Writes benchmarks/results/dg_benchmark.{md,json,png}: mean ± std mIoU per target and on average, the wall
time and every setting.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["synthetic", "fog", "night", "rain", "snow"]
MAIN = ["freeze", "full", "lora", "random", "fim", "drfim_empirical", "fishertune"]
LABELS = {"freeze": "freeze (decoder only)", "full": "full fine-tuning", "lora": "LoRA r=16",
          "random": "random sparse", "fim": "FIM-only", "drfim_empirical": "DR-FIM (empirical)",
          "fishertune": "FisherTune (variational DR-FIM, exp)"}


def run_config(args, method: str, seed: int, extra: dict, out: Path) -> dict:
    model = {"backbone": "dinov2", "decoder": args.decoder, "pyramid_channels": 64}
    if args.quick:
        model["tiny_backbone"] = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
                                  "intermediate_size": 64, "patch_size": 8, "image_size": 64}
    else:
        model["model_name_or_path"] = str(args.vfm)
    ft = {"delta_min": 0.01, "delta_max": 0.15, "schedule": "exp", "lambda_dr": 0.5,
          "fisher_estimator": "variational", "fisher_mode": "batch", **extra}
    data_root = args.workdir / "data"
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
        "training": {"output_dir": str(out), "stage1_steps": args.stages[0], "stage2_steps": args.stages[1],
                     "stage3_steps": args.stages[2], "per_device_train_batch_size": args.batch,
                     "backbone_lr": args.backbone_lr, "decoder_lr": args.decoder_lr, "weight_decay": 0.01,
                     "logging_steps": 25, "use_cpu": True, "report_to": [], "disable_tqdm": True, "seed": seed,
                     "dataloader_num_workers": 0},
    }


def one_run(args, name: str, method: str, seed: int, extra: dict) -> dict:
    out = args.workdir / "runs" / f"{name}_seed{seed}"
    res_file = out / "results.json"
    if res_file.is_file() and not args.rerun:
        res = json.loads(res_file.read_text())
    else:
        out.mkdir(parents=True, exist_ok=True)
        cfg = out / "config.yaml"
        cfg.write_text(yaml.safe_dump(run_config(args, method, seed, extra, out)))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        t0 = time.time()
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(cfg)],
                              capture_output=True, text=True, env=env)
        (out / "stdout.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"run {name} seed {seed} failed (exit {proc.returncode}); see {out / 'stdout.log'}")
        res = json.loads(res_file.read_text())
        res["subprocess_wall_s"] = time.time() - t0
    return {"name": name, "method": method, "seed": seed, "extra": extra, "table": res["table"],
            "wall_time_s": res["wall_time_s"], "selection": res.get("selection")}


def plan(args) -> list[tuple[str, str, dict]]:
    runs = [(m, m, {}) for m in args.methods]
    if args.ablations:
        for lam in (0.0, 0.25, 0.75, 1.0):
            runs.append((f"fishertune_lambda{lam}", "fishertune", {"lambda_dr": lam}))
        for sched in ("linear", "cosine"):
            runs.append((f"fishertune_{sched}", "fishertune", {"schedule": sched}))
    return runs


def summarize(records: list[dict], targets: list[str]) -> dict[str, dict[str, tuple[float, float, int]]]:
    by: dict[str, dict[str, list[float]]] = {}
    for r in records:
        row = by.setdefault(r["name"], {})
        vals = [r["table"][t] for t in targets]
        for t, v in zip(targets, vals):
            row.setdefault(t, []).append(v)
        row.setdefault("avg", []).append(sum(vals) / len(vals))
        if "clean (source)" in r["table"]:
            row.setdefault("source", []).append(r["table"]["clean (source)"])
    return {name: {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in row.items()}
            for name, row in by.items()}


def markdown(summary, targets, args, wall, command) -> str:
    cols = ["source"] + targets + ["avg"]
    head = "| method | " + " | ".join(["clean (source)"] + targets + ["**avg (held-out)**"]) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for name, row in summary.items():
        label = LABELS.get(name, name.replace("fishertune_", "FisherTune, ").replace("lambda", "λ = "))
        cells = [f"{row[c][0]:.2f} ± {row[c][1]:.2f}" if c in row else "n/a" for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    n = max(v["avg"][2] for v in summary.values())
    return "\n".join([
        "# Domain-generalization benchmark (stand-in VFM, synthetic domains)", "",
        f"Command: `{command}`", "",
        f"mIoU (%), mean ± std over {n} seed(s) ({', '.join(map(str, args.seeds))}); "
        f"source = clean style (train split), targets never seen in training: {', '.join(targets)}. "
        f"Test: images at {args.image_size[0]}x{args.image_size[1]}, sliding window {args.crop} / stride "
        f"{args.crop * 2 // 3}. Stages {args.stages[0]} + {args.stages[1]} + {args.stages[2]} iterations, batch "
        f"{args.batch}, backbone lr {args.backbone_lr}, decoder lr {args.decoder_lr}, decoder `{args.decoder}`. "
        f"Wall time {wall / 60:.1f} min on {os.cpu_count()} CPU cores.", "",
        *lines, ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random model, 1 seed, freeze + fishertune, few steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=MAIN, choices=MAIN)
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
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--vfm", type=Path, default=None, help="stand-in VFM checkpoint (default: the pretrain cache)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "dg_benchmark")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--rerun", action="store_true", help="ignore finished runs in the workdir")
    ap.add_argument("--name", default="dg_benchmark", help="file stem of the outputs under --out")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.methods, args.ablations = args.seeds[:1], ["freeze", "fishertune"], False
        args.stages, args.batch, args.crop, args.image_size = [1, 1, 2], 2, 64, [128, 64]
        args.train_images, args.eval_images, args.targets = 4, 2, ["fog"]
    command = "python benchmarks/dg_benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    from peft_fishertune.data import generate_synthetic_domains

    data_root = args.workdir / "data"
    if not (data_root / "synthetic_domains.json").is_file():
        generate_synthetic_domains(data_root, styles=("clean", *args.targets),
                                   num_images={"train": args.train_images, "val": args.eval_images},
                                   size=tuple(args.image_size), seed=1234, progress=not args.quick)
    if not args.quick:
        from peft_fishertune.standin import default_cache_dir, pretrain_standin

        args.vfm = Path(pretrain_standin(output_dir=args.vfm or default_cache_dir()))
    jobs = [(name, method, seed, extra) for name, method, extra in plan(args) for seed in args.seeds]
    records = []
    with cf.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(one_run, args, *j): j for j in jobs}
        for i, fut in enumerate(cf.as_completed(futures), 1):
            rec = fut.result()
            records.append(rec)
            avg = sum(rec["table"][t] for t in args.targets) / len(args.targets)
            print(f"[{i}/{len(jobs)}] {rec['name']} seed {rec['seed']}: held-out avg {avg:.2f} "
                  f"({rec['wall_time_s']:.0f} s)", flush=True)
    order = {name: i for i, (name, _, _) in enumerate(plan(args))}
    records.sort(key=lambda r: (order[r["name"]], r["seed"]))
    summary = summarize(records, args.targets)
    wall = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.name}_quick" if args.quick else args.name
    md = markdown(summary, args.targets, args, wall, command)
    (args.out / f"{stem}.md").write_text(md)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / f"{stem}.json").write_text(json.dumps({"settings": settings, "wall_time_s": wall,
                                                        "records": records, "summary": summary}, indent=2))
    try:
        from peft_fishertune.plotting import plot_results

        plot_results([{"method": LABELS.get(r["name"], r["name"]), "target": t, "seed": r["seed"], "miou": r["table"][t]}
                      for r in records for t in args.targets], path=str(args.out / f"{stem}.png"))
    except ImportError as e:
        print(f"no plot: {e}", file=sys.stderr)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
