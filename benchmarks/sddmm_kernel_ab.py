"""What a faster SDDMM kernel would buy: torch's CPU `sampled_addmm` against a register-blocked C kernel.

    python benchmarks/sddmm_kernel_ab.py                      # DINOv2-B shapes, 514 tokens (batch 2 x 257), 2 threads
    python benchmarks/sddmm_kernel_ab.py --md FILE --out FILE

An experiment, not a library path: the library takes a sparse Linear layer's values' gradient (gᵀ x at the active
entries) by `torch.sparse.sampled_addmm` below `SDDMM_MAX_DENSITY` and by dense dW + gather above it
(`tuner/sparse_delta.py`). torch's CPU kernel computes one dot product of length `tokens` per active entry with one
vector accumulator, so each step waits on the previous add. The C kernel here (compiled with the machine's C
compiler, `-O3 -march=native -fopenmp`, loaded with ctypes, OpenMP resolved to torch's own libgomp) computes four
entries of a row at once, sharing the row of gᵀ, each with 16 lanes of partial sums. Per weight shape and active
density, the three ways are timed interleaved (--reps each, median) on the same operands, as `sddmm_values` and
`_dense_dw` run them (both SDDMM ways make gᵀ and xᵀ contiguous with `contiguous_t` in every call, as the library's
backward does, so their crossovers are comparable with `sddmm_crossover.py`'s); every result is checked against a
float64 reference (relative error ≤ 1e-5). The crossover of each SDDMM kernel against dense is where their medians
cross (linear interpolation). Prints one JSON line and a table; exits 2 when no C compiler is found.

`--adapter FILE` (an `adapter_model.safetensors` that `save_pretrained` wrote, e.g. by `run_cost.py --workdir W`
under `W/runs/fishertune/adapter/`) measures that adapter's 2-D weight shapes instead, then prices one backward's
values' gradient of its selection, layer by layer at each layer's own active density (interpolated in the measured
table): as the library chooses (SDDMM below `SDDMM_MAX_DENSITY["cpu"]`, dense above), with the cheaper of
sampled_addmm and dense per layer, and with the cheaper of the C kernel and dense per layer. Every 2-D layer in the
file is priced as a Linear layer (the file does not name the module's type; an Embedding target would be priced
wrongly).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _output import add_run_args, emit  # noqa: E402

C_SOURCE = r"""
#include <stdint.h>
/* out[e] = sum_k gt[i, k] * xt[col[e], k] for the entries e of CSR row i; four entries at a time share gt's row. */
void sddmm_csr_f32(const float *restrict gt, const float *restrict xt, const int64_t *restrict crow,
                   const int64_t *restrict col, float *restrict out, int64_t rows, int64_t K) {
    #pragma omp parallel for schedule(dynamic, 16)
    for (int64_t i = 0; i < rows; i++) {
        const float *a = gt + i * K;
        int64_t e = crow[i], end = crow[i + 1];
        for (; e + 4 <= end; e += 4) {
            const float *b0 = xt + col[e] * K, *b1 = xt + col[e + 1] * K;
            const float *b2 = xt + col[e + 2] * K, *b3 = xt + col[e + 3] * K;
            float p0[16] = {0}, p1[16] = {0}, p2[16] = {0}, p3[16] = {0};
            int64_t k = 0;
            for (; k + 16 <= K; k += 16) {
                #pragma omp simd
                for (int j = 0; j < 16; j++) {
                    float av = a[k + j];
                    p0[j] += av * b0[k + j]; p1[j] += av * b1[k + j];
                    p2[j] += av * b2[k + j]; p3[j] += av * b3[k + j];
                }
            }
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
            for (int j = 0; j < 16; j++) { s0 += p0[j]; s1 += p1[j]; s2 += p2[j]; s3 += p3[j]; }
            for (; k < K; k++) { float av = a[k]; s0 += av * b0[k]; s1 += av * b1[k]; s2 += av * b2[k]; s3 += av * b3[k]; }
            out[e] = s0; out[e + 1] = s1; out[e + 2] = s2; out[e + 3] = s3;
        }
        for (; e < end; e++) {
            const float *b = xt + col[e] * K;
            float s = 0.f;
            for (int64_t k = 0; k < K; k++) s += a[k] * b[k];
            out[e] = s;
        }
    }
}
"""


def build_kernel(workdir: Path):
    """Compile C_SOURCE into a shared library and return (the ctypes function, the compiler), or (None, None)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, None
    src, lib = workdir / "sddmm.c", workdir / "sddmm.so"
    src.write_text(C_SOURCE)
    subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(lib)],
                   check=True, capture_output=True)
    fn = ctypes.CDLL(str(lib)).sddmm_csr_f32
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2
    return fn, cc


