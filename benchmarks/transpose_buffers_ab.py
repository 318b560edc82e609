"""SDDMM's operand transposes into step-scoped buffers (the library) against a new tensor per transpose (before).

    python benchmarks/transpose_buffers_ab.py                       # DINOv2-B size, batch 2 x 224², δ = 5 % and 10 %
    python benchmarks/transpose_buffers_ab.py --fractions 0.05 --rounds 6 --md FILE --out FILE

A FisherTune stage-3 step on the CPU transposes each SDDMM layer's output gradient and input (`sparse_delta.
step_transpose`). Inside `deltas_in_weights` (FisherTuneTrainer's training step) the transposes go into buffers
reused by every layer of the step and freed when the step ends; `TRANSPOSE_BUFFERS_IN_STEP = False` makes a new
tensor per transpose, as before 2026-12-05 (ninth round). One model per fraction (transformers' Dinov2Model, a 1x1
conv head, FisherTune on q/k/v/o/fc1/fc2 with a random selection of that fraction, AdamW), training steps
(forward, backward, optimizer step, each inside `deltas_in_weights`) alternating between the two settings, the
order swapped every round; the paired difference of step times is the figure. Before timing, one step of each from
the same state is compared: the values' gradients must be equal bit for bit. Prints one JSON line and a table.
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
    from adapter_cost import add_shape_args, build, wrap

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--fractions", default="0.05,0.1")
    ap.add_argument("--rounds", type=int, default=10, help="paired rounds (one step of each setting)")
    add_run_args(ap)
    args = ap.parse_args(argv)
    args.match_shira = False
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from peft_fishertune.tuner import sparse_delta

    torch.set_num_threads(args.threads)
    rows, mismatched = [], 0
    for frac in (float(f) for f in args.fractions.split(",")):
        model, _ = wrap(build(args), f"fishertune@{frac}", args)
        params = [p for p in model.parameters() if p.requires_grad]
        values = [p for n, p in model.named_parameters() if "ft_values" in n]
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen)
        y = torch.randint(0, 19, (args.batch, args.image_size, args.image_size), generator=gen)

        def backward(buffered: bool):
            sparse_delta.TRANSPOSE_BUFFERS_IN_STEP = buffered
            opt.zero_grad(set_to_none=True)
            with sparse_delta.deltas_in_weights(model):
                model(pixel_values=x, labels=y).backward()

        try:
            grads = []
            for buffered in (False, True):  # same state, both ways: the gradients must agree bit for bit
                backward(buffered)
                grads.append([v.grad.clone() for v in values])
            mismatched += sum(not torch.equal(a, b) for a, b in zip(*grads))
            for _ in range(2):  # warm-up (compiles) of both
                for buffered in (False, True):
                    backward(buffered)
                    opt.step()
            times = {False: [], True: []}
            for r in range(args.rounds):
                for buffered in ((False, True) if r % 2 == 0 else (True, False)):
                    start = time.perf_counter()
                    backward(buffered)
                    opt.step()
                    times[buffered].append(time.perf_counter() - start)
        finally:
            sparse_delta.TRANSPOSE_BUFFERS_IN_STEP = True
        paired = [(b - a) * 1e3 for a, b in zip(times[False], times[True])]
        rows.append({"fraction": frac, "step_s_median": {"new_tensors": statistics.median(times[False]),
                                                        "step_buffers": statistics.median(times[True])},
                     "paired_ms_median": statistics.median(paired), "paired_ms_all": paired})
    line = json.dumps({"benchmark": "transpose_buffers_ab", "torch": torch.__version__, "threads": args.threads,
                       "hidden": args.hidden, "layers": args.layers, "batch": args.batch,
                       "image_size": args.image_size, "rounds": args.rounds, "mismatched_gradients": mismatched,
                       "rows": rows})
    lines = ["# SDDMM operand transposes: step-scoped buffers (library) against a new tensor per transpose", "",
             f"Command: `python benchmarks/transpose_buffers_ab.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
             "", f"DINOv2 hidden {args.hidden}, {args.layers} blocks, batch {args.batch} x {args.image_size}², "
             f"{args.threads} threads, torch {torch.__version__}; {args.rounds} paired rounds per fraction (the order "
             "swapped every round); a step = forward + backward inside `deltas_in_weights` + AdamW.", "",
             "| active fraction | new tensors, step s | step buffers, step s | paired difference, ms (median) |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {r['fraction']:g} | {r['step_s_median']['new_tensors']:.3f} | {r['step_s_median']['step_buffers']:.3f} "
              f"| {r['paired_ms_median']:+.1f} |" for r in rows]
    lines += ["", f"Value tensors whose gradients differed between the two: {mismatched}."]
    emit(line, "\n".join(lines) + "\n", args.out, args.md)
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
