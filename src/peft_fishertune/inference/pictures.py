"""Pictures of predictions, one PNG per domain: a few images x {input, ground truth, prediction, error map} in the
Cityscapes palette, with a legend; optionally logged to TensorBoard.

    paths = write_domain_pictures(model, {"cityscapes/val": ds}, "outputs/run/pictures", num_images=4,
                                  protocol="rein: slide 512/341, ...", tensorboard="outputs/run/runs")

The images are the evaluation samples as the protocol feeds them (test scale), the ground truth and the
prediction at the label's size, predicted exactly as the evaluation does (same mode, window, stride, TTA).
Error map: red = wrong, grey = right, black = ignored (void) pixels; each row says its pixel accuracy and how many
of its labelled pixels are wrong.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .sliding import inference
from .tta import TTA, tta_inference

WRONG, RIGHT, VOID = (230, 30, 30), (110, 110, 110), (0, 0, 0)
_BG, _FG = (255, 255, 255), (20, 20, 20)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _text_w(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0]


def pick_indices(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (first and last included), deterministic."""
    if n <= 0:
        return []
    k = min(k, n)
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, k)}) if k > 1 else [0]


@torch.no_grad()
def predict_sample(model, pixel_values: torch.Tensor, out_size, *, num_labels: int = 19, mode: str = "slide",
                   window=(512, 512), stride=(341, 341), tta: Optional[TTA] = None) -> np.ndarray:
    """trainId prediction (H, W) at `out_size` for one (3, h, w) sample, as `evaluate_domains` predicts."""
    device = next(model.parameters()).device
    x = pixel_values.unsqueeze(0).to(device)
    kw = {"window": tuple(window), "stride": tuple(stride)} if mode == "slide" else {}

    def logits_fn(inp):
        return model(pixel_values=inp).logits

    if tta is not None and tta.enabled:
        scores = tta_inference(logits_fn, x, num_labels, tta, mode=mode, out_size=tuple(out_size), **kw)
    else:
        scores = inference(logits_fn, x, num_labels, mode=mode, out_size=tuple(out_size), **kw)
    return scores.argmax(1)[0].cpu().numpy().astype(np.uint8)


