"""Where SDDMM stops paying: the values' gradient of one sparse Linear layer by SDDMM vs by dense dW + gather.

    python benchmarks/sddmm_crossover.py                      # CPU, DINOv2-B shapes, 514 tokens (batch 2 x 257)
    python benchmarks/sddmm_crossover.py --device cuda        # benchmarks/gpu_check.sh runs this on a GPU
    python benchmarks/sddmm_crossover.py --md benchmarks/results/sddmm_crossover.md --out benchmarks/results/sddmm_crossover.jsonl

For each weight shape (out x in) and active density d (active elements / weight elements, random positions), both
ways of computing `(gᵀ x)` at the active entries that `tuner/sparse_delta.py` has are timed, as it runs them:
- sddmm: gᵀ and xᵀ made contiguous (`contiguous_t`: one compiled kernel on the CPU), a CSR pattern from the row
  pointers + the column of each active index, `torch.sparse.sampled_addmm` (`sddmm_values`; cost ∝ active entries x
  tokens);
- dense: `_dense_dw` (one GEMM, into the reused CPU workspace) + `index_select` at the active indices (cost ∝ the
  whole weight x tokens, independent of d).
The two are interleaved, --reps times each, and the median is kept. The crossover of a shape is the density where
the two medians are equal (linear interpolation between the measured densities). The recommended threshold is the
median crossover over the shapes: `SDDMM_MAX_DENSITY[device]` in `tuner/sparse_delta.py` takes it (SDDMM below it).
Prints one JSON line and a Markdown table.
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
from _output import emit  # noqa: E402


def measure(out_f, in_f, tokens, density, device, reps, dtype, seed=0):
    import torch

    from peft_fishertune.tuner.sparse_delta import _dense_dw, contiguous_t, sddmm_values
    from peft_fishertune.tuner.storage import index_dtype_for

    gen = torch.Generator().manual_seed(seed)
    numel = out_f * in_f
    k = max(1, round(density * numel))
    idx = torch.randperm(numel, generator=gen)[:k].sort().values.to(index_dtype_for(numel)).to(device)
    x2 = torch.randn(tokens, in_f, generator=gen, dtype=dtype).to(device)
    g = torch.randn(tokens, out_f, generator=gen, dtype=dtype).to(device)
    rows = idx.long() // in_f
    crow = torch.zeros(out_f + 1, dtype=torch.int64, device=device)
    crow[1:] = torch.bincount(rows, minlength=out_f).cumsum(0)
    crow = crow.to(index_dtype_for(numel))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def sddmm():  # as the layer's backward runs it: both operands transposed (compiled on CPU), then SDDMM
        return sddmm_values(contiguous_t(g), contiguous_t(x2), crow, idx, (out_f, in_f))

    def dense():
        return _dense_dw(g, x2, (out_f, in_f), dtype).reshape(-1).index_select(0, idx)

    a, b = sddmm(), dense()  # warm-up, and the two must agree
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-3):
        raise SystemExit(f"{out_f}x{in_f} d={density}: SDDMM and dense+gather differ by {(a - b).abs().max():.3g}")
    times = {"sddmm": [], "dense": []}
    for _ in range(reps):
        for name, fn in (("sddmm", sddmm), ("dense", dense)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {k_: statistics.median(v) for k_, v in times.items()}


def crossover(densities, rows) -> float | None:
    """The density where dense + gather becomes as cheap as SDDMM (None: SDDMM cheaper everywhere measured; 0.0: dense
    cheaper everywhere)."""
    ratio = [r["sddmm"] / r["dense"] for r in rows]  # < 1: SDDMM cheaper
    if ratio[0] >= 1.0:
        return 0.0
    for i in range(1, len(ratio)):
        if ratio[i] >= 1.0:
            d0, d1, r0, r1 = densities[i - 1], densities[i], ratio[i - 1], ratio[i]
            return d0 + (1.0 - r0) * (d1 - d0) / (r1 - r0)
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=514, help="rows of x: batch x tokens (DINOv2-B, 224², batch 2: 514)")
    ap.add_argument("--shapes", default="768x768,3072x768,768x3072", help="out x in, comma-separated")
    ap.add_argument("--densities", default="0.01,0.02,0.05,0.08,0.1,0.12,0.15,0.2,0.3")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    densities = [float(d) for d in args.densities.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    t0 = time.time()
    table, cross = {}, {}
    for out_f, in_f in shapes:
        key = f"{out_f}x{in_f}"
        table[key] = [measure(out_f, in_f, args.tokens, d, args.device, args.reps, dtype) for d in densities]
        cross[key] = crossover(densities, table[key])
        print(f"[sddmm_crossover] {key}: crossover {cross[key]}", file=sys.stderr, flush=True)
    known = [c if c is not None else densities[-1] for c in cross.values()]
    recommended = statistics.median(known)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    line = json.dumps({"benchmark": "sddmm_crossover", "device": args.device, "device_name": device_name,
                       "torch": torch.__version__, "threads": args.threads, "tokens": args.tokens, "dtype": args.dtype,
                       "densities": densities, "median_s": table, "crossover": cross,
                       "recommended_sddmm_max_density": recommended, "wall_s": time.time() - t0})
    md = [f"# SDDMM vs dense dW + gather, one Linear layer ({device_name}, torch {torch.__version__})", "",
          f"Command: `python benchmarks/sddmm_crossover.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
          f"{args.tokens} tokens, {args.dtype}, {args.threads} threads; median of {args.reps} interleaved runs each; "
          "times in ms. A shared machine: read the ratios.", "",
          "| shape (out x in) | " + " | ".join(f"d={d:g}" for d in densities) + " | crossover |",
          "|---|" + "---:|" * (len(densities) + 1)]
    for key, rows in table.items():
        cells = [f"{r['sddmm'] * 1e3:.1f} / {r['dense'] * 1e3:.1f}" for r in rows]
        c = cross[key]
        md.append(f"| {key} sddmm / dense | " + " | ".join(cells) + f" | {'> ' + str(densities[-1]) if c is None else f'{c:.3f}'} |")
    md += ["", f"Recommended `SDDMM_MAX_DENSITY[{args.device.split(':')[0]!r}]` (median crossover): **{recommended:.3f}**", ""]
    text = "\n".join(md)
    emit(line, text, args.out, args.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
