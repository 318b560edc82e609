"""The host time a FisherTune layer adds per forward + backward, apart from its arithmetic.

    python benchmarks/layer_overhead.py                    # 144 layers (DINOv2-L's targeted Linear count), CPU
    python benchmarks/layer_overhead.py --device cuda      # on a GPU: each repetition ends with a synchronize

A stack of `--layers` tiny `nn.Linear(width, width)` layers (16 x 16 by default, so the arithmetic is negligible and
what is left is the per-layer host work: Python, autograd functions, index operations, kernel launches). Rows, one
forward and backward of the stack each (median over `--reps`, the first tenth left out):
    plain                     the layers as they are (every weight trains)
    fishertune                FisherTune, every candidate active (δ_min = δ_max = --delta), inside deltas_in_weights
    fishertune_per_call       the same without deltas_in_weights (the per-call write and restore)
    fishertune_partial        --delta candidates, --active of the weights active (a growing run's state)
The figure that matters is the overhead per layer, (row - plain) / layers, in microseconds: at DINOv2-L size a
step runs 144 such layers, and on a GPU that host time is hidden only while the device has queued work.
Prints one JSON line and a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from torch import nn


def _stack(layers: int, width: int) -> nn.Module:
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def _fishertune(args, active: float) -> nn.Module:
    from peft import get_peft_model

    from peft_fishertune import FisherTuneConfig
    from peft_fishertune.tuner.selection import random_scores, select_parameters, set_active_fraction

    cfg = FisherTuneConfig(target_modules=[str(i) for i in range(args.layers)], delta_min=min(active, args.delta),
                           delta_max=args.delta)
    model = get_peft_model(_stack(args.layers, args.width), cfg).to(args.device)
    select_parameters(model, random_scores(model, 0))
    if active < args.delta:
        set_active_fraction(model, active)
    return model


def _time(model: nn.Module, context, args) -> float:
    x = torch.randn(args.batch, args.width, device=args.device, requires_grad=True)
    cuda = args.device.startswith("cuda")
    times = []
    for _ in range(args.reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with context(model):
            model(x).sum().backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        x.grad = None
    return statistics.median(times[max(1, args.reps // 10):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=144)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--delta", type=float, default=0.15, help="candidates per layer (δ_max)")
    ap.add_argument("--active", type=float, default=0.05, help="active fraction of the partial row (< --delta)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.layers < 1 or args.width < 2 or args.reps < 2:
        ap.error("--layers >= 1, --width >= 2 and --reps >= 2")
    if not 0 < args.active < args.delta <= 1:
        ap.error(f"expected 0 < --active ({args.active}) < --delta ({args.delta}) <= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from peft_fishertune import deltas_in_weights

    none = lambda m: contextlib.nullcontext()  # noqa: E731
    full, partial = _fishertune(args, args.delta), _fishertune(args, args.active)
    seconds = {
        "plain": _time(_stack(args.layers, args.width).to(args.device), none, args),
        "fishertune": _time(full, deltas_in_weights, args),
        "fishertune_per_call": _time(full, none, args),
        "fishertune_partial": _time(partial, deltas_in_weights, args),
    }
    active = {name: sum(m.num_active("default") for m in model.modules() if hasattr(m, "num_active"))
              for name, model in (("fishertune", full), ("fishertune_partial", partial))}
    per_layer_us = {k: (v - seconds["plain"]) / args.layers * 1e6 for k, v in seconds.items() if k != "plain"}
    settings = {k: getattr(args, k) for k in ("layers", "width", "batch", "reps", "delta", "active", "device",
                                              "threads")}
    print(json.dumps({"benchmark": "layer_overhead", "settings": settings, "torch": torch.__version__,
                      "step_s": seconds, "overhead_per_layer_us": per_layer_us, "num_active": active}))
    print(f"\n{args.layers} Linear({args.width}, {args.width}) layers, batch {args.batch}, {args.device}, "
          f"{args.threads} thread(s); one forward + backward, median of {args.reps}\n")
    print("| row | step ms | overhead per layer µs |\n|---|---:|---:|")
    for name, s in seconds.items():
        extra = "" if name == "plain" else f"{per_layer_us[name]:.0f}"
        print(f"| {name} | {s * 1e3:.1f} | {extra} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
