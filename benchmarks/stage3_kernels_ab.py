"""A stage-3 step with two settings of the sparse layer's kernels, paired in one process (interleaved steps).

    python benchmarks/stage3_kernels_ab.py                          # DINOv2-B size, batch 2 x 224², CPU, δ 1 / 5 / 15 %
    python benchmarks/stage3_kernels_ab.py --fractions 0.05 --steps 12 --md FILE --out FILE

Separate processes (adapter_cost.py, run_cost.py) differ by more than these settings save on a shared machine, so
here one model trains and its steps alternate between the settings, the order rotated each round:
- `compiled`: the library's defaults (SDDMM's operands transposed by the compiled kernel into buffers that every
  layer of the step reuses, `step_transpose`);
- `new_tensors`: the compiled transposes, each into a new tensor (`TRANSPOSE_BUFFERS_IN_STEP = False`): the code
  before 2026-12-05 (ninth round);
- `eager`: eager `t().contiguous()` transposes (`TRANSPOSE_COMPILE_MIN_ELEMENTS` out of reach);
- `eager_thr10`: eager transposes and the earlier CPU crossover `SDDMM_MAX_DENSITY['cpu'] = 0.10`: the code before
  the compiled transposes.
- `read_each_step`: the base values at the active entries read from the weight at every step, not kept from the
  step before (`sparse_delta.KEEP_BASE_VALUES = False`): the code before 2026-12-05 (thirteenth round);
- `gathered_pull` (with `--prior-pull`): Eq. 7's pull over the gathered active values in every layer, as before
  2026-12-05 (eleventh round), instead of over the whole values tensor where the inactive values are zero.
`--profile` then runs --profile-steps more steps of each setting under torch.profiler and tabulates the operators
whose self CPU time differs most from `compiled`'s. `--candidates C` trains each --fractions value as the active part of C candidates (a growing stage 3's state: δ_max
= C, `set_active_fraction`); `--prior-pull` adds Eq. 7's pull (N = 1000) to the loss, as the trainer does in stage 3.
Each step is what FisherTuneTrainer runs in stage 3: zero_grad, forward + backward inside `deltas_in_weights`, AdamW,
all of it inside `kept_base_values` (as FisherTuneTrainer.train).
The selection is random (every layer at the fraction), `init_selection="random"`. Before timing, one backward of
each setting from the same state is compared with `compiled`'s: the values' gradients of `new_tensors` and `eager`
must be equal bit for bit (`eager_thr10` takes other kernels in some layers); a difference exits 1. Prints one JSON
line and a table of median step times; the paired differences are per round (same round, consecutive steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _output import add_run_args, emit  # noqa: E402

# setting -> (TRANSPOSE_COMPILE_MIN_ELEMENTS, SDDMM_MAX_DENSITY["cpu"], TRANSPOSE_BUFFERS_IN_STEP); None = default.
# gathered_pull keeps the defaults and changes the prior pull instead (run_fraction's `backward`)
SETTINGS = {"compiled": (None, None, None), "new_tensors": (None, None, False), "eager": (1 << 62, None, None),
            "eager_thr10": (1 << 62, 0.10, None), "gathered_pull": (None, None, None),
            "read_each_step": (None, None, None)}
SAME_GRADIENTS = ("new_tensors", "eager", "gathered_pull", "read_each_step")  # the same arithmetic, bit for bit
LABELS = {"compiled": "compiled (defaults)", "new_tensors": "new tensors", "eager": "eager transposes",
          "eager_thr10": "eager + threshold 0.10", "gathered_pull": "gathered pull",
          "read_each_step": "base read each step"}


def run_fraction(fraction: float, args) -> dict:
    import torch
    from adapter_cost import TARGETS, build
    from peft import get_peft_model

    import peft_fishertune as pf
    from peft_fishertune.fisher import prior_pull_loss
    from peft_fishertune.tuner import sparse_delta as sd

    candidates = fraction if args.candidates is None else args.candidates
    model = get_peft_model(build(args), pf.FisherTuneConfig(target_modules=TARGETS, init_selection="random",
                                                             delta_min=min(fraction, candidates),
                                                             delta_max=candidates))
    if fraction < candidates:
        from peft_fishertune.tuner.selection import set_active_fraction

        set_active_fraction(model, fraction)
    layers = [m for m in model.modules() if "_inactive_zero" in m.__dict__ and m.num_candidates("default")]
    pull_all = {m: m._inactive_zero["default"] for m in layers}
    for p in model.base_model.model.head.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 19, (args.batch, args.image_size, args.image_size), generator=g)
    defaults = (sd.TRANSPOSE_COMPILE_MIN_ELEMENTS, sd.SDDMM_MAX_DENSITY["cpu"], sd.TRANSPOSE_BUFFERS_IN_STEP)
    values = [p for n, p in model.named_parameters() if "ft_values" in n]

    def backward(setting: str) -> None:
        min_el, thr, buffers = (d if v is None else v for v, d in zip(SETTINGS[setting], defaults))
        sd.TRANSPOSE_COMPILE_MIN_ELEMENTS, sd.SDDMM_MAX_DENSITY["cpu"], sd.TRANSPOSE_BUFFERS_IN_STEP = min_el, thr, buffers
        for m in layers:  # gathered_pull: every layer sums the gathered active values' squares
            m._inactive_zero["default"] = pull_all[m] and setting != "gathered_pull"
        sd.KEEP_BASE_VALUES = setting != "read_each_step"
        opt.zero_grad(set_to_none=True)
        with sd.deltas_in_weights(model):
            loss = model(pixel_values=x, labels=y)
            if args.prior_pull:
                loss = loss + prior_pull_loss(model, num_samples=1000)
            loss.backward()

    def step(setting: str) -> float:
        t0 = time.perf_counter()
        backward(setting)
        opt.step()
        return time.perf_counter() - t0

    names = args.settings
    with sd.kept_base_values(model):  # as FisherTuneTrainer.train
        try:
            grads = {}
            for name in ("compiled", *[n for n in SAME_GRADIENTS if n in names]):  # one backward each, same state
                backward(name)
                grads[name] = [v.grad.clone() for v in values]
            mismatched = {n: sum(not torch.equal(a, b) for a, b in zip(grads["compiled"], grads[n]))
                          for n in SAME_GRADIENTS if n in names}
            for name in names:  # warm-up: the compile, the CSR rows, the optimizer state
                step(name)
            times = {n: [] for n in names}
            for r in range(args.steps):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    times[name].append(step(name))
            profiles = {n: _profile(step, n, args.profile_steps) for n in names} if args.profile else None
        finally:
            sd.KEEP_BASE_VALUES = True
            sd.TRANSPOSE_COMPILE_MIN_ELEMENTS, sd.SDDMM_MAX_DENSITY["cpu"], sd.TRANSPOSE_BUFFERS_IN_STEP = defaults
            for m in layers:
                m._inactive_zero["default"] = pull_all[m]
    med = {n: statistics.median(v) for n, v in times.items()}
    diff = {n: statistics.median(a - b for a, b in zip(times["compiled"], times[n])) for n in names if n != "compiled"}
    return {"fraction": fraction, "candidates": candidates, "step_s_median": med, "step_s_all": times,
            "paired_diff_compiled_minus": diff, "mismatched_gradients": mismatched, "profile": profiles}


def _profile(step, setting: str, steps: int) -> dict:
    """{operator: [self CPU ms per step, calls per step]} over `steps` steps of `setting` under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(setting)
    return {e.key: [e.self_cpu_time_total / 1e3 / steps, e.count / steps] for e in prof.key_averages()}


