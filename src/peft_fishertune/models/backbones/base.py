"""The backbone adapter API and its registry.

Every vision foundation model is wrapped in a `BackboneAdapter`: one small
subclass per model family (one file each in this package), registered under a
short name with `@register_backbone("name")`. The adapter gives every backbone
the same dense-prediction interface, in the spirit of timm's
`forward_intermediates`:

    feats = adapter(pixel_values)          # list of 4 tensors (B, embed_dim, h, w)
    adapter.patch_size, adapter.embed_dim, adapter.num_layers, adapter.out_indices

`h = ceil(H / patch_size)`: inputs whose size is not a multiple of the patch
size are zero-padded on the bottom/right (zero is the mean after
normalization); the segmentor crops its logits back to (H, W).

A subclass implements four small hooks (`embed`, `run_block`, `to_map`,
`_drop_unused_head`) and names its structure (`blocks`, `patch_embed`); the
forward loop, padding, pruning of unused trailing blocks and the FisherTune
candidate listing are shared.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

BACKBONES: dict[str, type["BackboneAdapter"]] = {}

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.SyncBatchNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

CANDIDATE_KINDS = ("linear", "patch_embed", "norm")


def register_backbone(name: str):
    """Class decorator: make a `BackboneAdapter` subclass buildable by `name`."""

    def deco(cls: type[BackboneAdapter]) -> type[BackboneAdapter]:
        if name in BACKBONES and BACKBONES[name] is not cls:
            raise ValueError(f"backbone name {name!r} is already registered by {BACKBONES[name].__qualname__}")
        cls.name = name
        BACKBONES[name] = cls
        return cls

    return deco


def default_out_indices(num_layers: int, n: int = 4) -> tuple[int, ...]:
    """Evenly spaced block indices ending at the last block: 24 -> (5, 11, 17, 23), 12 -> (2, 5, 8, 11)."""
    if num_layers < n:
        raise ValueError(f"num_layers={num_layers} is too small: need at least {n} blocks for {n} feature maps")
    step = num_layers / n
    return tuple(int(round(step * (i + 1))) - 1 for i in range(n))


class BackboneAdapter(nn.Module):
    """Uniform dense-feature interface over a vision transformer.

    Subclasses set the class attributes and implement the hooks below.
    `self.model` is the wrapped model (a transformers `PreTrainedModel`, or a
    timm model); its weights keep their own names under `backbone.model.`.
    """

    name: ClassVar[str] = ""
    #: transformers config class (None for non-transformers backbones)
    config_class: ClassVar[Any] = None
    #: transformers model class built from `config_class`
    model_class: ClassVar[Any] = None
    #: extra pip requirement, named in errors when it is missing
    requires: ClassVar[str | None] = None

    def __init__(self, model: nn.Module, out_indices: Sequence[int] | None = None, prune: bool = True):
        super().__init__()
        self.model = model
        n = self.num_layers
        out = tuple(default_out_indices(n) if out_indices is None else out_indices)
        if len(out) != 4:
            raise ValueError(f"out_indices={out_indices!r} must name exactly 4 blocks (got {len(out)})")
        for i in out:
            if not isinstance(i, int) or isinstance(i, bool) or not -n <= i < n:
                raise ValueError(f"out_indices={out_indices!r}: {i!r} is not a block index in [-{n}, {n})")
        out = tuple(i % n for i in out)
        if list(out) != sorted(set(out)):
            raise ValueError(f"out_indices={out_indices!r} must be strictly increasing (after wrapping negatives)")
        self.out_indices = out
        if prune:
            # Blocks after the last tapped one and the final norm / pooler / neck never
            # reach the loss: drop them, so no parameter goes unused (DDP) and no
            # FisherTune candidate is scored that cannot receive a gradient.
            blocks = self.blocks
            del blocks[out[-1] + 1 :]
            self._drop_unused_head()

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_config(cls, config, out_indices: Sequence[int] | None = None, **kwargs) -> "BackboneAdapter":
        """Randomly initialized backbone from a config object (tests, demos)."""
        cls._check_config(config)
        return cls(cls.model_class(config), out_indices=out_indices, **kwargs)

    @classmethod
    def from_pretrained(
        cls, model_name_or_path: str, out_indices: Sequence[int] | None = None, prune: bool = True, **hf_kwargs
    ) -> "BackboneAdapter":
        """Pretrained backbone from a hub id or a local checkpoint directory."""
        model = cls.model_class.from_pretrained(model_name_or_path, **hf_kwargs)
        cls._check_config(model.config)
        return cls(model, out_indices=out_indices, prune=prune)

    # fields of a small config for tests and demos; `tiny_config(**overrides)` builds `config_class` from them
    TINY_CONFIG: dict = {}

    @classmethod
    def tiny_config(cls, **overrides):
        """A tiny random-init config of this backbone (tests, demos)."""
        if not cls.TINY_CONFIG:
            raise NotImplementedError(f"{cls.__qualname__} does not define a tiny config")
        return cls.config_class(**{**cls.TINY_CONFIG, **overrides})

    @classmethod
    def _check_config(cls, config) -> None:
        if cls.config_class is not None and not isinstance(config, cls.config_class):
            raise TypeError(
                f"backbone {cls.name!r} expects a {cls.config_class.__name__}, got {type(config).__name__}"
            )

    # ------------------------------------------------------------- structure
    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order."""
        raise NotImplementedError

    @property
    def patch_embed(self) -> nn.Module:
        """The patch-embedding convolution."""
        raise NotImplementedError

    @property
    def patch_size(self) -> int:
        return _as_int_size(self.model.config.patch_size, "patch_size")  # transformers configs; override otherwise

    @property
    def embed_dim(self) -> int:
        return self.model.config.hidden_size  # transformers configs; override otherwise

    @property
    def num_layers(self) -> int:
        """Number of blocks of the full model (from its config; pruning does not change it)."""
        return self.model.config.num_hidden_layers  # transformers configs; override otherwise

    # ----------------------------------------------------------------- hooks
    def embed(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Patch embedding (+ tokens, positions). Returns (hidden, ctx); ctx carries the grid size
        `ctx["grid"] = (h, w)` and anything `run_block` / `to_map` need."""
        raise NotImplementedError

    def patch_input(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """For `embed`: (pixel_values cast to the patch embedding's dtype, the (h, w) patch grid)."""
        p = self.patch_size
        grid = (pixel_values.shape[-2] // p, pixel_values.shape[-1] // p)
        return pixel_values.to(self.patch_embed.weight.dtype), grid

    def run_block(self, block: nn.Module, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        return block(hidden)

    def to_map(self, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        """Block output -> (B, embed_dim, h, w). Default: drop `ctx["num_prefix"]` leading tokens."""
        h, w = ctx["grid"]
        tokens = hidden[:, ctx.get("num_prefix", 0) :, :]
        return tokens.transpose(1, 2).reshape(hidden.shape[0], -1, h, w)

    def _drop_unused_head(self) -> None:
        """Remove the final norm / pooler / neck (modules after the last block)."""

    # --------------------------------------------------------------- forward
    def pad_to_patch_multiple(self, pixel_values: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        h, w = pixel_values.shape[-2:]
        ph, pw = (-h) % p, (-w) % p
        if ph or pw:
            pixel_values = F.pad(pixel_values, (0, pw, 0, ph))
        return pixel_values

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> 4 maps (B, embed_dim, ceil(H/p), ceil(W/p)) from blocks `out_indices`."""
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (B, C, H, W); got shape {tuple(pixel_values.shape)}")
        x = self.pad_to_patch_multiple(pixel_values)
        hidden, ctx = self.embed(x)
        feats = []
        wanted = set(self.out_indices)
        for i, block in enumerate(self.blocks):
            hidden = self.run_block(block, hidden, ctx)
            if i in wanted:
                feats.append(self.to_map(hidden, ctx))
            if i == self.out_indices[-1]:
                break
        return feats

    forward_intermediates = forward

    # ------------------------------------------------- FisherTune candidates
    def candidate_modules(self, kinds: Iterable[str] = ("linear",)) -> list[tuple[str, nn.Module]]:
        """(name relative to this adapter, module) of the FisherTune candidate layers.

        kinds: "linear" = every nn.Linear inside the blocks (attention q/k/v/out and
        MLP projections); "patch_embed" = the patch-embedding conv; "norm" = the
        LayerNorms inside the blocks.
        """
        kinds = tuple(kinds)
        bad = [k for k in kinds if k not in CANDIDATE_KINDS]
        if bad or not kinds:
            raise ValueError(f"kinds={kinds!r}: expected a non-empty subset of {list(CANDIDATE_KINDS)}")
        names = {id(m): n for n, m in self.named_modules()}
        out: list[tuple[str, nn.Module]] = []
        if "patch_embed" in kinds:
            pe = self.patch_embed
            if not isinstance(_base_layer(pe), nn.Conv2d):
                raise TypeError(f"{type(self).__name__}.patch_embed is {type(pe).__name__}, expected nn.Conv2d")
            out.append((names[id(pe)], pe))
        want = tuple(t for k, t in (("linear", (nn.Linear,)), ("norm", NORM_TYPES)) if k in kinds for t in t)
        if want:
            for block in self.blocks:
                for m in _layers_outside_adapters(block):
                    if isinstance(_base_layer(m), want):
                        out.append((names[id(m)], m))
        return out

    # ----------------------------------------------------------- utilities
    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Checkpoint the blocks (transformers' mechanism; non-reentrant unless told otherwise,
        so it works with a frozen backbone)."""
        kw = {"use_reentrant": False} if activation_checkpointing_kwargs is None else activation_checkpointing_kwargs
        if hasattr(self.model, "activation_checkpointing_enable"):
            self.model.activation_checkpointing_enable(kw, every_n_layers=every_n_layers, offload=offload)
        else:
            raise NotImplementedError(f"{type(self.model).__name__} has no activation checkpointing")

    def activation_checkpointing_disable(self) -> None:
        if hasattr(self.model, "activation_checkpointing_disable"):
            self.model.activation_checkpointing_disable()

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, patch_size={self.patch_size}, embed_dim={self.embed_dim}, "
            f"num_layers={self.num_layers}, out_indices={self.out_indices}"
        )


def _base_layer(module: nn.Module) -> nn.Module:
    """The original layer of a PEFT-wrapped layer (the layer itself otherwise)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _layers_outside_adapters(root: nn.Module):
    """root's modules, where a PEFT tuner layer stands for its base layer (its insides are skipped),
    so candidate names are the same before and after `get_peft_model`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    stack = [root]
    while stack:
        m = stack.pop()
        yield m
        if not isinstance(m, BaseTunerLayer):
            stack.extend(reversed(list(m.children())))


def interpolate_grid_embedding(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a (1, gh, gw, C) positional grid to `grid` (bicubic, float32)."""
    if tuple(pos.shape[1:3]) == tuple(grid):
        return pos
    dtype = pos.dtype
    out = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=grid, mode="bicubic", align_corners=False)
    return out.to(dtype).permute(0, 2, 3, 1)


def _as_int_size(value, what: str) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(f"{what}={value!r}: non-square patches are not supported")
        value = value[0]
    return int(value)


__all__ = [
    "BACKBONES",
    "BackboneAdapter",
    "CANDIDATE_KINDS",
    "NORM_TYPES",
    "default_out_indices",
    "interpolate_grid_embedding",
    "register_backbone",
]
