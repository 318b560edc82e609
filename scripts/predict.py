#!/usr/bin/env python
"""Write colorized predictions (Cityscapes palette) beside each input image, as PNG files.

    python scripts/predict.py --model outputs/demo/base_model --adapter outputs/demo/adapter \
        --images outputs/demo_data/night/leftImg8bit/val --out outputs/predictions --window 128 --stride 85 \
        --test-scale 256 128
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

EXTS = (".png", ".jpg", ".jpeg")


def main(argv=None) -> int:
    from peft_fishertune.data import EvalTransform, colorize
    from peft_fishertune.inference import inference
    from peft_fishertune.training.trained_run import add_model_arguments, load_for_inference_or_exit

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--images", required=True, help="an image file or a folder (searched recursively)")
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=["slide", "whole"], default="slide")
    p.add_argument("--test-scale", type=int, nargs=2, default=[1024, 512])
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=341)
    p.add_argument("--num-labels", type=int, default=19)
    a = p.parse_args(argv)
    src = Path(a.images)
    files = [src] if src.is_file() else sorted(f for f in src.rglob("*") if f.suffix.lower() in EXTS)
    if not files:
        print(f"error: no {EXTS} images under {src}", file=sys.stderr)
        return 2
    model = load_for_inference_or_exit(a)
    if model is None:
        return 2
    tf = EvalTransform(test_scale=tuple(a.test_scale))
    os.makedirs(a.out, exist_ok=True)
    for f in files:
        img = Image.open(f).convert("RGB")
        x = tf(img, np.zeros((img.height, img.width), np.uint8))["pixel_values"].unsqueeze(0)
        kw = {"window": (a.window, a.window), "stride": (a.stride, a.stride)} if a.mode == "slide" else {}
        with torch.no_grad():
            logits = inference(lambda t: model(pixel_values=t).logits, x, a.num_labels, mode=a.mode,
                               out_size=(img.height, img.width), **kw)
        pred = logits.argmax(1)[0].numpy().astype(np.uint8)
        side = np.concatenate([np.asarray(img), colorize(pred)], axis=1)
        Image.fromarray(side).save(Path(a.out) / f"{f.stem}_pred.png")
    print(f"wrote {len(files)} predictions to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
