"""Tables of the DG benchmark (used by dg_benchmark.py): active-set overlaps, paired differences, the markdown
report."""

from __future__ import annotations

import os
import statistics

from dg_premise import premise_markdown

LABELS = {"freeze": "freeze (decoder only)", "full": "full fine-tuning", "lora": "LoRA r=16",
          "random": "random sparse", "fim": "FIM-only", "drfim_empirical": "DR-FIM (empirical)",
          "fishertune": "FisherTune (variational DR-FIM, exp)",
          "rein": "Rein (tokens + shared MLPs, every block)",
          "dora": "DoRA r=16", "soma": "SoMA (minor-component LoRA r=16, last 2/3 of the blocks)",
          "shira": "SHiRA (random support, matched size)", "supertuning": "Super-Tuning (per-layer top |w|, δ_max)",
          "magnitude": "magnitude sparse (FisherTune's schedule, |w| scores)",
          "magnitude_as_supertuning": "magnitude sparse in Super-Tuning's setting (flat, per-layer top-k, its steps, "
                                      "no prior pull)"}


# ------------------------------------------------------------------------------- active-set overlaps (Jaccard)
def active_set(adapter_dir: str) -> dict:
    """{module key: sorted flat indices} of the elements a saved FisherTune adapter holds (its final active set), or
    a Super-Tuning adapter's sparse support (`supertuning_indices`, flat positions in the weight)."""
    from safetensors.torch import load_file

    from peft_fishertune.tuner.storage import decode_layer

    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    by_layer: dict[str, dict] = {}
    for key, t in tensors.items():
        if ".ft_" in key:
            layer, suffix = key.rsplit(".", 1)
            by_layer.setdefault(layer, {})[suffix] = t
    out = {}
    for layer, ts in by_layer.items():
        flat, _ = decode_layer(layer, ts, tuple(int(d) for d in ts["ft_shape"].tolist()))
        out[layer] = flat.sort().values
    for key, t in tensors.items():
        if key.endswith(".supertuning_indices"):
            out[key.rsplit(".", 1)[0]] = t.long().sort().values
    if not out:
        raise ValueError(f"{adapter_dir}/adapter_model.safetensors holds no FisherTune layer (ft_* tensors) and no "
                         "Super-Tuning indices")
    return out


def jaccard(a: dict, b: dict) -> float:
    import torch

    inter = union = 0
    for key in set(a) | set(b):
        x, y = a.get(key), b.get(key)
        nx, ny = (0 if x is None else x.numel()), (0 if y is None else y.numel())
        both = int(torch.isin(x, y).sum()) if nx and ny else 0
        inter += both
        union += nx + ny - both
    return inter / union if union else 1.0


def overlaps(records: list[dict], names: list[str]) -> dict:
    """Jaccard of the final active sets: between rows per seed (mean ± std over seeds), and across seeds per row."""
    sets = {(r["name"], r["seed"]): active_set(r["adapter_dir"]) for r in records
            if r["name"] in names and r.get("adapter_dir")}
    rows = [n for n in names if any(k[0] == n for k in sets)]
    seeds = sorted({k[1] for k in sets})
    between = {}
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            vals = [jaccard(sets[(a, s)], sets[(b, s)]) for s in seeds if (a, s) in sets and (b, s) in sets]
            if vals:
                between[f"{a} | {b}"] = _mean_sd(vals)
    across = {}
    for n in rows:
        ss = [s for s in seeds if (n, s) in sets]
        vals = [jaccard(sets[(n, s)], sets[(n, t)]) for i, s in enumerate(ss) for t in ss[i + 1:]]
        if vals:
            across[n] = _mean_sd(vals)
    return {"between_rows": between, "across_seeds": across, "rows": rows}


def _mean_sd(vals: list[float]) -> tuple[float, float, int]:
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


# ------------------------------------------------------------------------------------- paired differences
def _t_crit(df: int) -> float:
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:  # two-sided 95 % for df = 1..5
        return {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}.get(df, 2.0)