def crossover(dens, a, b):
    """Density where a (SDDMM, rising) meets b (dense); None when a stays below or above b everywhere."""
    for i in range(1, len(dens)):
        d0, d1 = a[i - 1] - b[i - 1], a[i] - b[i]
        if d0 <= 0 <= d1 and d1 != d0:
            return dens[i - 1] + (dens[i] - dens[i - 1]) * (-d0) / (d1 - d0)
    return None


def adapter_densities(path: Path) -> list[tuple[str, tuple[int, int], int]]:
    """(module, weight shape, active elements) of every 2-D layer in a saved FisherTune adapter, decoded and checked
    by the library's own reader."""
    from safetensors.torch import load_file

    from peft_fishertune.tuner.storage import decode_layer

    tensors = load_file(str(path))
    out = []
    for key in sorted(k for k in tensors if k.endswith(".ft_shape")):
        name = key[: -len(".ft_shape")]
        shape = tuple(int(d) for d in tensors[key].tolist())
        if len(shape) != 2:
            continue
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".") and "." not in k[len(name) + 1:]}
        flat, _ = decode_layer(name, own, shape)
        out.append((name, shape, int(flat.numel())))
    if not out:
        raise SystemExit(f"--adapter {path}: no 2-D FisherTune layer in it (expected <module>.ft_shape tensors)")
    return out


