#!/usr/bin/env python
"""Evaluate a model (merged, or base + saved adapter) on any DGSS dataset; prints per-domain mIoU and per-class IoU.

    python scripts/evaluate.py --model outputs/demo/base_model --adapter outputs/demo/adapter \
        --dataset cityscapes:outputs/demo_data/fog:val --dataset cityscapes:outputs/demo_data/night:val \
        --mode slide --window 128 --stride 85 --test-scale 256 128
    python scripts/evaluate.py --config configs/fishertune_dinov2-l_mask2former_gta2citybddmap_512x512_bs4.yaml \
        --adapter outputs/fishertune_dinov2-l_gta/adapter --dataset cityscapes:data/cityscapes:val

With --config, the base model is the one the adapter was trained on: `base_model/` beside the adapter when the run
saved one (random-init backbones), else the config's checkpoint; a random-init config without a saved base is
refused. Every table says its test scale and mode (Rein's protocol: resize to 1024x512, slide 512 / stride 341;
`--test-scale 2048 1024` for full resolution).
"""

import argparse
import json
import sys

import torch


def parse_dataset(spec: str):
    parts = spec.split(":")
    if len(parts) not in (3, 4):
        raise argparse.ArgumentTypeError(f"--dataset {spec!r}: expected NAME:ROOT:SPLIT[:CONDITION]")
    return {"name": parts[0], "root": parts[1], "split": parts[2], "condition": parts[3] if len(parts) == 4 else None}


def main(argv=None) -> int:
    from peft_fishertune.data import EvalTransform, load_dgss_dataset
    from peft_fishertune.inference import evaluate_domains, format_table
    from peft_fishertune.training.trained_run import add_model_arguments, load_for_inference_or_exit
    from peft_fishertune.training.experiment import TransformedDataset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--dataset", action="append", type=parse_dataset, required=True, help="NAME:ROOT:SPLIT[:CONDITION]")
    p.add_argument("--mode", choices=["slide", "whole"], default="slide")
    p.add_argument("--test-scale", type=int, nargs=2, default=[1024, 512], metavar=("LONG", "SHORT"))
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=341)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--num-labels", type=int, default=19)
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    model = load_for_inference_or_exit(a)
    if model is None:
        return 2
    tf = EvalTransform(test_scale=tuple(a.test_scale))
    domains = {}
    for d in a.dataset:
        label = f"{d['name']}/{d['condition']}" if d["condition"] else f"{d['name']}:{d['root']}"
        domains[label] = TransformedDataset(load_dgss_dataset(d["name"], d["root"], split=d["split"], condition=d["condition"]),
                                            tf, a.max_images)
    with torch.no_grad():
        results = evaluate_domains(model, domains, num_labels=a.num_labels, mode=a.mode,
                                   window=(a.window, a.window), stride=(a.stride, a.stride))
    where = f"{a.mode}" + (f" {a.window}/{a.stride}" if a.mode == "slide" else "") + f", test scale {a.test_scale[0]}x{a.test_scale[1]}"
    for name, r in results.items():
        print(f"\n{name} ({where})")
        for cls, iou in r["per_class_iou"].items():
            print(f"  {cls:<15}{100 * iou:>7.2f}")
    print()
    print(format_table({n: 100 * r["mean_iou"] for n, r in results.items()}, title=f"mIoU (%), {where}"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({n: {"mIoU": 100 * r["mean_iou"], "per_class_iou": r["per_class_iou"], "protocol": where}
                       for n, r in results.items()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