def paired_differences(records: list[dict], refs: dict[str, str], targets: list[str]) -> dict:
    """Per seed: held-out average of row minus that of its reference; mean, sd, t (df = n - 1), verdict."""
    avg = {(r["name"], r["seed"]): sum(r["table"][t] for t in targets) / len(targets) for r in records}
    out = {}
    for name, ref in refs.items():
        seeds = sorted(s for (n, s) in avg if n == name and (ref, s) in avg)
        diffs = [avg[(name, s)] - avg[(ref, s)] for s in seeds]
        if not diffs:
            continue
        mean = statistics.mean(diffs)
        sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        n = len(diffs)
        t = mean / (sd / n**0.5) if n > 1 and sd > 0 else float("nan")
        crit = _t_crit(n - 1) if n > 1 else float("nan")
        out[name] = {"reference": ref, "seeds": seeds, "diffs": diffs, "mean": mean, "sd": sd, "t": t,
                     "t_crit_95": crit, "distinguishable": bool(n > 1 and abs(t) > crit)}
    return out


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
            row.setdefault("gap", []).append(r["table"]["clean (source)"] - sum(vals) / len(vals))
        if r.get("wall_time_s") is not None:
            row.setdefault("wall", []).append(r["wall_time_s"])
    return {name: {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in row.items()}
            for name, row in by.items()}


def _label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    for m in ("drfim_empirical", "fim", "fishertune", "supertuning", "magnitude"):
        if name.startswith(m + "_"):
            rest = name[len(m) + 1:].replace("no_pull", "no prior pull").replace("dmax", "δ_max = ").replace(
                "_per_layer", ", per-layer top-k").replace("_steps", " backbone steps").replace("flat_", "flat, ").replace(
                "flat", "flat schedule").replace("lambda", "λ = ").replace("gamma", "γ = ").replace("_tau", ", τ = ").replace(
                "per_sample", "per-sample Fisher")
            return f"{LABELS[m].split(' (')[0]}, " + rest.replace("t2_", "T2 = ")
    return name


def trainable_count(rec: dict) -> int | None:
    """Backbone values a finished run trained: the floating-point backbone tensors of its saved adapter (PEFT
    adapters; a FisherTune / Super-Tuning adapter stores exactly its active values), or of its saved model for full
    fine-tuning; 0 for freeze; None when nothing saved says it."""
    from safetensors import safe_open

    if rec.get("method") == "freeze":
        return 0
    folder = rec.get("adapter_dir")
    name = "adapter_model.safetensors"
    if not folder and rec.get("method") == "full" and rec.get("model_dir"):
        folder, name = rec["model_dir"], "model.safetensors"
    path = os.path.join(folder, name) if folder else None
    if not path or not os.path.isfile(path):
        return None
    total = 0
    with safe_open(path, "pt") as f:
        for key in f.keys():
            if "backbone" not in key:
                continue
            sl = f.get_slice(key)
            if sl.get_dtype() in ("F32", "F16", "BF16", "F64"):
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n
    return total


def markdown(summary, targets, args, wall, command, title=None, ov=None, diffs=None, stages=None, cached=0,
             runs=0, prem=None, trainable=None) -> str:
    cols = ["source"] + targets + ["avg", "gap"]
    head = "| method | " + " | ".join(["clean (source)"] + targets + ["**avg (held-out)**", "gap (source − avg)",
                                                                   "trainable (backbone)", "run wall (s)"]) + " |"
    lines = [head, "|---|" + "---:|" * (len(cols) + 2)]
    trainable = trainable or {}
    for name, row in summary.items():
        cells = [f"{row[c][0]:.2f} ± {row[c][1]:.2f}" if c in row else "n/a" for c in cols]
        t = trainable.get(name)
        cells.append(f"{t:,}" if t is not None else "n/a")
        cells.append(f"{row['wall'][0]:.0f} ± {row['wall'][1]:.0f}" if "wall" in row else "n/a")
        lines.append(f"| {_label(name)} | " + " | ".join(cells) + " |")
    n = max(v["avg"][2] for v in summary.values())
    st = stages or args.stages
    return "\n".join([
        f"# {title or 'Domain-generalization benchmark (stand-in VFM, synthetic domains)'}", "",
        f"Command: `{command}`", "",
        f"mIoU (%), mean ± std over {n} seed(s) ({', '.join(map(str, args.seeds))}); "
        f"source = clean style (train split), targets never seen in training: {', '.join(targets)}. "
        f"Test: images at {args.image_size[0]}x{args.image_size[1]}, sliding window {args.crop} / stride "
        f"{args.crop * 2 // 3}. Stages {st[0]} + {st[1]} + {st[2]} iterations, batch "
        f"{args.batch}, backbone lr {args.backbone_lr}, decoder lr {args.decoder_lr}, decoder `{args.decoder}`, "
        f"regime `{getattr(args, 'regime', 'default')}`, backbone {getattr(args, 'backbone_label', 'n/a')}. "
        "Trainable = backbone values the run trained (from its saved adapter or model); run wall = its own "
        "training + evaluation time inside train.py (mean ± sd over seeds; 1 thread, two runs side by side). "
        f"Wall time {wall / 60:.1f} min on {os.cpu_count()} CPU cores"
        + (f" ({cached} of {runs} runs from the run cache, code version {args.code_version}; each run's own "
           f"training time is in the JSON)" if cached else f" (code version {args.code_version})") + ".", "",
        *lines, "", *premise_markdown(prem), *overlap_markdown(ov), *diff_markdown(diffs)])


