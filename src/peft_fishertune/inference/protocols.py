"""Published DGSS test protocols by name: test scale per dataset, slide / whole, window, stride, TTA, half-size
Mapillary labels.

    from peft_fishertune.inference.protocols import resolve_protocol, protocol_transform
    setting = resolve_protocol("rein", "mapillary")   # -> ProtocolSetting(test_scale=(1024, 512), ..., half=True)
    ds = EvalDataset(load_dgss_dataset("mapillary", root, split="val"), protocol_transform("rein", "mapillary"))

Every number below is read from the papers' released configs (paths relative to each repository):

- Rein (w1oves/Rein @7da85bc): `configs/_base_/datasets/cityscapes_512x512.py` (test Resize(1024, 512)),
  `gta_512x512.py` (1280, 720; SoMA's file is the same),
  `bdd100k_512x512.py` (1280, 720), `mapillary_512x512.py` (images/labels from `half/val_img`, `half/val_label`,
  then Resize(1024, 512)), `fog-acdc_512x512.py` (and night/rain/snow: Resize(960, 540));
  `configs/_base_/models/rein_dinov2_mask2former.py` test_cfg slide crop 512 stride 341;
  `tools/convert_datasets/mapillary_resize.py` (the half copy: image (w // 2, h // 2) bicubic, label nearest).
  Rein's 1024x1024 configs (`configs/dinov2/rein_dinov2_mask2former_1024x1024_bs4x2.py`: slide 1024 / 683;
  `cityscapes_1024x1024.py` Resize(2048, 1024); `fog-acdc_1024x1024.py` Resize(1920, 1080)).
- SoMA (ysj9909/SoMA @7ea8c0e): `configs/_base_/datasets/cityscapes_512x512.py` test Resize(2048, 1024),
  `mapillary_512x512.py` (half copy, then Resize(2048, 1024)), `bdd100k_512x512.py` (1280, 720), ACDC
  `fog-acdc_512x512.py` (960, 540); `configs/_base_/models/dinov2_mask2former.py` slide 512 / 341;
  `configs/_base_/datasets/dg_gta_512x512.py` defines `tta_pipeline` = TestTimeAug over
  Resize(scale_factor=r) for r in [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] x RandomFlip(prob 0 / 1), applied to the image
  as loaded (the half copy for Mapillary); `tools/test.py` uses it only with `--tta` (the README's evaluation
  command has no `--tta`), hence two presets, `soma` and `soma-tta`. SoMA's 1024x1024 configs (`soma-1024`):
  `configs/sora/sora_dinov2-L_mask2former_gsu2cbm_1024x1024.py` slide 1024 / 683;
  `configs/_base_/datasets/{cityscapes,bdd100k,mapillary}_1024x1024.py` Resize(2048, 1024) (Mapillary: half copy),
  `fog-acdc_1024x1024.py` Resize(1920, 1080).
- tqdm (ByeongHyunPak/tqdm @46e616c): `configs/_base_/datasets/gta2city-512.py` MultiScaleFlipAug
  img_scale (2048, 1024), flip False; `gta2bdd-512.py` (1280, 720); `gta2map-512.py` (2048, 1024) on the
  full-resolution `validation/` images (no half copy); `configs/tqdm/*.py` test_cfg slide 512 / 341.

Not verified from code (so not a preset): DepthForge.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .tta import MMSEG_RATIOS, TTA

# test scale as (long edge, short edge), mmcv keep-ratio rescale; None = the image as loaded (no resize)
Scale = Optional[tuple[int, int]]


@dataclass(frozen=True)
class Protocol:
    """One published test protocol: a row of `PROTOCOLS`.

    scales: {dataset name: test scale}; "default" is used for datasets not listed (e.g. synthetic domains).
    half: datasets evaluated on a half-size copy (image (w // 2, h // 2) bicubic, label nearest, as Rein's
        `mapillary_resize.py`): the metric is computed on the half-size label.
    """

    name: str
    description: str
    scales: dict = field(default_factory=dict)
    mode: str = "slide"
    window: int = 512
    stride: int = 341
    tta: TTA = TTA()
    half: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProtocolSetting:
    """A protocol resolved for one dataset: what `evaluate_domains` and the transform need."""

    protocol: str
    dataset: str
    test_scale: Scale
    mode: str
    window: tuple[int, int]
    stride: tuple[int, int]
    tta: TTA
    half: bool

    def describe(self) -> str:
        """e.g. `rein: slide 512/341, test scale 1024x512, half-size labels, no TTA` (names every setting)."""
        where = _where(self)
        scale = f"test scale {self.test_scale[0]}x{self.test_scale[1]}" if self.test_scale else "image as loaded"
        half = ", half-size image and label" if self.half else ""
        return f"{self.protocol}: {where}, {scale}{half}, {self.tta.describe()}"


def _where(s: ProtocolSetting) -> str:
    """`slide 512/341` (square window and stride, as the papers write it), `slide 512x1024/341x683`, or `whole`."""
    if s.mode != "slide":
        return s.mode
    if s.window[0] == s.window[1] and s.stride[0] == s.stride[1]:
        return f"slide {s.window[0]}/{s.stride[0]}"
    return f"slide {s.window[0]}x{s.window[1]}/{s.stride[0]}x{s.stride[1]}"


_REIN_SOURCES = ("w1oves/Rein configs/_base_/datasets/{cityscapes,bdd100k,mapillary,fog-acdc}_512x512.py",
                 "w1oves/Rein configs/_base_/models/rein_dinov2_mask2former.py (test_cfg)",
                 "w1oves/Rein tools/convert_datasets/mapillary_resize.py")
_SOMA_SOURCES = ("ysj9909/SoMA configs/_base_/datasets/{cityscapes,bdd100k,mapillary,fog-acdc}_512x512.py",
                 "ysj9909/SoMA configs/_base_/models/dinov2_mask2former.py (test_cfg)")

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("rein", "Rein (CVPR 2024), 512x512 configs: Cityscapes at 1024x512, Mapillary half-size, slide 512/341",
             scales={"default": (1024, 512), "cityscapes": (1024, 512), "gta5": (1280, 720),
                     "bdd100k": (1280, 720), "mapillary": (1024, 512), "acdc": (960, 540)},
             half=("mapillary",), sources=_REIN_SOURCES),
    Protocol("rein-1024", "Rein, 1024x1024 configs (Cityscapes -> ACDC): full resolution, slide 1024/683",
             scales={"default": (2048, 1024), "cityscapes": (2048, 1024), "bdd100k": (1280, 720),
                     "acdc": (1920, 1080)},
             window=1024, stride=683,
             sources=("w1oves/Rein configs/dinov2/rein_dinov2_mask2former_1024x1024_bs4x2.py",
                      "w1oves/Rein configs/_base_/datasets/{cityscapes,fog-acdc}_1024x1024.py")),
    Protocol("soma", "SoMA (CVPR 2025): Cityscapes at 2048x1024, Mapillary half-size, slide 512/341, no TTA "
                     "(its README's test command)",
             scales={"default": (2048, 1024), "cityscapes": (2048, 1024), "gta5": (1280, 720),
                     "bdd100k": (1280, 720), "mapillary": (2048, 1024), "acdc": (960, 540)},
             half=("mapillary",), sources=_SOMA_SOURCES + ("ysj9909/SoMA README.md (tools/test.py without --tta)",)),
    Protocol("soma-tta", "SoMA's aug config (tools/test.py --tta): scales 0.5-1.75 x flip on the image as loaded "
                         "(half-size for Mapillary), slide 512/341, softmax averaged",
             scales={"default": None}, tta=TTA(MMSEG_RATIOS, flip=True), half=("mapillary",),
             sources=_SOMA_SOURCES + ("ysj9909/SoMA configs/_base_/datasets/dg_gta_512x512.py (tta_pipeline)",
                                      "ysj9909/SoMA tools/test.py (--tta)")),
    Protocol("soma-1024", "SoMA, 1024x1024 configs: every target at 2048x1024 (BDD upscaled), Mapillary half-size, "
                          "ACDC 1920x1080, slide 1024/683, no TTA",
             scales={"default": (2048, 1024), "cityscapes": (2048, 1024), "bdd100k": (2048, 1024),
                     "mapillary": (2048, 1024), "acdc": (1920, 1080)},
             window=1024, stride=683, half=("mapillary",),
             sources=("ysj9909/SoMA configs/sora/sora_dinov2-L_mask2former_gsu2cbm_1024x1024.py (test_cfg)",
                      "ysj9909/SoMA configs/_base_/datasets/{cityscapes,bdd100k,mapillary,fog-acdc}_1024x1024.py")),
    Protocol("tqdm", "tqdm (ECCV 2024): Cityscapes and Mapillary (full resolution) at 2048x1024, BDD 1280x720, "
                     "slide 512/341",
             scales={"default": (2048, 1024), "cityscapes": (2048, 1024), "bdd100k": (1280, 720),
                     "mapillary": (2048, 1024)},
             sources=("ByeongHyunPak/tqdm configs/_base_/datasets/gta2{city,bdd,map}-512.py",
                      "ByeongHyunPak/tqdm configs/tqdm/tqdm_eva_vit-l_1e-5_20k-g2c-512.py (test_cfg)")),
    Protocol("whole", "whole-image inference at 1024x512 (no sliding window; not a paper's protocol)",
             scales={"default": (1024, 512), "bdd100k": (1280, 720), "acdc": (960, 540)}, mode="whole"),
)}


def protocol_names() -> list[str]:
    return list(PROTOCOLS)


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"eval_protocol={name!r} is not a known protocol; expected one of {protocol_names()}")
    return PROTOCOLS[name]


def resolve_protocol(name: str, dataset: str = "cityscapes") -> ProtocolSetting:
    """The protocol `name` for `dataset` (a registered dataset name: cityscapes, bdd100k, mapillary, acdc, ...)."""
    p = get_protocol(name)
    scale = p.scales.get(dataset, p.scales.get("default"))
    return ProtocolSetting(protocol=p.name, dataset=dataset, test_scale=None if scale is None else tuple(scale),
                           mode=p.mode, window=(p.window, p.window), stride=(p.stride, p.stride), tta=p.tta,
                           half=dataset in p.half)


def resolve_domains(name: str, datasets: dict) -> dict:
    """{domain: registered dataset name} -> {domain: ProtocolSetting} of protocol `name` (for a config's eval
    list: `resolve_domains(cfg.data.eval_protocol, {e.display: e.name for e in cfg.data.eval})`)."""
    return {domain: resolve_protocol(name, ds) for domain, ds in datasets.items()}


def describe_settings(settings: dict) -> str:
    """One protocol string for a table of several domains ({domain: ProtocolSetting} sharing mode, window, stride
    and TTA, as one protocol's settings do): `setting.describe()` when every domain has the same test scale, else
    the scale of each domain, e.g. `rein: slide 512/341, test scale cityscapes/val 1024x512, mapillary/val 1024x512,
    half-size mapillary/val, no TTA`."""
    if not settings:
        return ""
    first = next(iter(settings.values()))
    shared = {(s.protocol, s.mode, s.window, s.stride, s.tta) for s in settings.values()}
    if len(shared) > 1:
        raise ValueError(f"one evaluation runs one mode / window / stride / TTA; these domains differ: "
                         f"{ {n: s.describe() for n, s in settings.items()} }")
    if len({(s.test_scale, s.half) for s in settings.values()}) == 1:
        return first.describe()
    per = ", ".join(f"{n} {s.test_scale[0]}x{s.test_scale[1]}" if s.test_scale else f"{n} as loaded"
                    for n, s in settings.items())
    half = [n for n, s in settings.items() if s.half]
    where = _where(first)
    return (f"{first.protocol}: {where}, test scale {per}" + (f", half-size {', '.join(half)}" if half else "")
            + f", {first.tta.describe()}")


def custom_setting(test_scale=(1024, 512), mode: str = "slide", window: int = 512, stride: int = 341,
                   tta: Optional[TTA] = None, dataset: str = "") -> ProtocolSetting:
    """A protocol given number by number (what `evaluate.py --test-scale/--window/...` and a config without
    `eval_protocol` do); it is called `custom` in every table."""
    return ProtocolSetting("custom", dataset, tuple(test_scale) if test_scale is not None else None, mode,
                           (window, window), (stride, stride), tta or TTA(), False)


def protocol_table_markdown() -> str:
    """The table of presets (docs/evaluation.md prints the same)."""
    rows = ["| protocol | Cityscapes | BDD100K | Mapillary | ACDC | other | mode | TTA |", "|---|---|---|---|---|---|---|---|"]

    def fmt(s):
        return "as loaded" if s is None else f"{s[0]}x{s[1]}"

    for p in PROTOCOLS.values():
        cells = []
        for d in ("cityscapes", "bdd100k", "mapillary", "acdc", "default"):
            s = resolve_protocol(p.name, d)
            cells.append(fmt(s.test_scale) + (" (half-size)" if s.half else ""))
        mode = f"slide {p.window}/{p.stride}" if p.mode == "slide" else "whole"
        rows.append(f"| `{p.name}` | " + " | ".join(cells) + f" | {mode} | {p.tta.describe()} |")
    return "\n".join(rows)


class ProtocolTransform:
    """(image, label) -> {"pixel_values", "labels"} for one `ProtocolSetting`:

    1. half-size copy when `setting.half` (image (w // 2, h // 2) bicubic, label nearest: Rein's
       `mapillary_resize.py`), so the metric is computed on the half-size label;
    2. keep-ratio resize of the image to `setting.test_scale` (bilinear; none when the scale is None);
    3. normalize. The label keeps the size of step 1; predictions are upsampled to it (mmseg protocol).

    Give it the original-resolution dataset: a folder that already is a half-size copy would be halved twice
    (warned once when the image is under 1920x1080, the smallest Mapillary Vistas size).
    """

    def __init__(self, setting: ProtocolSetting, mean=None, std=None):
        from ..data import IMAGENET_MEAN, IMAGENET_STD

        self.setting = setting
        self.mean, self.std = mean or IMAGENET_MEAN, std or IMAGENET_STD
        self._warned = False

    def __call__(self, image, label) -> dict[str, torch.Tensor]:
        from ..data.transforms import normalize, rescale_size

        image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        image = image.convert("RGB") if image.mode != "RGB" else image
        label = np.asarray(label)
        if label.ndim != 2:
            raise ValueError(f"label must be an HxW array of trainIds, got shape {label.shape}")
        label = label.astype(np.uint8, copy=False)
        if self.setting.half:
            w, h = image.size
            if (max(w, h) < 1920 or min(w, h) < 1080) and not self._warned:
                self._warned = True
                warnings.warn(f"protocol {self.setting.protocol!r} evaluates {self.setting.dataset} on a half-size "
                              f"copy it makes itself, but this image is already {w}x{h} (under 1920x1080): if the "
                              "folder is a half-size copy (Rein's half/val_img), it is being halved twice",
                              stacklevel=2)
            image = image.resize((w // 2, h // 2), Image.BICUBIC)
            label = np.asarray(Image.fromarray(label).resize((w // 2, h // 2), Image.NEAREST))
        if self.setting.test_scale is not None:
            size = rescale_size(*image.size, self.setting.test_scale)
            if size != image.size:
                image = image.resize(size, Image.BILINEAR)
        return {"pixel_values": normalize(np.asarray(image), self.mean, self.std),
                "labels": torch.from_numpy(label.astype(np.int64))}


def protocol_transform(name: str, dataset: str = "cityscapes") -> ProtocolTransform:
    return ProtocolTransform(resolve_protocol(name, dataset))


class EvalDataset:
    """`base[i]` ({"image", "label"}, as `load_dgss_dataset` returns) through `transform`, at most `max_images`."""

    def __init__(self, base, transform, max_images: Optional[int] = None):
        self.base, self.transform = base, transform
        self.n = len(base) if max_images is None else min(len(base), max_images)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} images")
        sample = self.base[i]
        return self.transform(sample["image"], sample["label"])
