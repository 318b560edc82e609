"""What one δ(t) update of stage 3 costs: `set_active_fraction` on a whole model, numpy's scan against torch's.

    python benchmarks/selection_update.py                      # DINOv2-B size, 15 % candidates, δ 1 % -> 15 %
    python benchmarks/selection_update.py --updates 40 --md FILE --out FILE

Stage 3 grows the active set from δ_min to δ_max; the trainer recomputes δ(t) every `selection_update_steps` tuning
steps (1 by default), and each update finds, in every layer, the candidates whose rank is below the new threshold.
The layer does that with numpy's `flatnonzero` on the CPU (`tuner/layer.py::_below`); `_below_torch` is the same
in torch operations (`torch.nonzero`, what the CPU path did before, and what CUDA does). Here one model takes the
fractions of an exponential schedule in order, each update timed with both, interleaved (the order alternates),
and the active positions of every layer are compared after each pair: they must be equal. Prints one JSON line and a
table: median ms per update of the whole model.
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


def main(argv=None) -> int:
    from adapter_cost import TARGETS, add_shape_args, build

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--delta-min", type=float, default=0.01)
    ap.add_argument("--delta-max", type=float, default=0.15)
    ap.add_argument("--updates", type=int, default=30, help="fractions of the schedule, each timed with both scans")
    add_run_args(ap)
    args = ap.parse_args(argv)
    if args.updates < 2:
        ap.error(f"--updates {args.updates}: expected at least 2")
    if not 0 < args.delta_min < args.delta_max <= 1:
        ap.error(f"--delta-min {args.delta_min} / --delta-max {args.delta_max}: expected 0 < min < max <= 1")
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    from peft import get_peft_model

    import peft_fishertune as pf
    from peft_fishertune.trainer.schedule import fishertune_layers
    from peft_fishertune.tuner import layer as layer_mod
    from peft_fishertune.tuner.selection import set_active_fraction

    torch.set_num_threads(args.threads)
    model = get_peft_model(build(args), pf.FisherTuneConfig(
        target_modules=TARGETS, init_selection="random", delta_min=args.delta_min, delta_max=args.delta_max))
    layers = fishertune_layers(model)
    candidates = sum(m.num_candidates("default") for m in layers)
    scans = {"numpy": layer_mod._below, "torch": layer_mod._below_torch}
    library = layer_mod._below
    ratio = args.delta_max / args.delta_min
    fractions = [args.delta_min * ratio ** (i / (args.updates - 1)) for i in range(args.updates)]
    times = {n: [] for n in scans}
    mismatches = 0
    t0 = time.time()
    try:
        for i, f in enumerate(fractions):
            order = list(scans) if i % 2 == 0 else list(reversed(scans))
            positions = {}
            for n in order:
                layer_mod._below = scans[n]
                # from a slightly other threshold first, so that the timed call is a real update
                set_active_fraction(model, f * (1 - 1e-3) if f * (1 - 1e-3) >= args.delta_min else f * (1 + 1e-3))
                start = time.perf_counter()
                set_active_fraction(model, f)
                times[n].append(time.perf_counter() - start)
                positions[n] = [(m.num_active("default"), m._active("default")[1]) for m in layers]
            for (ka, pa), (kb, pb) in zip(positions["numpy"], positions["torch"]):
                same = ka == kb and ((pa is None and pb is None) or (pa is not None and pb is not None
                                                                      and torch.equal(pa, pb)))
                mismatches += not same
    finally:
        layer_mod._below = library
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    line = json.dumps({"benchmark": "selection_update", "torch": torch.__version__, "threads": args.threads,
                       "shape": [args.hidden, args.layers, args.heads], "layers": len(layers),
                       "candidates": candidates, "delta": [args.delta_min, args.delta_max], "updates": args.updates,
                       "update_ms_median": med, "update_ms_all": {n: [t * 1e3 for t in v] for n, v in times.items()},
                       "mismatched_layers": mismatches, "wall_s": time.time() - t0})
    text = "\n".join([
        "# One δ(t) update of stage 3 (`set_active_fraction`), numpy's scan against torch's", "",
        f"Command: `python benchmarks/selection_update.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
        f"DINOv2 hidden {args.hidden}, {args.layers} blocks: {len(layers)} FisherTune layers, {candidates:,} "
        f"candidates (random ranks, global); {args.updates} fractions from {args.delta_min:g} to {args.delta_max:g} "
        f"(exponential), each update timed with both scans, interleaved; {args.threads} threads.", "",
        "| scan | median ms per update | / torch |", "|---|---:|---:|",
        f"| numpy `flatnonzero` (the library, CPU) | {med['numpy']:.1f} | {med['numpy'] / med['torch']:.2f} |",
        f"| `torch.nonzero` (before; CUDA) | {med['torch']:.1f} | 1.00 |", "",
        f"Layers whose active positions differed between the two: {mismatches} (of {len(layers) * args.updates}).",
    ]) + "\n"
    emit(line, text, args.out, args.md)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
