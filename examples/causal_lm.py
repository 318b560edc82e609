"""FisherTune on a causal language model, end to end, with `FisherTuneTrainer`.

    python examples/causal_lm.py                                   # a tiny random Llama, char-level, on CPU
    python examples/causal_lm.py --model_name_or_path <a Llama / Mistral / Qwen2 checkpoint> --steps 0 50 450

The corpus is text already on this machine: the docstrings of a few Python standard-library modules (a real
checkpoint tokenizes it with its own tokenizer; the tiny model uses one token per character). A causal LM has no
new head, so nothing trains outside the FisherTune layers and stage 1 is skipped (stage1_steps=0): stage 2 only
estimates (the trainer skips the backward when nothing trains), stage 3 tunes the selected elements. Then the
adapter is saved, reloaded with `PeftModel.from_pretrained` and its logits are checked.

Two settings matter for text:
- `fisher_mode="batch"` (squared mini-batch gradients): the per-sample Fisher costs one backward per sequence,
  about 4x the batch mode's stage-2 step on a toy Llama; batch mode is the affordable choice for LMs.
- the DR-FIM's domain perturbation shifts the statistics of a feature map; a text batch has no `pixel_values`, so
  it goes on the input embeddings (`get_input_embeddings()`, by default; `perturb_at=` names another module).
The FisherTune part a user writes is the block between the `# ---` lines (5 statements).
"""

from __future__ import annotations

import argparse
import os

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, set_seed

from peft_fishertune import FisherTuneConfig, FisherTuneTrainer, FisherTuneTrainingArguments


def corpus() -> str:
    """Plain English already installed: docstrings of a few standard-library modules."""
    import argparse as a  # noqa: E401
    import csv
    import json
    import textwrap
    import unittest

    return "\n\n".join(m.__doc__ or "" for m in (json, csv, textwrap, unittest, a))


def blocks(ids: list[int], block: int, n: int) -> list[dict]:
    """n training sequences of `block` tokens (labels = inputs: the model shifts them)."""
    out = []
    for i in range(n):
        start = (i * block) % max(len(ids) - block, 1)
        x = torch.tensor(ids[start:start + block])
        out.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()})
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_name_or_path", default=None, help="a causal LM checkpoint (default: tiny random Llama)")
    p.add_argument("--output_dir", default="outputs/example_causal_lm")
    p.add_argument("--steps", type=int, nargs=3, default=[0, 10, 30], metavar=("T1", "T2", "T3"))
    p.add_argument("--num_sequences", type=int, default=64)
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--target_modules", nargs="+", default=None,
                   help="default: the architecture's (Llama: q, k, v, o, gate, up, down projections; "
                        "peft_fishertune/tuner/targets.py)")
    a = p.parse_args(argv)
    set_seed(0)
    text = corpus()
    if a.model_name_or_path:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(a.model_name_or_path)(text)["input_ids"]
        base = AutoModelForCausalLM.from_pretrained(a.model_name_or_path)
    else:
        vocab = sorted(set(text))
        ids = [vocab.index(c) for c in text]
        base = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                            max_position_embeddings=a.block_size))
    train = blocks(ids, a.block_size, a.num_sequences)
    base_dir = os.path.join(a.output_dir, "base_model")
    base.save_pretrained(base_dir)  # the random base, to reload the adapter onto

    # --- FisherTune: what a user writes
    config = FisherTuneConfig(target_modules=a.target_modules, fisher_mode="batch")
    model = get_peft_model(base, config)
    args = FisherTuneTrainingArguments(a.output_dir, stage1_steps=a.steps[0], stage2_steps=a.steps[1],
                                       stage3_steps=a.steps[2], per_device_train_batch_size=a.batch_size,
                                       learning_rate=1e-3, report_to=[])
    trainer = FisherTuneTrainer(model=model, args=args, train_dataset=train)
    trainer.train()
    model.save_pretrained(os.path.join(a.output_dir, "adapter"))
    # ---

    batch = torch.stack([s["input_ids"] for s in train[: a.batch_size]]).to(model.device)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch, labels=batch)
        with model.disable_adapter():
            base_loss = float(model(input_ids=batch, labels=batch).loss)
    fresh = AutoModelForCausalLM.from_pretrained(base_dir)
    reloaded = PeftModel.from_pretrained(fresh, os.path.join(a.output_dir, "adapter")).to(model.device).eval()
    with torch.no_grad():
        again = reloaded(input_ids=batch).logits
    diff = float((out.logits - again).abs().max())
    result = {"max_abs_logit_diff": diff, "loss_without_adapter": base_loss, "loss": float(out.loss)}
    print(f"loss on a training batch: {base_loss:.3f} without the adapter, {float(out.loss):.3f} with it; "
          f"reloaded adapter: max |logit difference| {diff:.2e}", flush=True)
    if diff > 1e-4:
        raise SystemExit(f"the reloaded adapter's logits differ from the trained model's by {diff:.2e}")
    return result


if __name__ == "__main__":
    main()
