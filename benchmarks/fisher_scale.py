"""The "scale" caution of METHOD.md, measured: does the variational F̂ carry the data's signal?

A small DINOv2 segmentation model (hidden 96, 4 layers, 112², per-pixel CE averaged over
pixels and images, random init), N = 64 samples in 16 batches of 4. Reference: the
per-sample empirical Fisher on the same data. For γ = τ = 0.01 (the paper) and
data_scale ∈ {1, N}, each variational method runs 2 epochs (32 steps) and we report the
Spearman rank correlation of F̂ with the reference over all targeted elements, and the
overlap of the top-15 % sets (what selection uses).

    python benchmarks/fisher_scale.py          # prints one JSON line and a table
"""

import json

import numpy as np
import torch
from _seg_model import LinearSegModel, encoder_linear_weights, make_batches
from scipy.stats import spearmanr
from transformers import Dinov2Config

from peft_fishertune.fisher import VariationalFisherEstimator, estimate_fisher


def flat(d):
    return torch.cat([t.reshape(-1) for t in d.values()]).double().numpy()


def top_overlap(a, b, frac=0.15):
    k = int(len(a) * frac)
    ta, tb = set(np.argpartition(-a, k)[:k].tolist()), set(np.argpartition(-b, k)[:k].tolist())
    return len(ta & tb) / k


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=96, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384,
                       image_size=112, patch_size=14)
    model = LinearSegModel(cfg, num_classes=8).eval()
    params = encoder_linear_weights(model)
    batches = make_batches(16, 4, 112, num_classes=8)
    n = sum(b["pixel_values"].shape[0] for b in batches)
    ref = flat(estimate_fisher(model, batches, params=params, mode="per_sample", progress=False))
    rows = []
    for method, kw in [("natural", {}), ("reparam", {}), ("reparam", {"antithetic": True})]:
        for ds in (1.0, float(n)):
            est = VariationalFisherEstimator(model, params=params, method=method, gamma=0.01, tau=0.01,
                                             data_scale=ds, perturb=False, mode="per_sample", **kw)
            for _ in range(2):
                for b in batches:
                    est.step(b)
            f = flat(est.result().fisher_x)
            lam_rel = float((flat(est.data_precision("x")) * 0.01**2).max())  # max (Λ − τ⁻²)/τ⁻²
            name = method + (" antithetic" if kw else "")
            rows.append({"method": name, "data_scale": ds, "spearman": float(spearmanr(f, ref).statistic),
                         "top15_overlap": top_overlap(f, ref), "frac_positive": float((f > 0).mean()),
                         "max_rel_precision_above_prior": lam_rel})
            est.release()
    record = {"benchmark": "fisher_scale", "n_samples": n, "elements": int(ref.size),
              "ref_fisher_median": float(np.median(ref)), "ref_fisher_max": float(ref.max()),
              "gamma_tau_minus2": 0.01 * 0.01**-2, "rows": rows}
    print(json.dumps(record))
    print(f"\nreference per-sample Fisher: median {np.median(ref):.3g}, max {ref.max():.3g}; prior term γτ⁻² = 100")
    print(f"| {'method':<20} | {'data_scale':>10} | {'Spearman':>8} | {'top-15% overlap':>15} | {'F̂>0':>6} | "
          f"{'max (Λ−τ⁻²)/τ⁻²':>16} |")
    for r in rows:
        print(f"| {r['method']:<20} | {r['data_scale']:>10g} | {r['spearman']:8.3f} | {r['top15_overlap']:15.3f} | "
              f"{r['frac_positive']:6.3f} | {r['max_rel_precision_above_prior']:16.3g} |")


if __name__ == "__main__":
    main()