def _profile_md(rows, settings, top: int = 16) -> list[str]:
    """Per fraction and setting other than `compiled`: the operators whose self CPU time per step differs most."""
    out = ["", "## torch.profiler: self CPU ms per step, the largest differences from `compiled`", ""]
    for r in rows:
        prof = r["profile"]
        base = prof["compiled"]
        for name in settings[1:]:
            other = prof[name]
            keys = sorted(set(base) | set(other), key=lambda k: -abs(base.get(k, [0, 0])[0] - other.get(k, [0, 0])[0]))
            total = (sum(v[0] for v in base.values()), sum(v[0] for v in other.values()))
            out += [f"δ = {r['fraction']:g}: `compiled` {total[0]:.0f} ms of self CPU a step, {LABELS[name]} "
                    f"{total[1]:.0f} ms", "", f"| operator | compiled ms (calls) | {LABELS[name]} ms (calls) | "
                    "difference ms |", "|---|---:|---:|---:|"]
            for k in keys[:top]:
                a, b = base.get(k, [0.0, 0]), other.get(k, [0.0, 0])
                out.append(f"| `{k[:60]}` | {a[0]:.1f} ({a[1]:g}) | {b[0]:.1f} ({b[1]:g}) | {a[0] - b[0]:+.1f} |")
            out.append("")
    return out


