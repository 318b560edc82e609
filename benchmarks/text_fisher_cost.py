"""Cost of the Fisher estimate on a toy Llama (token inputs): fisher_mode 'per_sample' vs 'batch', both estimators.

    .venv/bin/python benchmarks/text_fisher_cost.py [--hidden 128] [--layers 2] [--batch 4] [--seq 64] [--steps 3]

Prints seconds per estimator step (after one warm-up step) and the per_sample / batch ratio. The DR perturbation
goes on the input embeddings (the batch has no pixel_values). CPU, no download (model from a config).
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers as T
from peft import get_peft_model

import peft_fishertune as pf
from peft_fishertune.fisher import make_estimator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=1000)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps + 1):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    times = {}
    for est_kind in ("empirical", "variational"):
        for mode in ("per_sample", "batch"):
            torch.manual_seed(0)
            cfg = T.LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
                                num_key_value_heads=4, intermediate_size=2 * args.hidden, vocab_size=args.vocab)
            model = get_peft_model(T.LlamaForCausalLM(cfg), pf.FisherTuneConfig(fisher_estimator=est_kind,
                                                                                fisher_mode=mode))
            model.train()
            est = make_estimator(model, model.peft_config["default"])
            est.step(batches[0])  # warm-up
            t = time.perf_counter()
            for b in batches[1:]:
                est.step(b)
            times[est_kind, mode] = (time.perf_counter() - t) / args.steps
            est.release()
            print(f"{est_kind:11s} {mode:10s} {times[est_kind, mode]:.3f} s/step", flush=True)
        ratio = times[est_kind, "per_sample"] / times[est_kind, "batch"]
        print(f"{est_kind}: per_sample / batch = {ratio:.1f}x", flush=True)
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {n:,} parameters, micro-batch {args.batch} x {args.seq} tokens")


if __name__ == "__main__":
    main()
