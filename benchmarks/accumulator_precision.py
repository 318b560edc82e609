"""What bfloat16 Fisher accumulators do to the selection: top-15 % Jaccard against float32 over a long stage 2.

    python benchmarks/accumulator_precision.py --steps 2000      # ~9 min on 1 CPU core
    python benchmarks/accumulator_precision.py --steps 300

A tiny DINOv2 (3 blocks, hidden 64, patch 8, 32² inputs) with a linear per-token head, batch 4 of inputs whose
colour statistics vary per image and labels that depend on the input; the targets are the encoder's 2-D weights.
Each estimator (variational natural, batch mode, data_scale 1000; empirical, batch mode) runs T2 steps three times:
float32 accumulators seed 0, bfloat16 seed 0, float32 seed 1 (another perturbation / weight-sample draw). The
reference for "how much is a lot" is the seed-to-seed overlap of the float32 estimate itself.
Prints one JSON line and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn


def _model():
    from transformers import Dinov2Config, Dinov2Model

    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                                     intermediate_size=128, patch_size=8, image_size=32))
            self.head = nn.Linear(64, 5)

        def forward(self, pixel_values, labels):
            h = self.backbone(pixel_values=pixel_values).last_hidden_state[:, 1:]
            return {"loss": F.cross_entropy(self.head(h).flatten(0, 1), labels.flatten())}

    torch.manual_seed(0)
    return Seg().train()


def _batch(t: int) -> dict:
    g = torch.Generator().manual_seed(t)
    x = torch.randn(4, 3, 32, 32, generator=g) * (0.5 + torch.rand(4, 3, 1, 1, generator=g)) \
        + torch.randn(4, 3, 1, 1, generator=g)
    labels = (x[:, :, ::8, ::8].mean(1).flatten(1) * 2).long().clamp(-2, 2) + 2
    return {"pixel_values": x, "labels": labels}


def _jaccard(a: dict, b: dict, frac: float = 0.15) -> float:
    fa = torch.cat([a[n].flatten() for n in a])
    fb = torch.cat([b[n].flatten() for n in a])
    k = int(frac * fa.numel())
    sa, sb = set(fa.topk(k).indices.tolist()), set(fb.topk(k).indices.tolist())
    return len(sa & sb) / len(sa | sb)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from peft_fishertune.fisher import EmpiricalFisherEstimator, VariationalFisherEstimator

    model = _model()
    params = {n: p for n, p in model.named_parameters()
              if n.startswith("backbone.encoder") and n.endswith("weight") and p.dim() == 2}

    def run(kind: str, dtype: str, seed: int) -> dict:
        cls = VariationalFisherEstimator if kind == "variational" else EmpiricalFisherEstimator
        kw = {"mode": "batch", "accumulator_dtype": dtype, "seed": seed}
        if kind == "variational":
            kw["data_scale"] = 1000.0
        est = cls(model, params=params, **kw)
        for t in range(args.steps):
            est.step(_batch(t))
        return est.result(consume=True).scores

    rows = []
    for kind in ("variational", "empirical"):
        t0 = time.time()
        ref, low, other = run(kind, "float32", 0), run(kind, "bfloat16", 0), run(kind, "float32", 1)
        rows.append({"estimator": kind, "steps": args.steps, "jaccard_bf16_vs_fp32": round(_jaccard(ref, low), 3),
                     "jaccard_fp32_seed0_vs_seed1": round(_jaccard(ref, other), 3),
                     "wall_s": round(time.time() - t0, 1)})
    print(json.dumps({"benchmark": "accumulator_precision", "rows": rows}))
    print("\n| estimator | T2 | top-15 % Jaccard bf16 vs fp32 | fp32 seed 0 vs seed 1 |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['estimator']} | {r['steps']} | {r['jaccard_bf16_vs_fp32']:.3f} | "
              f"{r['jaccard_fp32_seed0_vs_seed1']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
