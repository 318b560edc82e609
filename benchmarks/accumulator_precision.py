"""What a cheaper estimator setting does to the selection: top-15 % Jaccard against the reference setting.

    python benchmarks/accumulator_precision.py --steps 2000      # bfloat16 vs float32 accumulators, ~9 min on 1 core
    python benchmarks/accumulator_precision.py --steps 300
    python benchmarks/accumulator_precision.py --compare mode --steps 300   # batch vs per-sample Fisher

A tiny DINOv2 (3 blocks, hidden 64, patch 8, 32² inputs) with a linear per-token head, batch 4 of inputs whose
colour statistics vary per image and labels that depend on the input; the targets are the encoder's 2-D weights.
Each estimator (variational natural, data_scale 1000; empirical) runs T2 steps three times: the reference setting
seed 0, the cheaper setting seed 0, the reference seed 1 (another perturbation / weight-sample draw). The reference
for "how much is a lot" is the seed-to-seed overlap of the reference estimate itself.
- `--compare dtype` (default): float32 accumulators (reference) against bfloat16 (the default), batch mode.
- `--compare mode`: `per_sample` (reference: FisherTuneConfig's default and the paper configs', per-sample loop)
  against `batch` (squared mini-batch gradients: what the cost benchmarks and the demo run), bfloat16 accumulators.
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
    ap.add_argument("--compare", choices=sorted(COMPARISONS), default="dtype",
                    help="dtype: bfloat16 vs float32 accumulators; mode: batch vs per-sample Fisher")
    args = ap.parse_args(argv)
    keyword, ref_value, cheap_value, fixed, (ref_name, cheap_name) = COMPARISONS[args.compare]
    torch.set_num_threads(args.threads)
    from peft_fishertune.fisher import EmpiricalFisherEstimator, VariationalFisherEstimator

    model = _model()
    params = {n: p for n, p in model.named_parameters()
              if n.startswith("backbone.encoder") and n.endswith("weight") and p.dim() == 2}

    def run(kind: str, value: str, seed: int) -> dict:
        cls = VariationalFisherEstimator if kind == "variational" else EmpiricalFisherEstimator
        kw = {**fixed, keyword: value, "seed": seed}
        if kind == "variational":
            kw["data_scale"] = 1000.0
        est = cls(model, params=params, **kw)
        for t in range(args.steps):
            est.step(_batch(t))
        return est.result(consume=True).scores

    rows = []
    for kind in ("variational", "empirical"):
        t0 = time.time()
        ref, cheap, other = run(kind, ref_value, 0), run(kind, cheap_value, 0), run(kind, ref_value, 1)
        rows.append({"estimator": kind, "steps": args.steps,
                     f"jaccard_{cheap_name}_vs_{ref_name}": round(_jaccard(ref, cheap), 3),
                     f"jaccard_{ref_name}_seed0_vs_seed1": round(_jaccard(ref, other), 3),
                     "wall_s": round(time.time() - t0, 1)})
    print(json.dumps({"benchmark": "accumulator_precision", "compare": args.compare, "fixed": fixed, "rows": rows}))
    print(f"\n| estimator | T2 | top-15 % Jaccard {cheap_name} vs {ref_name} | {ref_name} seed 0 vs seed 1 |\n"
          "|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['estimator']} | {r['steps']} | {r[f'jaccard_{cheap_name}_vs_{ref_name}']:.3f} | "
              f"{r[f'jaccard_{ref_name}_seed0_vs_seed1']:.3f} |")
    return 0


# what --compare varies: (estimator keyword, reference value, cheaper value, the other keywords, names in the output)
COMPARISONS = {
    "dtype": ("accumulator_dtype", "float32", "bfloat16", {"mode": "batch"}, ("fp32", "bf16")),
    "mode": ("mode", "per_sample", "batch", {"accumulator_dtype": "bfloat16", "per_sample_method": "loop"},
             ("per_sample", "batch")),
}


if __name__ == "__main__":
    raise SystemExit(main())
