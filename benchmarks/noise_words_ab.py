"""The fused CPU weight sample with the noise hash on int32 words (the library) against int64 words (before).

    python benchmarks/noise_words_ab.py                          # DINOv2-B's 72 targeted weights, 12 paired rounds
    python benchmarks/noise_words_ab.py --rounds 4 --md FILE --out FILE

The variational estimator's CPU sample θ = θ̂ + sign·σ⊙ξ computes ξ inline from a 32-bit integer hash of the
element's position and keys (`fisher/seeds.py`). Until 2026-12-05 (eighth round) the hash ran on int64 words, each
32-bit product split into 16-bit halves so that none overflowed; it now runs on int32 words, whose products wrap
modulo 2^32 as the hash's word arithmetic does (8 lanes per AVX2 register instead of 4, no split). Both kernels are
compiled the way `fused.FusedKernels` compiles them and run over one stage-2 sample of every targeted weight of a
DINOv2-B (4 x 768², 3072 x 768 and 768 x 3072 per block, 12 blocks), interleaved in one process, the order
alternating; their samples are compared and must be equal bit for bit. A stage-2 step makes 4 samples per weight
(x and x' pass, forward and recompute). Also the plain noise fill (the compiled kernel of `seeds.counter_fill`, which
`derived_normal` and the eager estimator use) of one 16·hidden² buffer. Prints one JSON line and a table.
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


def noise_int64(index, k1, k2, k3):
    """ξ by the formula as written before: int64 words, every 32-bit product split in 16-bit halves."""
    import torch

    m = 0xFFFFFFFF

    def mul(x, c):
        return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & m

    def lowbias(x):
        x = x ^ (x >> 16)
        x = mul(x, 0x7FEB352D)
        x = x ^ (x >> 15)
        x = mul(x, 0x846CA68B)
        return x ^ (x >> 16)

    h1 = lowbias(lowbias(index ^ k1) ^ k2)
    h2 = lowbias(h1 ^ k3)
    u1 = ((h1 >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)
    u2 = (h2 >> 8).to(torch.float32) * (1.0 / 16777216.0)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=12, help="paired rounds (each: one pass of every weight per kernel)")
    add_run_args(ap)
    args = ap.parse_args(argv)
    if args.rounds < 2 or args.blocks < 1 or args.hidden < 8:
        ap.error("--rounds >= 2, --blocks >= 1, --hidden >= 8")
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from peft_fishertune.fisher import seeds
    from peft_fishertune.fisher.fused import sample, sample_counter

    torch.set_num_threads(args.threads)

    def sample_int64(p, prec, prior, sign, k1, k2, k3):
        index = torch.arange(p.numel(), dtype=torch.int64, device=p.device).view(p.shape)
        return sample(p, prec, noise_int64(index, k1, k2, k3), prior, sign)

    kernels = {"int64": torch.compile(sample_int64, dynamic=True, fullgraph=True),
               "int32": torch.compile(sample_counter, dynamic=True, fullgraph=True)}
    h = args.hidden
    shapes = ([(h, h)] * 4 + [(4 * h, h), (h, 4 * h)]) * args.blocks
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(s, generator=g), (torch.rand(s, generator=g) * 50).to(torch.bfloat16)) for s in shapes]
    prior, sign = torch.tensor(100.0), torch.tensor(1.0)
    keys = (0xE1, 3, 1, 7)
    args_of = {"int64": [torch.tensor(k, dtype=torch.int64) for k in seeds.counter_keys(*keys)],
               "int32": list(seeds.counter_key_tensors(*keys))}
    mismatched = sum(not torch.equal(kernels["int64"](p, q, prior, sign, *args_of["int64"]),
                                     kernels["int32"](p, q, prior, sign, *args_of["int32"])) for p, q in weights)

    def one_pass(name: str) -> float:
        start = time.perf_counter()
        for p, q in weights:
            kernels[name](p, q, prior, sign, *args_of[name])
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"int64": [], "int32": []}
    for r in range(args.rounds):
        for name in (("int64", "int32") if r % 2 == 0 else ("int32", "int64")):
            times[name].append(one_pass(name))
    fill_n = 16 * h * h
    fill = {"int64": torch.compile(lambda out, k1, k2, k3: out.copy_(noise_int64(
        torch.arange(out.numel(), dtype=torch.int64).view(out.shape), k1, k2, k3)), dynamic=True, fullgraph=True),
        "int32": torch.compile(seeds._counter_fill, dynamic=True, fullgraph=True)}  # counter_fill's compiled kernel
    buf = {n: torch.empty(fill_n) for n in fill}
    for n in fill:
        fill[n](buf[n], *args_of[n])
    fill_mismatch = not torch.equal(buf["int64"], buf["int32"])
    fill_times: dict[str, list[float]] = {n: [] for n in fill}
    for r in range(args.rounds):
        for n in (("int64", "int32") if r % 2 == 0 else ("int32", "int64")):
            start = time.perf_counter()
            fill[n](buf[n], *args_of[n])
            fill_times[n].append(time.perf_counter() - start)
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    fmed = {n: statistics.median(v) * 1e3 for n, v in fill_times.items()}
    paired = statistics.median([(a - b) * 1e3 for a, b in zip(times["int64"], times["int32"])])
    numel = sum(p.numel() for p, _ in weights)
    line = json.dumps({"benchmark": "noise_words_ab", "torch": torch.__version__, "threads": args.threads,
                       "weights": len(weights), "elements": numel, "rounds": args.rounds,
                       "sample_pass_ms_median": med, "paired_saving_ms_median": paired,
                       "stage2_step_saving_ms": 4 * paired, "fill_ms_median": fmed, "fill_elements": fill_n,
                       "mismatched_weights": mismatched, "fill_mismatch": fill_mismatch,
                       "sample_pass_ms_all": {n: [t * 1e3 for t in v] for n, v in times.items()}})
    text = "\n".join([
        "# The fused CPU weight sample: noise hash on int32 words (library) against int64 words (before)", "",
        f"Command: `python benchmarks/noise_words_ab.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
        f"{len(weights)} weights ({numel:,} elements, DINOv2 hidden {h}, {args.blocks} blocks), one sample of each "
        f"per pass; {args.rounds} paired rounds, interleaved; {args.threads} threads, torch {torch.__version__}.", "",
        "| kernel | one sample of every weight, ms (median) | noise fill of "
        f"{fill_n:,} floats, ms (median) |", "|---|---:|---:|",
        f"| int64 words, split products (before) | {med['int64']:.1f} | {fmed['int64']:.1f} |",
        f"| int32 words (the library) | {med['int32']:.1f} | {fmed['int32']:.1f} |", "",
        f"Paired saving per pass (median): {paired:.1f} ms; a stage-2 step makes 4 samples per weight: "
        f"{4 * paired:.0f} ms a step.",
        f"Weights whose samples differed: {mismatched} of {len(weights)}; fills equal: {not fill_mismatch}.",
    ]) + "\n"
    emit(line, text, args.out, args.md)
    return 1 if mismatched or fill_mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
