"""A stand-in vision foundation model: masked-image-modelling pretraining of a small DINOv2.

Real VFM weights (DINOv2-L, EVA02, ...) cannot be downloaded everywhere this project
runs, so the benchmark uses a small `transformers.Dinov2Model` pretrained here,
self-supervised, on unlabeled street scenes rendered in memory in *every* synthetic
style (clean, GTA-like, fog, night, rain, snow): the "foundation" data, diverse like
the data a real VFM saw, with no labels.

The objective is SimMIM (Xie et al. 2022): replace a random ~60 % of the patches by
DINOv2's own `mask_token` (through `bool_masked_pos`; masking in blocks of
`mask_patch_size` pixels), encode, and predict the masked patches' pixels (normalized
like the model input, ImageNet mean/std) with a linear decoder from each patch token;
L1 loss on the masked patches only::

    from peft_fishertune.standin import PretrainConfig, pretrain_standin
    path = pretrain_standin(PretrainConfig(), "~/.cache/peft_fishertune/standin_vfm")
    model = build_segmentation_model(backbone="dinov2", model_name_or_path=path, decoder="linear")

The output directory is a Hugging Face checkpoint of the encoder (`config.json`,
`model.safetensors`, loadable by `Dinov2Model.from_pretrained`), the decoder
(`mim_decoder.safetensors`) and `pretrain_info.json` (settings, loss curve, held-out
loss, wall time). Calling again with the same settings reuses it; different
settings raise unless `overwrite=True`. CLI: `python scripts/pretrain_standin.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._checks import finite_number, integer
from ..models.weight_decay import split_by_decay

INFO_NAME = "pretrain_info.json"
DECODER_NAME = "mim_decoder.safetensors"
LOSSES = ("l1", "mse")


def default_cache_dir() -> Path:
    """`$PEFT_FISHERTUNE_CACHE/standin_vfm`, default `~/.cache/peft_fishertune/standin_vfm`."""
    root = os.environ.get("PEFT_FISHERTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "peft_fishertune")
    return Path(root) / "standin_vfm"


def _default_styles() -> list[str]:
    from ..data.synthetic import STYLES

    return list(STYLES)


@dataclass
class PretrainConfig:
    """Every setting of the stand-in pretraining (all are recorded in `pretrain_info.json`)."""

    # encoder (a Dinov2Config)
    hidden_size: int = field(default=192, metadata={"help": "Transformer width."})
    num_hidden_layers: int = field(default=6, metadata={"help": "Number of blocks (>= 4: the segmentor taps 4)."})
    num_attention_heads: int = field(default=3, metadata={"help": "Attention heads (divide hidden_size)."})
    intermediate_size: int = field(default=768, metadata={"help": "MLP hidden width."})
    patch_size: int = field(default=8, metadata={"help": "Patch size in pixels."})
    image_size: int = field(
        default=128, metadata={"help": "Side of the square crops seen in pretraining (= the position table's size)."}
    )
    # data
    render_size: list[int] = field(
        default_factory=lambda: [256, 128], metadata={"help": "(W, H) of the rendered scenes crops are taken from."}
    )
    styles: list[str] = field(default_factory=_default_styles, metadata={"help": "Synthetic styles sampled uniformly."})
    min_crop_scale: float = field(
        default=0.5, metadata={"help": "Square crops have a side in [min_crop_scale, 1] x render height, then resized."}
    )
    # objective
    mask_ratio: float = field(default=0.6, metadata={"help": "Fraction of mask blocks replaced by the mask token."})
    mask_patch_size: int = field(default=16, metadata={"help": "Masking unit in pixels (a multiple of patch_size)."})
    loss: str = field(default="l1", metadata={"help": "'l1' (SimMIM) or 'mse' on the masked patches."})
    norm_pix_loss: bool = field(
        default=False, metadata={"help": "Normalize each target patch to zero mean / unit variance (MAE)."}
    )
    # optimization
    steps: int = field(default=360, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=32, metadata={"help": "Images per step (fresh renders every step)."})
    lr: float = field(default=1.5e-3, metadata={"help": "Peak AdamW learning rate."})
    min_lr: float = field(default=1e-5, metadata={"help": "Learning rate at the end of the cosine decay."})
    warmup_steps: int = field(default=30, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay on >= 2-D weights."})
    grad_clip: float = field(default=3.0, metadata={"help": "Gradient-norm clip (0 = off)."})
    eval_every: int = field(default=60, metadata={"help": "Held-out loss every this many steps (0 = start and end only)."})
    eval_batch_size: int = field(default=32, metadata={"help": "Held-out images (fixed renders and masks)."})
    seed: int = field(default=0, metadata={"help": "Seeds the renders, crops, masks and the initialization."})

    def __post_init__(self):
        from ..data.synthetic import STYLES

        ints = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
                "image_size", "mask_patch_size", "steps", "batch_size", "eval_batch_size")
        for name in ints:
            integer(f"PretrainConfig.{name}", getattr(self, name), low=1)
        for name in ("warmup_steps", "eval_every", "seed"):
            integer(f"PretrainConfig.{name}", getattr(self, name), low=0)
        if self.num_hidden_layers < 4:
            raise ValueError(
                f"PretrainConfig.num_hidden_layers={self.num_hidden_layers}; expected >= 4 "
                "(the segmentation backbone taps 4 blocks)"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"PretrainConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.mask_patch_size % self.patch_size or self.image_size % self.mask_patch_size:
            raise ValueError(
                f"PretrainConfig: need patch_size={self.patch_size} | mask_patch_size={self.mask_patch_size} | "
                f"image_size={self.image_size} (each divides the next)"
            )
        self.render_size = [int(v) for v in self.render_size]
        if len(self.render_size) != 2 or self.render_size[0] < 64 or self.render_size[1] < 32:
            raise ValueError(f"PretrainConfig.render_size={self.render_size!r}; expected (W, H) with W >= 64, H >= 32")
        if self.render_size[0] < self.render_size[1]:
            raise ValueError(f"PretrainConfig.render_size={self.render_size!r}; expected W >= H (square crops of side <= H)")
        self.styles = list(self.styles)
        bad = [s for s in self.styles if s not in STYLES]
        if bad or not self.styles:
            raise ValueError(f"PretrainConfig.styles={self.styles!r}; expected a non-empty subset of {list(STYLES)}")
        # mask_ratio < 1: some patches must stay visible
        finite_number("PretrainConfig.mask_ratio", self.mask_ratio, low=0, high=1, low_open=True, high_open=True)
        finite_number("PretrainConfig.min_crop_scale", self.min_crop_scale, low=0, high=1, low_open=True)
        if self.loss not in LOSSES:
            raise ValueError(f"PretrainConfig.loss={self.loss!r}; expected one of {list(LOSSES)}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            finite_number(f"PretrainConfig.{name}", getattr(self, name), low=0)
        if self.min_lr > self.lr:
            raise ValueError(f"PretrainConfig.min_lr={self.min_lr} is larger than lr={self.lr}")

    @classmethod
    def quick(cls, **overrides) -> "PretrainConfig":
        """A tiny setting that runs in seconds (tests, smoke runs)."""
        kw: dict[str, Any] = dict(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=8,
            image_size=32, render_size=[64, 32], mask_patch_size=16, steps=6, batch_size=4, warmup_steps=2,
            eval_every=0, eval_batch_size=4, lr=1e-3,
        )
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def dinov2_config(self):
        from transformers import Dinov2Config

        return Dinov2Config(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            patch_size=self.patch_size,
            image_size=self.image_size,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            drop_path_rate=0.0,
            layerscale_value=1.0,
            use_mask_token=True,
        )


# ----------------------------------------------------------------------------- model


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order (the order of DINOv2's patch tokens)."""
    b, c, h, w = pixel_values.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {(h, w)} is not a multiple of patch_size={p}")
    x = pixel_values.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify`: (B, N, p*p*C) -> (B, C, h*p, w*p)."""
    b = patches.shape[0]
    h, w = grid
    p = patch_size
    x = patches.reshape(b, h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, h * p, w * p)


def random_block_mask(
    batch_size: int,
    image_size: tuple[int, int],
    patch_size: int,
    mask_patch_size: int,
    mask_ratio: float,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """SimMIM masking: exactly round(ratio * n) of the n blocks of `mask_patch_size` pixels per image.

    Returns `bool_masked_pos` (B, num_patches), row-major over the patch grid, True = masked.
    """
    h, w = image_size
    if h % mask_patch_size or w % mask_patch_size or mask_patch_size % patch_size:
        raise ValueError(
            f"image_size={image_size} must be a multiple of mask_patch_size={mask_patch_size}, "
            f"itself a multiple of patch_size={patch_size}"
        )
    gh, gw = h // mask_patch_size, w // mask_patch_size
    n = gh * gw
    k = int(round(mask_ratio * n))
    if not 0 < k < n:
        raise ValueError(f"mask_ratio={mask_ratio} masks {k} of {n} blocks; expected at least one masked and one visible")
    order = torch.rand(batch_size, n, generator=generator).argsort(dim=1)
    blocks = torch.zeros(batch_size, n, dtype=torch.bool)
    blocks.scatter_(1, order[:, :k], True)
    r = mask_patch_size // patch_size
    mask = blocks.view(batch_size, gh, 1, gw, 1).expand(batch_size, gh, r, gw, r)
    return mask.reshape(batch_size, gh * r * gw * r)


class MaskedImageModeling(nn.Module):
    """SimMIM on a `Dinov2Model`: masked patches -> mask token; linear decoder predicts their pixels."""

    def __init__(self, encoder: nn.Module, loss: str = "l1", norm_pix_loss: bool = False):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r}; expected one of {list(LOSSES)}")
        cfg = encoder.config
        if not getattr(cfg, "use_mask_token", False):
            raise ValueError("the encoder has no mask token (config.use_mask_token=False); SimMIM needs one")
        self.encoder = encoder
        self.patch_size = int(cfg.patch_size)
        self.num_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.decoder = nn.Linear(cfg.hidden_size, self.patch_size * self.patch_size * cfg.num_channels)
        self.loss_type = loss
        self.norm_pix_loss = norm_pix_loss

    def target(self, pixel_values: torch.Tensor) -> torch.Tensor:
        t = patchify(pixel_values, self.patch_size)
        if self.norm_pix_loss:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
        return t

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixel_values (B, 3, H, W) normalized; bool_masked_pos (B, N). Returns {"loss", "pred"} with
        pred (B, N, p*p*3) in target space."""
        n = (pixel_values.shape[-2] // self.patch_size) * (pixel_values.shape[-1] // self.patch_size)
        if tuple(bool_masked_pos.shape) != (pixel_values.shape[0], n):
            raise ValueError(f"bool_masked_pos has shape {tuple(bool_masked_pos.shape)}; expected {(pixel_values.shape[0], n)}")
        hidden = self.encoder(pixel_values=pixel_values, bool_masked_pos=bool_masked_pos).last_hidden_state
        pred = self.decoder(hidden[:, self.num_prefix :])  # (B, N, p*p*3)
        target = self.target(pixel_values)
        err = (pred - target).abs() if self.loss_type == "l1" else (pred - target).pow(2)
        m = bool_masked_pos.unsqueeze(-1).to(err.dtype)
        loss = (err * m).sum() / (m.sum() * err.shape[-1]).clamp_min(1.0)
        return {"loss": loss, "pred": pred}


# ----------------------------------------------------------------------------- data


def render_batch(config: PretrainConfig, seed_key: tuple[int, ...], batch_size: int) -> torch.Tensor:
    """Fresh scenes, each in a random style of `config.styles`, random square crop (side in
    [min_crop_scale, 1] x H) resized to `image_size`, random horizontal flip, normalized like the
    model input. Deterministic in `seed_key`. Returns (B, 3, S, S) float32."""
    from ..data.synthetic import apply_style, render_scene
    from ..data.transforms import normalize

    w, h = config.render_size
    s = config.image_size
    out = torch.empty(batch_size, 3, s, s)
    for i in range(batch_size):
        rng = np.random.default_rng([config.seed, *seed_key, i])
        image, labels, depth = render_scene(rng, (w, h))
        style = config.styles[int(rng.integers(len(config.styles)))]
        image = apply_style(image, style, rng, depth=depth, label_ids=labels)
        side = int(round(h * rng.uniform(config.min_crop_scale, 1.0)))
        y0 = int(rng.integers(0, h - side + 1))
        x0 = int(rng.integers(0, w - side + 1))
        crop = normalize(image[y0 : y0 + side, x0 : x0 + side])
        if side != s:
            crop = F.interpolate(crop[None], size=(s, s), mode="bilinear", align_corners=False, antialias=side > s)[0]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        out[i] = crop
    return out


def _masks(config: PretrainConfig, seed_key: tuple[int, ...], batch_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(np.random.default_rng([config.seed, *seed_key]).integers(2**62)))
    s = config.image_size
    return random_block_mask(batch_size, (s, s), config.patch_size, config.mask_patch_size, config.mask_ratio, g)


def lr_at(step: int, config: PretrainConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps - 1, 1)
    t = min((step - config.warmup_steps) / span, 1.0)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_mim_model(config: PretrainConfig) -> MaskedImageModeling:
    from transformers import Dinov2Model

    torch.manual_seed(config.seed)
    return MaskedImageModeling(Dinov2Model(config.dinov2_config()), loss=config.loss, norm_pix_loss=config.norm_pix_loss)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # the segmentation model's rule (models/weight_decay.py): >= 2-D weights of Linear / Conv decay
    decay, no_decay = split_by_decay(model)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- cache


def read_pretrain_info(path: str | os.PathLike) -> dict[str, Any]:
    """`pretrain_info.json` of a stand-in checkpoint directory."""
    p = Path(path) / INFO_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: {path} is not a directory written by pretrain_standin")
    return json.loads(p.read_text())


def _is_complete(path: Path) -> bool:
    return (path / INFO_NAME).is_file() and (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _settings_diff(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# ----------------------------------------------------------------------------- entry point


def pretrain_standin(
    config: Optional[PretrainConfig] = None,
    output_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    num_threads: Optional[int] = None,
) -> Path:
    """Pretrain the stand-in VFM (or reuse a finished run with the same settings); return its directory.

    output_dir: default `default_cache_dir()`. An existing complete run with identical settings is
    reused; with different settings a `ValueError` names the differing settings unless
    `overwrite=True`. The run is written to a temporary sibling directory and renamed at the end,
    so an interrupted run never leaves a half-written checkpoint behind.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    config = PretrainConfig() if config is None else config
    if not isinstance(config, PretrainConfig):
        raise TypeError(f"config must be a PretrainConfig, got {type(config).__name__}")
    out = Path(os.path.expanduser(str(output_dir))) if output_dir is not None else default_cache_dir()
    settings = config.to_dict()
    if out.exists():
        if _is_complete(out):
            old = read_pretrain_info(out).get("settings", {})
            diff = _settings_diff(old, settings)
            if not diff:
                if progress:
                    print(f"stand-in VFM: reusing {out} (same settings)")
                return out
            if not overwrite:
                raise ValueError(
                    f"{out} holds a stand-in VFM pretrained with other settings (differ: "
                    + ", ".join(f"{k}={old.get(k)!r} there vs {settings.get(k)!r} here" for k in diff)
                    + "); pass overwrite=True (--overwrite) or choose another output_dir"
                )
        elif any(out.iterdir()) and not overwrite:
            raise ValueError(
                f"output_dir={str(out)!r} exists, is not empty and is not a stand-in checkpoint; "
                "pass overwrite=True (--overwrite) or choose another output_dir"
            )
    if num_threads is not None:
        integer("num_threads", num_threads, low=1)
        torch.set_num_threads(num_threads)
    own = getattr(config, "pretrain_objective", None)
    if own is not None:  # another objective (e.g. supervised.py's categories), the same cache rules
        return own(out, progress=progress)

    model = build_mim_model(config)
    model.train()
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.95))
    eval_x = render_batch(config, (1, 0), config.eval_batch_size)  # held out: key 1 never used for training
    eval_m = _masks(config, (1, 0), config.eval_batch_size)

    def held_out() -> float:
        model.eval()
        with torch.no_grad():
            loss = float(model(eval_x, eval_m)["loss"])
        model.train()
        return loss

    losses: list[float] = []
    evals: list[tuple[int, float]] = [(0, held_out())]
    start = time.perf_counter()
    data_time = 0.0
    bar = tqdm(range(config.steps), desc="stand-in VFM (SimMIM)", unit="step", disable=not progress)
    for step in bar:
        t0 = time.perf_counter()
        x = render_batch(config, (0, step), config.batch_size)
        mask = _masks(config, (0, step), config.batch_size)
        data_time += time.perf_counter() - t0
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        loss = model(x, mask)["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss is {float(loss)} at step {step}; lower lr={config.lr}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
            evals.append((step + 1, held_out()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr_at(step, config):.1e}")
    bar.close()
    evals.append((config.steps, held_out()))
    wall = time.perf_counter() - start

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.encoder.save_pretrained(tmp)
    save_file({k: v.detach().contiguous() for k, v in model.decoder.state_dict().items()}, str(tmp / DECODER_NAME))
    tail = losses[-max(1, min(20, len(losses))) :]
    info = {
        "settings": settings,
        "objective": "SimMIM: mask-token replacement of masked blocks, linear pixel decoder, "
        f"{config.loss} on masked patches{' (per-patch normalized targets)' if config.norm_pix_loss else ''}",
        "num_parameters_encoder": sum(p.numel() for p in model.encoder.parameters()),
        "loss_curve": losses,
        "final_train_loss_mean_last_20": float(np.mean(tail)),
        "held_out_loss": [{"step": s, "loss": v} for s, v in evals],
        "wall_time_s": round(wall, 2),
        "data_time_s": round(data_time, 2),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    publish(tmp, out, info)
    if progress:
        print(
            f"stand-in VFM: {config.steps} steps in {wall:.0f} s, held-out loss {evals[0][1]:.4f} -> "
            f"{evals[-1][1]:.4f}; saved to {out}"
        )
    return out


def config_fields() -> list[dataclasses.Field]:
    """The `PretrainConfig` fields (the CLI builds one option per field)."""
    return list(dataclasses.fields(PretrainConfig))


def publish(tmp: Path, out: Path, info: dict) -> None:
    """Write `info` into the finished checkpoint folder `tmp` and move it to `out` (replacing what was there)."""
    (tmp / INFO_NAME).write_text(json.dumps(info, indent=1))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
