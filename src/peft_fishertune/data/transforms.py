"""Segmentation transforms (numpy / PIL / torch; no torchvision).

Both transforms are called as ``transform(image, label) -> {"pixel_values", "labels"}``
with ``image`` a PIL RGB image (or HxWx3 uint8 array) and ``label`` a HxW uint8
trainId array (or PIL "L"); pass them to ``load_dgss_dataset(transform=...)`` or
``with_dgss_transform``. Labels are only ever resized with nearest neighbour and
padded with 255. The training pipeline follows the mmsegmentation one used by
Rein: RandomResize(base scale, ratio 0.5-2.0, keep ratio) -> RandomCrop(512,
cat_max_ratio 0.75) -> RandomFlip(0.5) -> PhotoMetricDistortion -> normalize
(ImageNet mean/std) -> pad to the crop size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .labels import IGNORE_INDEX

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255 scale
IMAGENET_STD = (58.395, 57.12, 57.375)

_INTERP = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "bicubic": Image.BICUBIC}


def _as_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image must be a PIL image or an HxWx3 uint8 array, got shape {arr.shape} dtype {arr.dtype}")
    return Image.fromarray(arr)


def _as_label(label) -> np.ndarray:
    arr = np.asarray(label)
    if arr.ndim != 2:
        raise ValueError(f"label must be an HxW array of trainIds, got shape {arr.shape}")
    return arr.astype(np.uint8, copy=False)


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """Keep-ratio target size fitting ``scale`` = (long edge, short edge), mmcv's ``rescale_size``."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(width, height), short_edge / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def resize_pair(image: Image.Image, label: np.ndarray | None, size: tuple[int, int], interpolation: str = "bilinear"):
    """Resize image (``interpolation``) and label (always nearest) to ``size`` = (W, H)."""
    if image.size != size:
        image = image.resize(size, _INTERP[interpolation])
    if label is not None and (label.shape[1], label.shape[0]) != size:
        label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    return image, label