def price(layers, rows, threshold: float) -> dict:
    """One backward's values' gradient of `layers` (module, shape, active) under three policies, from the measured
    medians of their shapes (linear in the density between the measured ones, through 0 at density 0, and
    proportional past the last)."""
    import numpy as np

    table = {tuple(r["shape"]): r for r in rows}

    def at(shape, d, way):
        r = table[shape]
        ds, ms = [0.0] + r["densities"], [0.0] + r["ms_median"][way]
        return float(np.interp(d, ds, ms)) if d <= ds[-1] else ms[-1] * d / ds[-1]

    tot = {"library": 0.0, "best_sampled_addmm": 0.0, "best_c_kernel": 0.0, "dense": 0.0}
    active = elements = 0
    for _, shape, k in layers:
        if k == 0:
            continue
        n = shape[0] * shape[1]
        d, dense = k / n, table[shape]["ms_median"]["dense"][0]
        tot["library"] += at(shape, d, "sampled_addmm") if d < threshold else dense
        tot["best_sampled_addmm"] += min(at(shape, d, "sampled_addmm"), dense)
        tot["best_c_kernel"] += min(at(shape, d, "c_kernel"), dense)
        tot["dense"] += dense
        active, elements = active + k, elements + n
    return {**tot, "layers": sum(1 for *_, k in layers if k), "active": active, "elements": elements}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--tokens", type=int, default=514)
    ap.add_argument("--densities", default="0.02,0.05,0.1,0.15,0.2,0.3,0.5")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--adapter", type=Path, help="price this saved adapter's selection (see above)")
    add_run_args(ap)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from peft_fishertune.tuner.sparse_delta import SDDMM_MAX_DENSITY_CPU, _dense_dw, contiguous_t, sddmm_values

    torch.set_num_threads(args.threads)
    layers = adapter_densities(args.adapter) if args.adapter else None
    with tempfile.TemporaryDirectory(prefix="sddmm_kernel_") as tmp:
        kernel, cc = build_kernel(Path(tmp))
        if kernel is None:
            print("sddmm_kernel_ab: no C compiler (set CC, or install cc/gcc)", file=sys.stderr)
            return 2
        h, n = args.hidden, args.tokens
        dens = [float(d) for d in args.densities.split(",")]
        gen = torch.Generator().manual_seed(0)
        rows, worst = [], 0.0
        shapes = sorted({tuple(sh) for _, sh, _ in layers}) if layers else [(h, h), (4 * h, h), (h, 4 * h)]
        for out_f, in_f in shapes:
            g, x = torch.randn(n, out_f, generator=gen), torch.randn(n, in_f, generator=gen)
            exact = (g.double().t() @ x.double()).reshape(-1)
            med = {"sampled_addmm": [], "c_kernel": [], "dense": []}
            for d in dens:
                k = max(1, int(d * out_f * in_f))
                idx = torch.randperm(out_f * in_f, generator=gen)[:k].sort().values
                crow = torch.searchsorted(idx, torch.arange(out_f + 1, dtype=torch.int64) * in_f)
                col = idx % in_f
                out = torch.empty(k)

                def c_kernel():  # the operands as the library's backward makes them, each call
                    a, b = contiguous_t(g), contiguous_t(x)
                    kernel(a.data_ptr(), b.data_ptr(), crow.data_ptr(), col.data_ptr(), out.data_ptr(), out_f, n)
                    return out

                ways = {"sampled_addmm": lambda: sddmm_values(contiguous_t(g), contiguous_t(x), crow, idx,
                                                              (out_f, in_f)),
                        "c_kernel": c_kernel,
                        "dense": lambda: _dense_dw(g, x, (out_f, in_f), torch.float32).reshape(-1).index_select(0, idx)}
                ref = exact[idx]
                for name, fn in ways.items():
                    err = float((fn().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                    worst = max(worst, err)
                times = {name: [] for name in ways}
                for r in range(args.reps):
                    for name in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
                        start = time.perf_counter()
                        ways[name]()
                        times[name].append(time.perf_counter() - start)
                for name in ways:
                    med[name].append(statistics.median(times[name]) * 1e3)
            rows.append({"shape": [out_f, in_f], "densities": dens, "ms_median": med,
                         "crossover_sampled_addmm": crossover(dens, med["sampled_addmm"], med["dense"]),
                         "crossover_c_kernel": crossover(dens, med["c_kernel"], med["dense"]),
                         "c_over_sampled_addmm": [c / s for c, s in zip(med["c_kernel"], med["sampled_addmm"])]})
    ok = worst <= 1e-5
    priced = price(layers, rows, SDDMM_MAX_DENSITY_CPU) if layers else None
    line = json.dumps({"benchmark": "sddmm_kernel_ab", "torch": torch.__version__, "threads": args.threads,
                       "tokens": n, "compiler": cc, "max_rel_error": worst, "values_ok": ok, "shapes": rows,
                       "adapter": str(args.adapter) if args.adapter else None, "adapter_backward_ms": priced})
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["# SDDMM kernels: torch's sampled_addmm against a register-blocked C kernel, and dense dW + gather", "",
             f"Command: `python benchmarks/sddmm_kernel_ab.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             f"{n} tokens, {args.threads} threads, torch {torch.__version__}, compiler `{cc}`; ms per layer, median of "
             f"{args.reps} interleaved runs; largest relative error against float64: {worst:.1e}.", "",
             "| shape (out x in) | density | sampled_addmm | C kernel | C / sampled_addmm | dense dW + gather |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        m = r["ms_median"]
        for i, d in enumerate(r["densities"]):
            lines.append(f"| {r['shape'][0]} x {r['shape'][1]} | {d:g} | {m['sampled_addmm'][i]:.2f} | "
                         f"{m['c_kernel'][i]:.2f} | {r['c_over_sampled_addmm'][i]:.2f} | {m['dense'][i]:.2f} |")
    lines += ["", "| shape | crossover, sampled_addmm | crossover, C kernel |", "|---|---:|---:|"]
    lines += [f"| {r['shape'][0]} x {r['shape'][1]} | {fmt(r['crossover_sampled_addmm'])} | "
              f"{fmt(r['crossover_c_kernel'])} |" for r in rows]
    if priced:
        lines += ["", f"**The selection of `{args.adapter}`**: {priced['layers']} Linear layers with active elements, "
                  f"{priced['active']:,} active of {priced['elements']:,} ({priced['active'] / priced['elements']:.1%}); "
                  f"one backward's values' gradient, ms (each layer at its own density):", "",
                  "| policy | ms |", "|---|---:|",
                  f"| the library: sampled_addmm below {SDDMM_MAX_DENSITY_CPU:g}, dense above | {priced['library']:.1f} |",
                  f"| the cheaper of sampled_addmm and dense, per layer | {priced['best_sampled_addmm']:.1f} |",
                  f"| the cheaper of the C kernel and dense, per layer | {priced['best_c_kernel']:.1f} |",
                  f"| dense in every layer | {priced['dense']:.1f} |"]
    emit(line, "\n".join(lines) + "\n", args.out, args.md)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
