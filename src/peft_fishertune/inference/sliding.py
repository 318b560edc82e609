"""Whole-image and sliding-window inference for any model that returns per-pixel logits.

``model_fn(pixel_values (B, 3, h, w)) -> logits (B, C, h', w')`` (a tensor, or an object
with ``.logits`` such as a transformers output). Logits smaller than the input window
(stride-4/14 heads) are upsampled bilinearly to the window before averaging.
Default protocol (Rein / mmseg): 512x512 windows, stride 341, on images resized to
1024x512; see ``EvalTransform``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .._checks import integer


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    raise TypeError(f"model_fn returned {type(out).__name__}; expected a logits tensor (B, C, h, w) or .logits")


def _resize(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _check(pixel_values: torch.Tensor, logits: torch.Tensor, num_classes: int | None) -> None:
    if logits.dim() != 4 or logits.shape[0] != pixel_values.shape[0]:
        raise ValueError(
            f"model_fn must return logits (B, C, h, w) with B={pixel_values.shape[0]}, got shape {tuple(logits.shape)}"
        )
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"model_fn returned {logits.shape[1]} channels, num_classes={num_classes}")


@torch.no_grad()
def whole_inference(
    model_fn: Callable, pixel_values: torch.Tensor, num_classes: int | None = None, out_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Run the model on the whole image; logits upsampled to ``out_size`` (default: the input size)."""
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be (B, 3, H, W), got shape {tuple(pixel_values.shape)}")
    logits = _logits(model_fn(pixel_values))
    _check(pixel_values, logits, num_classes)
    return _resize(logits, out_size or tuple(pixel_values.shape[-2:]))


def window_grid(h: int, w: int, window: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of every window, mmseg's grid: the last row/column is aligned to the border."""
    wh, ww = window
    sh, sw = stride
    rows = max(h - wh + sh - 1, 0) // sh + 1
    cols = max(w - ww + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * sh + wh, h), min(c * sw + ww, w)
            boxes.append((max(y1 - wh, 0), y1, max(x1 - ww, 0), x1))
    return boxes


def _pair(name: str, value) -> tuple[int, int]:
    """An int or an (h, w) pair of ints >= 1, as (h, w)."""
    hw = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(hw) != 2:
        raise ValueError(f"{name}={value!r}; expected an int or an (h, w) pair")
    return integer(f"{name}[0]", hw[0], low=1), integer(f"{name}[1]", hw[1], low=1)


@torch.no_grad()
def slide_inference(
    model_fn: Callable,
    pixel_values: torch.Tensor,
    num_classes: int,
    window: int | tuple[int, int] = 512,
    stride: int | tuple[int, int] = 341,
    out_size: tuple[int, int] | None = None,
    windows_per_call: int = 1,
) -> torch.Tensor:
    """Average the logits of overlapping windows over the image.

    Args:
        pixel_values: (B, 3, H, W) normalized images.
        num_classes: C, the logits' channel count (checked).
        window, stride: window size and stride (int or (h, w)); 512 / 341 = Rein's protocol.
        out_size: (H, W) to upsample the averaged logits to (e.g. the label size); default input size.
        windows_per_call: how many window positions to stack into one model call (B * n crops).
    Returns:
        logits (B, C, *out_size), float32.
    """
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be (B, 3, H, W), got shape {tuple(pixel_values.shape)}")
    window, stride = _pair("window", window), _pair("stride", stride)
    if stride[0] > window[0] or stride[1] > window[1]:
        raise ValueError(f"stride={stride} must not be larger than window={window}")
    per_call = integer("windows_per_call", windows_per_call, low=1)
    b, _, h, w = pixel_values.shape
    out = pixel_values.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = pixel_values.new_zeros((1, 1, h, w), dtype=torch.float32)
    boxes = window_grid(h, w, window, stride)
    for i in range(0, len(boxes), per_call):
        group = boxes[i : i + per_call]
        sizes = {(y1 - y0, x1 - x0) for y0, y1, x0, x1 in group}
        if len(sizes) > 1:  # only when the image is smaller than a window on one side
            group_list = [[bx] for bx in group]
        else:
            group_list = [group]
        for g in group_list:
            crops = torch.cat([pixel_values[:, :, y0:y1, x0:x1] for y0, y1, x0, x1 in g])
            logits = _logits(model_fn(crops))
            _check(crops, logits, num_classes)
            logits = _resize(logits.float(), tuple(crops.shape[-2:]))
            for k, (y0, y1, x0, x1) in enumerate(g):
                out[:, :, y0:y1, x0:x1] += logits[k * b : (k + 1) * b]
                count[:, :, y0:y1, x0:x1] += 1
    if (count == 0).any():  # cannot happen with the grid above; guard against edits
        raise RuntimeError("sliding window left pixels uncovered")
    out = out / count
    return _resize(out, out_size) if out_size is not None else out


def inference(
    model_fn: Callable,
    pixel_values: torch.Tensor,
    num_classes: int,
    mode: str = "slide",
    out_size: tuple[int, int] | None = None,
    **slide_kwargs,
) -> torch.Tensor:
    """``mode="slide"`` (default, Rein's protocol) or ``"whole"``; returns logits at ``out_size``."""
    if mode == "slide":
        return slide_inference(model_fn, pixel_values, num_classes, out_size=out_size, **slide_kwargs)
    if mode == "whole":
        return whole_inference(model_fn, pixel_values, num_classes, out_size=out_size)
    raise ValueError(f"mode={mode!r} is not one of ('slide', 'whole')")