def normalize(image: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """HxWx3 uint8 -> (3, H, W) float32, ``(x - mean) / std`` on the 0..255 scale.

    Computed in numpy and wrapped with ``torch.from_numpy`` (no torch CPU kernels: in
    DataLoader workers these contend for threads and were 10x slower here)."""
    arr = np.asarray(image)
    scale = (1.0 / np.asarray(std, np.float32)).reshape(3, 1, 1)
    shift = (np.asarray(mean, np.float32) / np.asarray(std, np.float32)).reshape(3, 1, 1)
    out = arr.transpose(2, 0, 1).astype(np.float32)  # (3, H, W), contiguous copy
    out *= scale
    out -= shift
    return torch.from_numpy(out)


def denormalize(pixel_values: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Inverse of :func:`normalize` for one (3, H, W) tensor -> HxWx3 uint8 (rounded)."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    x = (pixel_values.detach().cpu().float() * s + m).round().clamp(0, 255)
    return x.byte().permute(1, 2, 0).numpy()


class _ProcessRNG:
    """A numpy Generator per process: seeded from ``torch.initial_seed()`` (which differs in
    every DataLoader worker and follows ``torch.manual_seed``) unless a seed is given."""

    def __init__(self, seed: int | None):
        self.seed = seed
        self._pid = None
        self._rng = None

    def get(self) -> np.random.Generator:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            base = torch.initial_seed() if self.seed is None else self.seed
            self._rng = np.random.default_rng(base)
        return self._rng

    def __getstate__(self):
        return {"seed": self.seed, "_pid": None, "_rng": None}


def photometric_distortion(
    img: np.ndarray,
    rng: np.random.Generator,
    brightness_delta: int = 32,
    contrast_range=(0.5, 1.5),
    saturation_range=(0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on HxWx3 uint8: each step with p=0.5, contrast
    before or after saturation/hue at random. ``hue_delta`` is on OpenCV's 0..180 hue scale."""

    def clip(x):
        return np.clip(x, 0, 255).astype(np.uint8)

    def contrast(x):
        if rng.random() < 0.5:
            x = clip(x.astype(np.float32) * rng.uniform(*contrast_range))
        return x

    if rng.random() < 0.5:
        img = clip(img.astype(np.float32) + rng.uniform(-brightness_delta, brightness_delta))
    mode = int(rng.integers(2))
    if mode == 1:
        img = contrast(img)
    do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
    if do_sat or do_hue:
        hsv = np.asarray(Image.fromarray(img).convert("HSV")).astype(np.float32)
        if do_sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*saturation_range), 0, 255)
        if do_hue:
            shift = int(rng.integers(-hue_delta, hue_delta + 1)) * 256.0 / 180.0
            hsv[..., 0] = np.mod(hsv[..., 0] + shift, 256.0)
        img = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"))
    if mode == 0:
        img = contrast(img)
    return img


def cat_max_ratio_crop_box(
    label: np.ndarray, crop: tuple[int, int], rng: np.random.Generator, cat_max_ratio: float = 0.75, tries: int = 10
) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a random crop (H, W) = ``crop``; re-drawn up to ``tries`` times while
    one class covers >= ``cat_max_ratio`` of the crop's labeled pixels (or only one class is present)."""
    h, w = label.shape
    ch, cw = crop

    def draw():
        y0 = int(rng.integers(0, max(h - ch, 0) + 1))
        x0 = int(rng.integers(0, max(w - cw, 0) + 1))
        return y0, min(y0 + ch, h), x0, min(x0 + cw, w)

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            y0, y1, x0, x1 = box
            counts = np.bincount(label[y0:y1, x0:x1].ravel(), minlength=256)[:IGNORE_INDEX]
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = draw()
    return box


@dataclass
class TrainTransform:
    """Training augmentation; returns ``{"pixel_values": (3, crop_h, crop_w) float, "labels": (crop_h, crop_w) long}``.

    Args:
        base_scale: (long, short) edge the random resize is relative to (Rein's GTA5/Cityscapes
            configs: (1024, 512)).
        ratio_range: random factor on ``base_scale``.
        crop_size: (H, W) of the crop; images smaller than it are padded (pixels 0 after
            normalization, labels 255).
        cat_max_ratio: re-draw the crop (up to 10 times) while one class covers >= this fraction.
        flip_prob, photometric: horizontal flip probability, PhotoMetricDistortion on/off.
        image_interpolation: resampling of the image ("bilinear"); labels are always nearest.
        seed: fixes the randomness (else drawn from ``torch.initial_seed()`` per process).
    """

    base_scale: tuple[int, int] = (1024, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop_size: tuple[int, int] = (512, 512)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    image_interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.crop_size, int):
            self.crop_size = (self.crop_size, self.crop_size)
        if not (0 < self.ratio_range[0] <= self.ratio_range[1]):
            raise ValueError(f"ratio_range={self.ratio_range} must satisfy 0 < low <= high")
        if not (0.0 < self.cat_max_ratio <= 1.0):
            raise ValueError(f"cat_max_ratio={self.cat_max_ratio} must be in (0, 1]")
        if self.image_interpolation not in _INTERP:
            raise ValueError(f"image_interpolation={self.image_interpolation!r} not in {sorted(_INTERP)}")
        self._rng = _ProcessRNG(self.seed)

    def __call__(self, image, label, rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
        """``rng``: draw this sample's augmentation from it (e.g. seeded by the sample index, so a resumed
        run repeats it exactly); default: this process's generator."""
        rng = self._rng.get() if rng is None else rng
        image, label = _as_pil(image), _as_label(label)
        if image.size != (label.shape[1], label.shape[0]):
            raise ValueError(f"image is {image.size} (W, H) but label is {label.shape[::-1]}")
        ratio = rng.uniform(*self.ratio_range)
        scale = (int(self.base_scale[0] * ratio), int(self.base_scale[1] * ratio))
        image, label = resize_pair(image, label, rescale_size(*image.size, scale), self.image_interpolation)
        y0, y1, x0, x1 = cat_max_ratio_crop_box(label, self.crop_size, rng, self.cat_max_ratio)
        img = np.asarray(image)[y0:y1, x0:x1]
        lbl = label[y0:y1, x0:x1]
        if rng.random() < self.flip_prob:
            img, lbl = img[:, ::-1], lbl[:, ::-1]
        if self.photometric:
            img = photometric_distortion(np.ascontiguousarray(img), rng)
        ch, cw = self.crop_size
        h, w = lbl.shape
        if h < ch or w < cw:  # pad bottom/right: pixels 0 after normalization, labels 255
            pixel_values = np.zeros((3, ch, cw), np.float32)
            pixel_values[:, :h, :w] = normalize(img, self.mean, self.std).numpy()
            labels = np.full((ch, cw), IGNORE_INDEX, np.int64)
            labels[:h, :w] = lbl
            return {"pixel_values": torch.from_numpy(pixel_values), "labels": torch.from_numpy(labels)}
        return {"pixel_values": normalize(img, self.mean, self.std), "labels": torch.from_numpy(lbl.astype(np.int64))}


@dataclass
class EvalTransform:
    """Evaluation: resize the image to ``test_scale`` (keep ratio; (1024, 512) = Rein's protocol,
    (2048, 1024) = full Cityscapes resolution). The label stays at its original size unless
    ``resize_label`` (then nearest); predictions are upsampled to the label size (mmseg protocol)."""

    test_scale: tuple[int, int] = (1024, 512)
    keep_ratio: bool = True
    resize_label: bool = False
    image_interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.image_interpolation not in _INTERP:
            raise ValueError(f"image_interpolation={self.image_interpolation!r} not in {sorted(_INTERP)}")

    def __call__(self, image, label) -> dict[str, torch.Tensor]:
        image, label = _as_pil(image), _as_label(label)
        size = rescale_size(*image.size, self.test_scale) if self.keep_ratio else tuple(self.test_scale)
        image, _ = resize_pair(image, None, size, self.image_interpolation)
        if self.resize_label:
            _, label = resize_pair(image, label, size)
        return {
            "pixel_values": normalize(np.asarray(image), self.mean, self.std),
            "labels": torch.from_numpy(np.asarray(label).astype(np.int64)),
        }


class SegmentationCollator:
    """Batch ``{"pixel_values", "labels"}`` samples into ``(B, 3, H, W)`` float / ``(B, H, W)`` long.

    Samples of different sizes raise a ValueError unless ``pad=True`` (pad bottom/right:
    pixels 0, labels 255; padded area is ignored by the metric)."""

    def __init__(self, pad: bool = False):
        self.pad = pad

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("collate got an empty list of samples")
        for key in ("pixel_values", "labels"):
            if key not in samples[0]:
                raise ValueError(
                    f"collate: sample has keys {sorted(samples[0])}, expected 'pixel_values' and 'labels' "
                    "(load the dataset with transform=TrainTransform()/EvalTransform())"
                )
        pv = [torch.as_tensor(s["pixel_values"]) for s in samples]
        lb = [torch.as_tensor(s["labels"]) for s in samples]
        return {"pixel_values": self._stack(pv, 0.0, "pixel_values"), "labels": self._stack(lb, IGNORE_INDEX, "labels").long()}

    def _stack(self, items: list[torch.Tensor], value, key: str) -> torch.Tensor:
        shapes = {tuple(t.shape) for t in items}
        if len(shapes) == 1:
            return torch.stack(items)
        if not self.pad:
            raise ValueError(
                f"collate: {key} have different shapes {sorted(shapes)}; use batch size 1 for evaluation "
                "or SegmentationCollator(pad=True)"
            )
        h = max(t.shape[-2] for t in items)
        w = max(t.shape[-1] for t in items)
        return torch.stack(
            [torch.nn.functional.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]), value=value) for t in items]
        )


collate_fn = SegmentationCollator()