def overlap_markdown(ov) -> list[str]:
    if not ov or not ov["rows"]:
        return []
    rows = ov["rows"]
    out = ["Jaccard overlap of the final active sets (the elements each run's saved adapter holds), per seed, "
           "mean ± std over seeds (1 = the same elements):", "",
           "| | " + " | ".join(_label(r) for r in rows) + " |", "|---|" + "---:|" * len(rows)]
    for a in rows:
        cells = []
        for b in rows:
            v = ov["between_rows"].get(f"{a} | {b}") or ov["between_rows"].get(f"{b} | {a}")
            cells.append("1" if a == b else f"{v[0]:.3f} ± {v[1]:.3f}" if v else "")
        out.append(f"| {_label(a)} | " + " | ".join(cells) + " |")
    if ov["across_seeds"]:
        out += ["", "Same row, different seeds (selection stability; mean ± std over seed pairs): "
                + "; ".join(f"{_label(n)} {v[0]:.3f} ± {v[1]:.3f}" for n, v in ov["across_seeds"].items()) + "."]
    return out + [""]


def diff_markdown(diffs) -> list[str]:
    if not diffs:
        return []
    out = ["Paired per-seed differences of the held-out average (row − reference, mIoU points); t = mean / (sd / √n), "
           "distinguishable from seed noise when |t| > t_0.975(n − 1):", "",
           "| row | reference | per seed | mean ± sd | t | distinguishable at 95 % |", "|---|---|---|---:|---:|---|"]
    for name, d in diffs.items():
        per = ", ".join(f"{x:+.2f}" for x in d["diffs"])
        t = f"{d['t']:.2f}" if d["t"] == d["t"] else "n/a"
        verdict = ("yes" if d["distinguishable"] else f"no (needs |t| > {d['t_crit_95']:.2f})") if len(d["diffs"]) > 1 \
            else "n/a (one seed)"
        out.append(f"| {_label(name)} | {_label(d['reference'])} | {per} | {d['mean']:+.2f} ± {d['sd']:.2f} | {t} | "
                   f"{verdict} |")
    yes = [_label(n) for n, d in diffs.items() if d["distinguishable"]]
    out += ["", "Distinguishable from seed noise: " + (", ".join(yes) if yes else "none of these differences") + "."]
    return out + [""]


def plot_delta_max(recs: list[dict], targets: list[str], path: str) -> None:
    """The paper's Fig. 2 from the delta_max sweep: held-out mean mIoU (± sd over seeds) against δ_max, one line
    per method (FisherTune, Super-Tuning)."""
    import statistics

    from peft_fishertune.plotting import _matplotlib

    Figure = _matplotlib()
    lines: dict[str, dict[float, list[float]]] = {}
    for r in recs:
        d = float(r["extra"].get("delta_max", 0.15))
        avg = sum(r["table"][t] for t in targets) / len(targets)
        lines.setdefault(r["method"], {}).setdefault(d, []).append(avg)
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for method, pts in lines.items():
        xs = sorted(pts)
        mean = [statistics.mean(pts[x]) for x in xs]
        sd = [statistics.stdev(pts[x]) if len(pts[x]) > 1 else 0.0 for x in xs]
        ax.errorbar([100 * x for x in xs], mean, yerr=sd, marker="o", capsize=3,
                    label=LABELS.get(method, method).split(" (")[0])
    ax.set_xlabel("δ_max (% of the targeted weights)")
    ax.set_ylabel("held-out mIoU (%), mean ± sd")
    ax.set_title("δ_max sweep (the paper's Fig. 2)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