def error_map(pred: np.ndarray, label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """RGB (H, W, 3): red where pred != label, grey where equal, black where the label is ignored."""
    out = np.empty(label.shape + (3,), np.uint8)
    out[...] = RIGHT
    out[pred != label] = WRONG
    out[label == ignore_index] = VOID
    return out


def compose_grid(rows: Sequence[dict], *, class_names: Sequence[str], palette: np.ndarray, title: str = "",
                 tile_width: int = 320) -> np.ndarray:
    """rows: [{"image": HxWx3, "label": HxW, "pred": HxW, "caption": str}] -> one RGB picture (H, W, 3) uint8:
    a title, the four column headers, a row per image, and the legend (classes and error-map colours)."""
    from ..data.labels import colorize

    pad, head = 6, 22
    font, small = _font(15), _font(13)
    tiles = []
    for r in rows:
        label, pred = np.asarray(r["label"]), np.asarray(r["pred"])
        h, w = label.shape
        th = max(int(round(tile_width * h / w)), 1)
        size = (tile_width, th)
        img = Image.fromarray(np.asarray(r["image"])).resize(size, Image.BILINEAR)
        gt = Image.fromarray(colorize(label)).resize(size, Image.NEAREST)
        pr = Image.fromarray(colorize(pred)).resize(size, Image.NEAREST)
        er = Image.fromarray(error_map(pred, label)).resize(size, Image.NEAREST)
        tiles.append(([img, gt, pr, er], th, r.get("caption", "")))
    width = pad + 4 * (tile_width + pad)
    # legend: swatch + name in columns as wide as the longest name
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    entries = [(tuple(int(v) for v in palette[i]), n) for i, n in enumerate(class_names)]
    errors = [(WRONG, "error map: wrong"), (RIGHT, "error map: right"), (VOID, "void (ignored)")]
    sw = 14
    col_w = sw + 6 + max(_text_w(probe, n, small) for _, n in entries + errors) + 14
    per_row = max((width - 2 * pad) // col_w, 1)
    entries += [None] * (-len(entries) % per_row) + errors  # the error-map colours on a line of their own
    legend_rows = -(-len(entries) // per_row)
    legend_h = legend_rows * (sw + 8) + pad
    rows_h = sum(th + head + pad for _, th, _ in tiles)
    title_h = head + pad if title else 0
    height = pad + title_h + head + rows_h + legend_h + pad
    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)
    y = pad
    if title:
        draw.text((pad, y), title, fill=_FG, font=font)
        y += title_h
    for j, name in enumerate(("input", "ground truth", "prediction", "error map")):
        x = pad + j * (tile_width + pad)
        draw.text((x + (tile_width - _text_w(draw, name, font)) // 2, y), name, fill=_FG, font=font)
    y += head
    for ims, th, caption in tiles:
        draw.text((pad, y), caption, fill=_FG, font=small)
        y += head
        for j, im in enumerate(ims):
            canvas.paste(im, (pad + j * (tile_width + pad), y))
        y += th + pad
    for k, entry in enumerate(entries):
        if entry is None:
            continue
        color, name = entry
        x = pad + (k % per_row) * col_w
        yy = y + (k // per_row) * (sw + 8)
        draw.rectangle([x, yy, x + sw, yy + sw], fill=color, outline=(80, 80, 80))
        draw.text((x + sw + 6, yy), name, fill=_FG, font=small)
    return np.asarray(canvas)


@torch.no_grad()
def domain_pictures(model, dataset, *, num_images: int = 4, indices: Optional[Sequence[int]] = None,
                    num_labels: int = 19, mode: str = "slide", window=(512, 512), stride=(341, 341),
                    tta: Optional[TTA] = None, title: str = "", tile_width: int = 320,
                    class_names: Optional[Sequence[str]] = None, ignore_index: int = 255) -> np.ndarray:
    """One domain's picture (H, W, 3) uint8: `num_images` samples spread over the dataset (or `indices`)."""
    from ..data import CLASS_NAMES, PALETTE, denormalize

    if class_names is None:
        class_names = CLASS_NAMES if num_labels == len(CLASS_NAMES) else [str(i) for i in range(num_labels)]
    palette = PALETTE if num_labels == len(PALETTE) else np.array(
        [PALETTE[i % len(PALETTE)] for i in range(num_labels)], np.uint8)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for i in (indices if indices is not None else pick_indices(len(dataset), num_images)):
            sample = dataset[i]
            label = sample["labels"].numpy() if isinstance(sample["labels"], torch.Tensor) else np.asarray(
                sample["labels"])
            pred = predict_sample(model, sample["pixel_values"], label.shape, num_labels=num_labels, mode=mode,
                                  window=window, stride=stride, tta=tta)
            valid = label != ignore_index
            n = int(valid.sum())
            wrong = int((pred[valid] != label[valid]).sum())
            acc = f"pixel acc {100 * (n - wrong) / n:.1f} % ({wrong} of {n} labelled pixels wrong)" if n else \
                "no labelled pixels"
            rows.append({"image": denormalize(sample["pixel_values"]), "label": label.astype(np.uint8),
                         "pred": pred, "caption": f"#{i}: {acc}"})
    finally:
        if was_training:
            model.train()
    return compose_grid(rows, class_names=class_names, palette=palette, title=title, tile_width=tile_width)


def safe_name(name: str) -> str:
    """A domain name as a file name: `acdc/fog/val` -> `acdc_fog_val`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "domain"


def log_pictures(writer, pictures: dict, step: int = 0, tag: str = "pictures") -> int:
    """add_image every {domain: (H, W, 3) uint8} to a TensorBoard `SummaryWriter` (or a log directory, opened and
    closed here). Returns how many were logged; 0 with a warning when tensorboard is not installed."""
    close = False
    if isinstance(writer, (str, os.PathLike)):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            import warnings

            warnings.warn("tensorboard is not installed: pictures were not logged to TensorBoard "
                          "(pip install tensorboard)", stacklevel=2)
            return 0
        writer, close = SummaryWriter(str(writer)), True
    try:
        for name, arr in pictures.items():
            writer.add_image(f"{tag}/{name}", np.asarray(arr), global_step=step, dataformats="HWC")
    finally:
        if close:
            writer.close()
        else:
            writer.flush()  # a writer the caller keeps open (e.g. the trainer's) may never be closed
    return len(pictures)


def write_domain_pictures(model, domains: dict, output_dir: str, *, tensorboard=None, step: int = 0,
                          protocol: str = "", **kwargs) -> dict[str, str]:
    """A PNG per domain, `<output_dir>/<domain>.png` (see `domain_pictures` for kwargs); with `tensorboard` (a
    SummaryWriter or a log directory) also logged there as `pictures/<domain>`. Returns {domain: path}."""
    os.makedirs(output_dir, exist_ok=True)
    paths, arrays = {}, {}
    for name, ds in domains.items():
        title = f"{name} - {protocol}" if protocol else name
        arr = domain_pictures(model, ds, title=title, **kwargs)
        stem, k = safe_name(name), 1
        while os.path.join(output_dir, f"{stem}.png") in paths.values():  # two names, one file name
            k += 1
            stem = f"{safe_name(name)}-{k}"
        path = os.path.join(output_dir, f"{stem}.png")
        Image.fromarray(arr).save(path)
        paths[name], arrays[name] = path, arr
    if tensorboard is not None:
        log_pictures(tensorboard, arrays, step=step)
    return paths
