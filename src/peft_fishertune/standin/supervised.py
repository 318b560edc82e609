"""A stand-in VFM whose frozen features already transfer across styles: supervised multi-style pretraining of a
small DINOv2 on a *different, coarser* label set (the 7 Cityscapes categories), then a new head downstream.

The SimMIM stand-in (`pretrain.py`) learns features that a linear probe reads no better than random ones on
these scenes (docs/benchmarks.md), so fine-tuning only adds capacity and the DG premise (a backbone whose
features transfer, which fine-tuning on one style over-specializes) never arises. This objective gives the
backbone what a real VFM has: features learned on data of *every* style (clean, GTA-like, fog, night, rain, snow),
here with the Cityscapes *category* of each pixel (flat, construction, object, nature, sky, human, vehicle) as
the label. The downstream benchmark trains a new head on the 19 trainIds of the clean style only; the fine
classes (road vs sidewalk, car vs truck vs bus, ...) and the target styles' fine labels are never seen.

    from peft_fishertune.standin import SupervisedPretrainConfig, pretrain_standin
    path = pretrain_standin(SupervisedPretrainConfig(), "/tmp/standin_categories")   # or standin:categories

The checkpoint has the layout of the SimMIM stand-in (`config.json`, `model.safetensors`, `pretrain_info.json`
with settings, loss curve and the held-out category mIoU per style; the head in `category_head.safetensors`).
The SimMIM fields of `PretrainConfig` (mask_*, loss, norm_pix_loss) are not used by this objective.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .pretrain import PretrainConfig, _param_groups, lr_at, publish

HEAD_NAME = "category_head.safetensors"
CATEGORIES = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
OBJECTIVES = ("categories",)


def category_lut() -> np.ndarray:
    """256-entry table: Cityscapes label ID -> category index (0..6), 255 for void and unknown IDs."""
    from ..data.labels import CITYSCAPES_LABELS

    lut = np.full(256, 255, np.uint8)
    for lab in CITYSCAPES_LABELS:
        if lab.id >= 0 and lab.category in CATEGORIES:
            lut[lab.id] = CATEGORIES.index(lab.category)
    return lut


@dataclass
class SupervisedPretrainConfig(PretrainConfig):
    """`PretrainConfig` (encoder, renders, optimization) with a supervised objective instead of SimMIM."""

    objective: str = field(default="categories", metadata={"help": "'categories': per-pixel Cityscapes category."})

    def pretrain_objective(self, out, progress: bool = True):
        """What `pretrain_standin` runs for this config (after its cache and overwrite checks)."""
        return pretrain_supervised(self, out, progress=progress)

    def __post_init__(self):
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"SupervisedPretrainConfig.objective={self.objective!r}; expected one of {list(OBJECTIVES)}")

    @classmethod
    def quick(cls, **overrides) -> "SupervisedPretrainConfig":
        base = PretrainConfig.quick().to_dict()
        base.update(overrides)
        return cls(**base)


class CategorySegmenter(nn.Module):
    """DINOv2 -> patch tokens -> linear category logits per patch, upsampled bilinearly to the image."""

    def __init__(self, encoder: nn.Module, num_classes: int = len(CATEGORIES)):
        super().__init__()
        cfg = encoder.config
        self.encoder = encoder
        self.patch_size = int(cfg.patch_size)
        self.num_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.head = nn.Linear(cfg.hidden_size, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pixel_values.shape
        tokens = self.encoder(pixel_values=pixel_values).last_hidden_state[:, self.num_prefix :]
        logits = self.head(tokens).transpose(1, 2).reshape(b, -1, h // self.patch_size, w // self.patch_size)
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)


def render_labeled_batch(config: PretrainConfig, seed_key: tuple[int, ...], batch_size: int,
                         styles: Optional[list[str]] = None):
    """Like `pretrain.render_batch` (fresh scenes, random style, square crop resized to `image_size`, flip), with
    the per-pixel category (nearest-neighbour resized; 255 = void). `styles` fixes one style per image (cycled)
    instead of a random one. Returns (images (B, 3, S, S) float32, categories (B, S, S) int64, style names)."""
    from PIL import Image

    from ..data.synthetic import apply_style, render_scene
    from ..data.transforms import normalize

    lut = category_lut()
    w, h = config.render_size
    s = config.image_size
    images = torch.empty(batch_size, 3, s, s)
    labels = torch.empty(batch_size, s, s, dtype=torch.long)
    names = []
    for i in range(batch_size):
        rng = np.random.default_rng([config.seed, *seed_key, i])
        image, label_ids, depth = render_scene(rng, (w, h))
        style = styles[i % len(styles)] if styles else config.styles[int(rng.integers(len(config.styles)))]
        image = apply_style(image, style, rng, depth=depth, label_ids=label_ids)
        side = int(round(h * rng.uniform(config.min_crop_scale, 1.0)))
        y0 = int(rng.integers(0, h - side + 1))
        x0 = int(rng.integers(0, w - side + 1))
        crop = normalize(image[y0 : y0 + side, x0 : x0 + side])
        cat = lut[label_ids[y0 : y0 + side, x0 : x0 + side]]
        if side != s:
            crop = F.interpolate(crop[None], size=(s, s), mode="bilinear", align_corners=False, antialias=side > s)[0]
            cat = np.array(Image.fromarray(cat).resize((s, s), Image.NEAREST))
        cat = torch.from_numpy(np.ascontiguousarray(cat)).long()
        if rng.random() < 0.5:
            crop, cat = crop.flip(-1), cat.flip(-1)
        images[i], labels[i] = crop, cat
        names.append(style)
    return images, labels, names


def _miou(pred: torch.Tensor, target: torch.Tensor, k: int) -> float:
    valid = target != 255
    p, t = pred[valid], target[valid]
    inter = torch.bincount(t[p == t], minlength=k).float()
    union = torch.bincount(p, minlength=k).float() + torch.bincount(t, minlength=k).float() - inter
    present = union > 0
    return float((inter[present] / union[present]).mean() * 100) if bool(present.any()) else float("nan")


def pretrain_supervised(
    config: SupervisedPretrainConfig,
    out: Path,
    *,
    progress: bool = True,
) -> Path:
    """Train the category segmenter on fresh multi-style renders and save the encoder to `out` (the caller,
    `pretrain.pretrain_standin`, handles reuse and settings checks)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import Dinov2Model

    torch.manual_seed(config.seed)
    model = CategorySegmenter(Dinov2Model(config.dinov2_config()))
    model.train()
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.95))
    # held out: key 1 (never used for training); every style equally often
    per_style = max(1, config.eval_batch_size // len(config.styles))
    eval_styles = [s for s in config.styles for _ in range(per_style)]
    eval_x, eval_y, eval_names = render_labeled_batch(config, (1, 0), len(eval_styles), styles=eval_styles)

    def held_out() -> dict:
        model.eval()
        with torch.no_grad():
            logits = model(eval_x)
            loss = float(F.cross_entropy(logits, eval_y, ignore_index=255))
            pred = logits.argmax(1)
        model.train()
        names = np.array(eval_names)
        per = {s: _miou(pred[torch.from_numpy(names == s)], eval_y[torch.from_numpy(names == s)], len(CATEGORIES))
               for s in config.styles}
        return {"loss": loss, "miou_per_style": per}

    losses: list[float] = []
    evals = [{"step": 0, **held_out()}]
    start = time.perf_counter()
    data_time = 0.0
    bar = tqdm(range(config.steps), desc="stand-in VFM (categories)", unit="step", disable=not progress)
    for step in bar:
        t0 = time.perf_counter()
        x, y, _ = render_labeled_batch(config, (0, step), config.batch_size)
        data_time += time.perf_counter() - t0
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        loss = F.cross_entropy(model(x), y, ignore_index=255)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss is {float(loss)} at step {step}; lower lr={config.lr}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
            evals.append({"step": step + 1, **held_out()})
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    evals.append({"step": config.steps, **held_out()})
    wall = time.perf_counter() - start

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.encoder.save_pretrained(tmp)
    save_file({k: v.detach().contiguous() for k, v in model.head.state_dict().items()}, str(tmp / HEAD_NAME))
    tail = losses[-max(1, min(20, len(losses))) :]
    info = {
        "settings": config.to_dict(),
        "objective": "supervised: per-pixel cross-entropy on the 7 Cityscapes categories "
        f"({', '.join(CATEGORIES)}), styles {config.styles}, linear head on the last patch tokens",
        "num_parameters_encoder": sum(p.numel() for p in model.encoder.parameters()),
        "loss_curve": losses,
        "final_train_loss_mean_last_20": float(np.mean(tail)),
        "held_out": evals,
        "held_out_loss": [{"step": e["step"], "loss": e["loss"]} for e in evals],
        "wall_time_s": round(wall, 2),
        "data_time_s": round(data_time, 2),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    publish(tmp, out, info)
    if progress:
        last = evals[-1]["miou_per_style"]
        print(f"stand-in VFM (categories): {config.steps} steps in {wall:.0f} s, held-out category mIoU "
              + ", ".join(f"{s} {v:.1f}" for s, v in last.items()) + f"; saved to {out}")
    return out


__all__ = ["CATEGORIES", "SupervisedPretrainConfig", "category_lut", "pretrain_supervised", "render_labeled_batch"]
