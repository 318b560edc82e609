#!/usr/bin/env python
"""Predict segmentation maps: raw trainId PNGs, Cityscapes labelIds PNGs (--label-ids) and overlays with a legend.

    python scripts/predict.py --model outputs/demo/base_model --adapter outputs/demo/adapter \
        --images outputs/demo_data/night/leftImg8bit/val --out outputs/predictions --window 128 --stride 85 \
        --test-scale 256 128 --label-ids

--images is one image or a folder searched recursively (.png, .jpg, .jpeg). The input tree is mirrored under --out,
one file per input image and kind (<rel> = the image's path relative to --images, without its extension):

    <out>/trainIds/<rel>.png   raw trainIds 0..18, 8-bit single-channel (mode L)
    <out>/labelIds/<rel>.png   Cityscapes label IDs 7..33 (--label-ids): the folder to zip for the benchmark server
    <out>/overlay/<rel>.png    the image blended with the Cityscapes palette, a legend of the classes on its right

Nothing is overwritten: when any of these files exists, the run stops before the model is loaded (--overwrite
replaces them). Bad input (a missing --images, a folder without images, an unreadable image, a bad --model or
--adapter, an --out that is a file, a --num-labels other than the model's) prints one line naming the argument or
file and exits with code 2, like scripts/train.py. --num-labels defaults to the model's class count.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

EXTS = (".png", ".jpg", ".jpeg")
KINDS = ("trainIds", "labelIds", "overlay")
MARKER = "predict_info.json"  # written into --out; folders holding it are never read as input


class InputError(Exception):
    """Bad command-line input: printed as one `error: ...` line, exit code 2."""


def find_images(src: Path, out: Path) -> list[tuple[Path, Path]]:
    """(image, its path relative to --images without the extension) for every image; outputs under --out are
    skipped (a rerun must not read its own predictions)."""
    if not src.exists():
        raise InputError(f"--images {str(src)!r} does not exist")
    if src.is_file():
        return [(src, Path(src.stem))]
    out_abs = out.resolve()
    files = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        here = Path(dirpath).resolve()
        if here == out_abs or out_abs in here.parents or MARKER in filenames:
            dirnames.clear()  # this run's --out, or the output folder of an earlier run
            continue
        files += [Path(dirpath) / f for f in sorted(filenames) if f.lower().endswith(EXTS)]
    if not files:
        raise InputError(f"--images {str(src)!r} holds no image files ({', '.join(EXTS)}; searched recursively)")
    pairs, seen = [], {}
    for f in files:
        rel = f.relative_to(src).with_suffix("")
        if rel in seen:
            raise InputError(f"--images: {seen[rel]} and {f} would both be written as {rel}.png; rename one")
        seen[rel] = f
        pairs.append((f, rel))
    return pairs


def targets(out: Path, rel: Path, kinds) -> dict[str, Path]:
    return {k: out / k / rel.parent / (rel.name + ".png") for k in kinds}


def check_inputs(files, out: Path, kinds, overwrite: bool) -> None:
    """Everything that can be wrong with the input, before the model is loaded: --out, existing outputs, and every
    image decoded to the last byte (a truncated file fails here, not after half the predictions)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} exists and is not a folder")
    if not overwrite:
        existing = [p for _, rel in files for p in targets(out, rel, kinds).values() if p.exists()]
        if existing:
            raise InputError(f"--out {str(out)!r} already holds {len(existing)} of the files this run would write "
                             f"(e.g. {existing[0]}); pass --overwrite to replace them, or choose another --out")
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im.load()
        except Exception as e:  # noqa: BLE001 - every decode failure names the file
            raise InputError(f"cannot read image file {f}: {e}") from None


def check_model_dir(model_dir) -> None:
    """A --model directory whose config does not parse is named here (the loader's JSON error names no file)."""
    from peft_fishertune.models.segmentor import CONFIG_NAME

    path = os.path.join(model_dir, CONFIG_NAME) if model_dir is not None else None
    if path is not None and os.path.isfile(path):
        try:
            json.loads(Path(path).read_text())
        except (ValueError, OSError) as e:
            raise InputError(f"--model {model_dir!r}: cannot read {path}: {e}") from None