def main(argv=None) -> int:
    from adapter_cost import add_shape_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--fractions", default="0.01,0.05,0.15")
    ap.add_argument("--steps", type=int, default=8, help="rounds; each round runs one step per setting")
    ap.add_argument("--candidates", type=float, default=None,
                    help="candidate fraction (δ_max); each --fractions value is its active part (default: all active)")
    ap.add_argument("--prior-pull", action="store_true", help="add Eq. 7's prior pull to the loss (N = 1000)")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed rounds, profile --profile-steps steps of each setting (torch.profiler) and "
                         "add the operators that differ most from `compiled` to the Markdown")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--settings", default=",".join(n for n in SETTINGS if n != "gathered_pull"),
                    help="which settings to interleave (compiled, the library's defaults, always; what runs between "
                         "two steps of a setting moves the allocator's state, so a pair alone is the cleanest A/B)")
    add_run_args(ap)
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error(f"--steps {args.steps}: expected at least 1")
    args.settings = ["compiled"] + [n for n in dict.fromkeys(args.settings.split(",")) if n and n != "compiled"]
    unknown = [n for n in args.settings if n not in SETTINGS]
    if unknown:
        ap.error(f"--settings {unknown}: expected names from {list(SETTINGS)}")
    if "gathered_pull" in args.settings and not args.prior_pull:
        ap.error("--settings gathered_pull changes only the prior pull: add --prior-pull")
    fractions = [float(f) for f in args.fractions.split(",")]
    if args.candidates is not None and not all(0 < f <= args.candidates <= 1 for f in fractions):
        ap.error(f"--candidates {args.candidates}: expected every --fractions value ({fractions}) at or below it, "
                 "and at most 1")
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    rows = [run_fraction(f, args) for f in fractions]
    line = json.dumps({"benchmark": "stage3_kernels_ab", "torch": torch.__version__, "threads": args.threads,
                       "shape": [args.hidden, args.layers, args.heads, args.image_size, args.batch],
                       "steps": args.steps, "rows": rows, "wall_s": time.time() - t0})
    md = ["# A stage-3 step, settings of the layer kernels interleaved in one process", "",
          f"Command: `python benchmarks/stage3_kernels_ab.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
          f"DINOv2 hidden {args.hidden}, {args.layers} blocks, {args.image_size}², batch {args.batch}, "
          + (f"δ active of {args.candidates:g} candidates, " if args.candidates is not None else "")
          + ("Eq. 7's prior pull in the loss, " if args.prior_pull else "") +
          f"{args.threads} threads; {args.steps} interleaved rounds; median step s; paired: the median over rounds "
          "of (compiled − other), s.", "",
          "| δ | " + " | ".join(LABELS[n] for n in args.settings) + " | "
          + " | ".join(f"paired vs {LABELS[n]}" for n in args.settings[1:]) + " |",
          "|---:|" + "---:|" * (2 * len(args.settings) - 1)]
    for r in rows:
        m, d = r["step_s_median"], r["paired_diff_compiled_minus"]
        md.append(f"| {r['fraction']:g} | " + " | ".join(f"{m[n]:.3f}" for n in args.settings) + " | "
                  + " | ".join(f"{d[n]:+.3f}" for n in args.settings[1:]) + " |")
    bad = sum(n for r in rows for n in r["mismatched_gradients"].values())
    same = ", ".join(LABELS[n] for n in SAME_GRADIENTS if n in args.settings)
    md += ["", f"Value tensors whose gradients differed from `compiled`'s ({same}): {bad}."]
    if args.profile:
        md += _profile_md(rows, args.settings)
    text = "\n".join(md) + "\n"
    emit(line, text, args.out, args.md)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
