"""Test-time augmentation (multi-scale + horizontal flip) over whole-image or sliding-window inference.

What mmsegmentation's `TestTimeAug` pipeline + `SegTTAModel` do (mmseg 1.x, `models/segmentors/seg_tta.py`):
for every scale factor r and every flip,

1. resize the image by r (keep ratio: `(int(w * r + 0.5), int(h * r + 0.5))`, mmcv's rounding),
2. flip it horizontally (when flipping),
3. run slide / whole inference on it (window logits averaged, upsampled to the resized image),
4. flip the logits back, resize them bilinearly to the output size (the label's),
5. softmax over classes;

then average the probabilities over all (scale, flip) pairs and argmax. The result here is that average, as
probabilities (B, C, H, W) at `out_size`, float32.

Images are resized as normalized tensors (bilinear, `align_corners=False`, no antialiasing: cv2's INTER_LINEAR,
which mmcv uses, does not antialias either); mmseg resizes the uint8 image before normalizing, so values differ
in rounding only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .._checks import finite_number
from .sliding import inference

# SoMA's `tta_pipeline` (configs/_base_/datasets/dg_gta_512x512.py): img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
MMSEG_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@dataclass(frozen=True)
class TTA:
    """Scale factors (relative to the evaluation image) and whether to add the horizontally flipped copy.

    `TTA()` is no augmentation (one pass at scale 1). `TTA(MMSEG_RATIOS, flip=True)` is SoMA's aug config
    (12 passes)."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self):
        scales = tuple(self.scales) if isinstance(self.scales, (list, tuple)) else (self.scales,)
        if not scales:
            raise ValueError("TTA.scales is empty; expected at least one scale factor, e.g. (1.0,)")
        for i, s in enumerate(scales):
            finite_number(f"TTA.scales[{i}]", s, low=0, low_open=True)
        if not isinstance(self.flip, bool):
            raise ValueError(f"TTA.flip={self.flip!r}; expected True or False")
        object.__setattr__(self, "scales", tuple(float(s) for s in scales))

    @property
    def enabled(self) -> bool:
        return self.flip or self.scales != (1.0,)

    @property
    def passes(self) -> int:
        return len(self.scales) * (2 if self.flip else 1)

    def describe(self) -> str:
        if not self.enabled:
            return "no TTA"
        s = ", ".join(f"{r:g}" for r in self.scales)
        return f"TTA scales {s}" + (" + flip" if self.flip else "")


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """(h, w) resized by `scale`, keep ratio, rounded as mmcv's `_scale_size`: int(x * scale + 0.5)."""
    return max(int(h * scale + 0.5), 1), max(int(w * scale + 0.5), 1)


@torch.no_grad()
def tta_inference(model_fn: Callable, pixel_values: torch.Tensor, num_classes: int, tta: Optional[TTA] = None,
                  mode: str = "slide", out_size: Optional[tuple[int, int]] = None, **slide_kwargs) -> torch.Tensor:
    """Softmax probabilities (B, C, *out_size) averaged over `tta`'s scales and flips (see the module docstring).

    `out_size` defaults to the input size; `slide_kwargs` (window, stride, windows_per_call) go to the sliding
    window at every scale. With `tta=None` or `TTA()` this is softmax(inference(...)) of one pass."""
    tta = tta or TTA()
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be (B, 3, H, W), got shape {tuple(pixel_values.shape)}")
    h, w = pixel_values.shape[-2:]
    out_size = tuple(out_size) if out_size is not None else (h, w)
    total = None
    for scale in tta.scales:
        size = scaled_size(h, w, scale)
        x = pixel_values if size == (h, w) else F.interpolate(pixel_values, size=size, mode="bilinear",
                                                              align_corners=False)
        for flip in ((False, True) if tta.flip else (False,)):
            xi = x.flip(-1) if flip else x
            logits = inference(model_fn, xi, num_classes, mode=mode, **slide_kwargs)  # at the resized image
            if flip:
                logits = logits.flip(-1)
            if tuple(logits.shape[-2:]) != out_size:
                logits = F.interpolate(logits.float(), size=out_size, mode="bilinear", align_corners=False)
            probs = logits.float().softmax(dim=1)
            total = probs if total is None else total + probs
    return total / tta.passes
