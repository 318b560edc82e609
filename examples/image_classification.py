"""FisherTune on an image classifier, end to end, with `FisherTuneTrainer`.

    python examples/image_classification.py                       # a tiny random ViT, synthetic images (CPU, ~10 s)
    python examples/image_classification.py --model_name_or_path google/vit-base-patch16-224 --steps 200 50 750

The images are made here (class k: a coloured square in a class-specific corner, plus noise), so nothing is
downloaded. All three stages run (stage 1 trains the new head, stage 2 estimates the DR-FIM on every batch, stage 3
tunes the selected weight elements with δ growing); then the adapter is saved, reloaded with
`PeftModel.from_pretrained` onto a fresh base model, and its logits are checked against the trained model's.
`--fisher_mode per_sample` is the config's default (the true empirical Fisher: one backward per image); the
example uses batch mode by default so that it runs in seconds on a CPU.
The FisherTune part a user writes is the block between the `# ---` lines (5 statements).
"""

from __future__ import annotations

import argparse
import os

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification, set_seed

from peft_fishertune import FisherTuneConfig, FisherTuneTrainer, FisherTuneTrainingArguments


def synthetic_images(n: int, size: int, num_labels: int, seed: int = 0) -> list[dict]:
    """n normalized images (3 x size x size): class k is a bright square in one of num_labels places, plus noise."""
    g = torch.Generator().manual_seed(seed)
    half = size // 2
    out = []
    for i in range(n):
        k = i % num_labels
        x = 0.5 * torch.randn(3, size, size, generator=g)
        r, c = divmod(k, 2)
        x[k % 3, (r % 2) * half:(r % 2) * half + half, c * half:c * half + half] += 2.0
        out.append({"pixel_values": x, "labels": torch.tensor(k)})
    return out


def base_model(name: str | None, num_labels: int, image_size: int):
    if name:  # a real checkpoint: a new head for our labels
        return AutoModelForImageClassification.from_pretrained(name, num_labels=num_labels,
                                                               ignore_mismatched_sizes=True)
    return ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=128, image_size=image_size, patch_size=8,
                                               num_labels=num_labels))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_name_or_path", default=None, help="a ViT / DINOv2 classifier checkpoint (default: tiny random ViT)")
    p.add_argument("--output_dir", default="outputs/example_image_classification")
    p.add_argument("--steps", type=int, nargs=3, default=[20, 10, 30], metavar=("T1", "T2", "T3"))
    p.add_argument("--num_images", type=int, default=64)
    p.add_argument("--num_labels", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--target_modules", nargs="+", default=None,
                   help="FisherTune's candidate layers; default: the architecture's (ViT / DINOv2: q, k, v, o, fc1, "
                        "fc2 of every block; peft_fishertune/tuner/targets.py)")
    p.add_argument("--fisher_mode", default="batch", choices=["batch", "per_sample"],
                   help="batch (default here: fast on CPU) or per_sample (the paper's true empirical Fisher, one "
                        "backward per image)")
    a = p.parse_args(argv)
    set_seed(0)
    base = base_model(a.model_name_or_path, a.num_labels, 32)
    size = base.config.image_size
    train = synthetic_images(a.num_images, size, a.num_labels)
    base_dir = os.path.join(a.output_dir, "base_model")
    base.save_pretrained(base_dir)  # the random base, to reload the adapter onto (a real checkpoint reloads by name)

    # --- FisherTune: what a user writes
    config = FisherTuneConfig(target_modules=a.target_modules, modules_to_save=["classifier"], fisher_mode=a.fisher_mode)
    model = get_peft_model(base, config)
    args = FisherTuneTrainingArguments(a.output_dir, stage1_steps=a.steps[0], stage2_steps=a.steps[1],
                                       stage3_steps=a.steps[2], per_device_train_batch_size=a.batch_size,
                                       learning_rate=1e-3, fishertune_lr=1e-4, report_to=[])
    FisherTuneTrainer(model=model, args=args, train_dataset=train).train()
    model.save_pretrained(os.path.join(a.output_dir, "adapter"))
    # ---

    batch = torch.stack([s["pixel_values"] for s in train[: a.batch_size]]).to(model.device)
    model.eval()
    with torch.no_grad():
        trained = model(pixel_values=batch).logits
    fresh = AutoModelForImageClassification.from_pretrained(base_dir)
    reloaded = PeftModel.from_pretrained(fresh, os.path.join(a.output_dir, "adapter")).to(model.device).eval()
    with torch.no_grad():
        again = reloaded(pixel_values=batch).logits
    diff = float((trained - again).abs().max())
    labels = torch.stack([s["labels"] for s in train[: a.batch_size]]).to(trained.device)
    result = {"max_abs_logit_diff": diff, "train_accuracy": float((trained.argmax(-1) == labels).float().mean())}
    print(f"reloaded adapter: max |logit difference| {diff:.2e}; accuracy on the first batch "
          f"{result['train_accuracy']:.2f}", flush=True)
    if diff > 1e-4:
        raise SystemExit(f"the reloaded adapter's logits differ from the trained model's by {diff:.2e}")
    return result


if __name__ == "__main__":
    main()