def main(argv=None) -> int:
    from peft_fishertune.data import EvalTransform, overlay_with_legend, train_ids_to_label_ids
    from peft_fishertune.inference import inference
    from peft_fishertune.training.trained_run import add_model_arguments, load_for_inference_or_exit

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--images", required=True, help="an image file or a folder (searched recursively)")
    p.add_argument("--out", required=True, help="output folder; the input tree is mirrored under out/<kind>/")
    p.add_argument("--label-ids", action="store_true",
                   help="also write Cityscapes label-ID PNGs under out/labelIds/ (benchmark submission)")
    p.add_argument("--no-overlay", action="store_true", help="do not write the overlay images")
    p.add_argument("--overwrite", action="store_true", help="replace prediction files that exist")
    p.add_argument("--mode", choices=["slide", "whole"], default="slide")
    p.add_argument("--test-scale", type=int, nargs=2, default=[1024, 512])
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=341)
    p.add_argument("--num-labels", type=int, default=None,
                   help="classes the model predicts (default: the model's; a different value is refused)")
    a = p.parse_args(argv)
    src, out = Path(a.images), Path(a.out)
    kinds = [k for k in KINDS if (k != "labelIds" or a.label_ids) and (k != "overlay" or not a.no_overlay)]
    try:
        if a.label_ids and a.num_labels not in (None, 19):
            raise InputError(f"--label-ids needs the 19 Cityscapes classes; --num-labels is {a.num_labels}")
        if a.num_labels is not None and a.num_labels < 1:
            raise InputError(f"--num-labels={a.num_labels}; expected a positive number of classes")
        if a.mode == "slide" and not 0 < a.stride <= a.window:
            raise InputError(f"--stride {a.stride} must be in 1..--window ({a.window}): windows would leave gaps")
        files = find_images(src, out)
        check_inputs(files, out, kinds, a.overwrite)
        check_model_dir(a.model)
        try:
            model = load_for_inference_or_exit(a)
        except Exception as e:  # noqa: BLE001 - a broken checkpoint: one line naming the arguments
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(f"cannot load the model (--model {a.model!r}, --config {a.config!r}, "
                             f"--adapter {a.adapter!r}): {type(e).__name__}: {first}") from None
        if model is None:
            return 2  # load_for_inference_or_exit printed the error
        have = getattr(model, "num_labels", None)
        if not isinstance(have, int):
            have = a.num_labels or 19
        if a.num_labels is not None and a.num_labels != have:
            raise InputError(f"--num-labels={a.num_labels}, but the model predicts {have} classes")
        a.num_labels = have
        if a.label_ids and have != 19:
            raise InputError(f"--label-ids needs the 19 Cityscapes classes; the model predicts {have}")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"images": str(src), "model": a.model, "config": a.config,
                                          "adapter": a.adapter, "kinds": kinds, "mode": a.mode,
                                          "test_scale": a.test_scale, "window": a.window, "stride": a.stride}, indent=1))
    tf = EvalTransform(test_scale=tuple(a.test_scale))
    kw = {"window": (a.window, a.window), "stride": (a.stride, a.stride)} if a.mode == "slide" else {}
    for f, rel in files:
        with Image.open(f) as im:
            img = im.convert("RGB")
        x = tf(img, np.zeros((img.height, img.width), np.uint8))["pixel_values"].unsqueeze(0)
        with torch.no_grad():
            logits = inference(lambda t: model(pixel_values=t).logits, x, a.num_labels, mode=a.mode,
                               out_size=(img.height, img.width), **kw)
        pred = logits.argmax(1)[0].numpy().astype(np.uint8)
        dest = targets(out, rel, kinds)
        for path in dest.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pred, mode="L").save(dest["trainIds"])
        if "labelIds" in dest:
            Image.fromarray(train_ids_to_label_ids(pred), mode="L").save(dest["labelIds"])
        if "overlay" in dest:
            overlay_with_legend(img, pred).save(dest["overlay"])
    print(f"wrote {len(files)} predictions ({', '.join(kinds)}) under {out}, mirroring {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
