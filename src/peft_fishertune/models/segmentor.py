"""`SegmentationModel`: backbone adapter + (simple feature pyramid) + decoder.

    model = build_segmentation_model("dinov2", "facebook/dinov2-large", decoder="mask2former", num_labels=19)
    out = model(pixel_values, labels)        # out.loss, out.logits (B, K, H, W)

Structure, not names, defines what trains and how:
- `backbone` holds the foundation model; `fisher_target_modules()` lists its
  FisherTune candidate layers (full module names, exact, for PEFT's
  `target_modules`);
- `decoder_module_names()` names the top-level modules that train fully
  (PEFT's `modules_to_save`);
- `param_groups()` splits trainable parameters into backbone / decoder and
  decay / no-decay by module type (weights of Linear / Conv / attention
  projections decay; norms, biases, embeddings, position tables, tokens and
  1-D values do not).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Mask2FormerConfig
from transformers.utils import ModelOutput

from .._checks import finite_number, integer
from .backbones import BackboneAdapter, build_backbone, get_backbone_class
from .light_heads import LinearHead, UperNetDecoder
from .mask2former import Mask2FormerSemanticDecoder, make_mask2former_config
from .pyramid import SimpleFeaturePyramid
from .weight_decay import DECAY_OWNER_TYPES, decays, parameter_owners  # noqa: F401  (DECAY_OWNER_TYPES re-exported)

CONFIG_NAME = "segmentation_config.json"
WEIGHTS_NAME = "model.safetensors"


# ------------------------------------------------------------------------------------------- decoders
# One row per decoder: how it is built, how its outputs become (logits, loss, loss components), and the config
# that `save_pretrained` keeps. The model branches on the decoder in one place: the lookup in __init__.


def _build_linear(in_channels, num_labels, **_):
    return LinearHead(in_channels, num_labels)


def _build_upernet(in_channels, num_labels, *, upernet_hidden_size, **_):
    return UperNetDecoder(in_channels, num_labels, hidden_size=upernet_hidden_size)


def _build_mask2former(in_channels, num_labels, *, decoder_config, ignore_index, **_):
    if decoder_config is None or isinstance(decoder_config, dict):
        decoder_config = make_mask2former_config(num_labels=num_labels, **(decoder_config or {}))
    if not isinstance(decoder_config, Mask2FormerConfig):
        raise TypeError(
            f"decoder_config must be a Mask2FormerConfig or a dict of its fields, got {type(decoder_config).__name__}"
        )
    if decoder_config.num_labels != num_labels:
        raise ValueError(f"decoder_config.num_labels={decoder_config.num_labels} differs from num_labels={num_labels}")
    decoder_config.ignore_value = ignore_index
    return Mask2FormerSemanticDecoder(decoder_config, in_channels)


def _dense_outputs(model, feats, padded, size, labels):
    """Per-pixel heads: logits at feature resolution, upsampled to the (padded) input, cross-entropy loss."""
    h, w = size
    logits = model.decode_head(feats)
    logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)[:, :, :h, :w]
    loss = model._cross_entropy(logits, labels) if labels is not None else None
    return logits, loss, None


def _mask2former_outputs(model, feats, padded, size, labels):
    """Mask classification: semantic logits from the last layer's class x mask predictions; the Mask2Former loss."""
    h, w = size
    class_logits, mask_logits = model.decode_head(feats)
    logits = model.decode_head.semantic_logits(class_logits[-1], mask_logits[-1], padded)[:, :, :h, :w]
    loss = components = None
    if labels is not None:
        # the mask logits cover the padded image: pad labels with "no class" to the same extent
        padded_labels = F.pad(labels, (0, padded[1] - w, 0, padded[0] - h), value=model.ignore_index)
        loss, components = model.decode_head.loss(class_logits, mask_logits, padded_labels, model.ignore_index)
    return logits, loss, components


def _mask2former_config(head) -> dict:
    return head.config.to_dict()


@dataclass(frozen=True)
class _Decoder:
    uses_pyramid: bool
    build: Any  # (in_channels, num_labels, **options) -> head module
    outputs: Any  # (model, feats, padded size, input size, labels) -> (logits, loss, loss components)
    saved_config: Any = None  # head -> dict for segmentation_config.json (None: nothing beyond the build arguments)


_DECODERS: dict[str, _Decoder] = {
    "mask2former": _Decoder(True, _build_mask2former, _mask2former_outputs, _mask2former_config),
    "linear": _Decoder(False, _build_linear, _dense_outputs),
    "upernet": _Decoder(True, _build_upernet, _dense_outputs),
}
DECODERS = tuple(_DECODERS)


class _AdapterOf:
    """Marks an adapter parameter by the base layer whose weight it changes (for the weight-decay rule)."""

    __slots__ = ("base",)

    def __init__(self, base: nn.Module):
        self.base = base


@dataclass
class SegmentationOutput(ModelOutput):
    """loss: scalar (when labels are given); logits: (B, num_labels, H, W) at input resolution;
    loss_components: the weighted terms of the Mask2Former loss (when labels are given)."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    loss_components: Optional[dict[str, torch.Tensor]] = None


class SegmentationModel(nn.Module):
    """backbone -> [pyramid] -> decode_head -> per-pixel semantic logits at input size."""

    supports_gradient_checkpointing = True

    def __init__(
        self,
        backbone: BackboneAdapter,
        decoder: str = "mask2former",
        num_labels: int = 19,
        pyramid_channels: int = 256,
        pyramid_norm: str = "layernorm",
        decoder_config: Mask2FormerConfig | dict | None = None,
        upernet_hidden_size: int = 512,
        ignore_index: int = 255,
    ):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"decoder={decoder!r} is not supported; expected one of {list(DECODERS)}")
        integer("num_labels", num_labels, low=1)
        if not isinstance(backbone, BackboneAdapter):
            raise TypeError(f"backbone must be a BackboneAdapter, got {type(backbone).__name__}")
        self.decoder_type = decoder
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.backbone = backbone
        self._decoder = _DECODERS[decoder]
        dim = backbone.embed_dim
        if self._decoder.uses_pyramid:
            self.pyramid = SimpleFeaturePyramid(dim, pyramid_channels, patch_size=backbone.patch_size, norm=pyramid_norm)
            in_channels = [pyramid_channels] * 4
        else:
            self.pyramid = None
            in_channels = [dim] * 4
        self.decode_head = self._decoder.build(in_channels, num_labels, decoder_config=decoder_config,
                                               upernet_hidden_size=upernet_hidden_size, ignore_index=ignore_index)
        self.build_config: dict[str, Any] = {
            "backbone": backbone.name,
            "decoder": decoder,
            "num_labels": num_labels,
            "out_indices": list(backbone.out_indices),
            "pyramid_channels": pyramid_channels,
            "pyramid_norm": pyramid_norm,
            "upernet_hidden_size": upernet_hidden_size,
            "ignore_index": ignore_index,
        }

    # ------------------------------------------------------------------ forward
    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> SegmentationOutput:
        """pixel_values (B, 3, H, W); labels (B, H, W) class ids with `ignore_index` for unlabeled pixels."""
        b, _, h, w = pixel_values.shape
        if labels is not None and (labels.ndim != 3 or tuple(labels.shape) != (b, h, w)):
            raise ValueError(f"labels must have shape (B, H, W) = {(b, h, w)}; got {tuple(labels.shape)}")
        p = self.backbone.patch_size
        padded = (h + (-h) % p, w + (-w) % p)
        feats = self.backbone(pixel_values)  # 4 x (B, C, ceil(H/p), ceil(W/p))
        if self.pyramid is not None:
            feats = self.pyramid(feats)  # strides p/4, p/2, p, 2p

        logits, loss, components = self._decoder.outputs(self, feats, padded, (h, w), labels)
        return SegmentationOutput(loss=loss, logits=logits, loss_components=components)

    def _cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        valid = labels != self.ignore_index
        if not bool(valid.any()):
            return logits.sum() * 0.0  # an all-ignore batch: zero loss, graph kept
        bad = labels[valid & ((labels < 0) | (labels >= self.num_labels))]
        if bad.numel():
            raise ValueError(
                f"labels contain class ids {torch.unique(bad).tolist()} outside [0, {self.num_labels}) "
                f"(ignore_index={self.ignore_index})"
            )
        return F.cross_entropy(logits.float(), labels.long(), ignore_index=self.ignore_index)

    # ---------------------------------------------------------------- structure
    def decoder_module_names(self) -> list[str]:
        """Top-level modules that train fully (PEFT `modules_to_save`).

        PEFT matches `modules_to_save` by string suffix over every module name; we
        check that no other module's name ends with these names, so exactly these
        top-level modules are wrapped.
        """
        names = ["pyramid", "decode_head"] if self.pyramid is not None else ["decode_head"]
        for full, _ in self.named_modules():
            for n in names:
                if full != n and full.endswith(n) and not full.startswith(n + "."):
                    raise RuntimeError(f"module {full!r} ends with {n!r}: PEFT modules_to_save would also wrap it")
        return names

    def fisher_target_modules(self, kinds: Iterable[str] = ("linear",)) -> list[str]:
        """Full names of the backbone's FisherTune candidate layers (PEFT `target_modules`).

        kinds: "linear" (default) = every nn.Linear in the transformer blocks
        (attention q/k/v/out, MLP); "patch_embed" = the patch-embedding conv;
        "norm" = the LayerNorms in the blocks.
        """
        return ["backbone." + n for n, _ in self.backbone.candidate_modules(kinds)]

    def _owners(self) -> dict[int, nn.Module]:
        """id(parameter) -> the module whose weight-decay rule applies to it.

        A PEFT tuner layer's adapter parameters (its `adapter_layer_names` containers: FisherTune's values, LoRA's
        A/B) follow the layer's base layer: they are deltas of its weight, so they decay when that weight does.
        """
        from peft.tuners.tuners_utils import BaseTunerLayer

        owners = parameter_owners(self)
        for m in self.modules():
            if isinstance(m, BaseTunerLayer):
                base = m.get_base_layer()
                for attr in m.adapter_layer_names:
                    container = getattr(m, attr, None)
                    if isinstance(container, nn.Module):
                        for p in container.parameters():
                            if not isinstance(owners.get(id(p)), DECAY_OWNER_TYPES):  # a layer keeps its own rule
                                owners[id(p)] = _AdapterOf(base)
        return owners

    def _decays(self, p: nn.Parameter, owner) -> bool:
        if isinstance(owner, _AdapterOf):
            w = getattr(owner.base, "weight", None)
            return w is not None and decays(w, owner.base)
        return decays(p, owner)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that get no weight decay (timm's API): everything that is not a
        >= 2-D weight of a Linear / Conv / ConvTranspose / MultiheadAttention (or an adapter delta of one)."""
        owners = self._owners()
        return {n for n, p in self.named_parameters() if not self._decays(p, owners[id(p)])}

    def param_groups(
        self,
        backbone_lr: float = 1e-5,
        decoder_lr: float = 1e-4,
        weight_decay: float = 0.05,
        trainable_only: bool = True,
        params: Optional[Iterable[nn.Parameter]] = None,
    ) -> list[dict]:
        """Four AdamW groups, always in this order (some may be empty):
        backbone/decay, backbone/no_decay, decoder/decay, decoder/no_decay.

        "backbone" = parameters under `self.backbone` (including adapter values a
        PEFT method injects there); "decoder" = everything else. Each group has a
        "name" key and its parameters in module order. Call it after PEFT wrapping (on
        `peft_model.base_model.model`) so that only trainable parameters are grouped.
        `params`: group exactly these parameters of the model (trainable or not; e.g. ones that
        start training later and join an existing optimizer's groups of the same name).
        """
        for name, v in (("backbone_lr", backbone_lr), ("decoder_lr", decoder_lr), ("weight_decay", weight_decay)):
            finite_number(name, v, low=0)
        owners = self._owners()
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        wanted = None
        if params is not None:
            wanted = {id(p) for p in params}
            unknown = wanted - set(owners)
            if unknown:
                raise ValueError(f"param_groups: {len(unknown)} of the given params are not parameters of this model")
        groups = {k: [] for k in ("backbone/decay", "backbone/no_decay", "decoder/decay", "decoder/no_decay")}
        for _, p in self.named_parameters():
            if wanted is not None:
                if id(p) not in wanted:
                    continue
            elif trainable_only and not p.requires_grad:
                continue
            part = "backbone" if id(p) in backbone_ids else "decoder"
            groups[f"{part}/{'decay' if self._decays(p, owners[id(p)]) else 'no_decay'}"].append(p)
        lrs = {"backbone": backbone_lr, "decoder": decoder_lr}
        return [
            {"name": k, "params": v, "lr": lrs[k.split("/")[0]], "weight_decay": weight_decay if k.endswith("/decay") else 0.0}
            for k, v in groups.items()
        ]

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freeze (False) or unfreeze (True) every backbone parameter."""
        for p in self.backbone.parameters():
            p.requires_grad_(trainable)

    # ------------------------------------------------------------- utilities
    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Checkpoint the backbone blocks (what `Trainer(activation_checkpointing=True)` calls);
        non-reentrant by default, so a frozen backbone works."""
        self.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def activation_checkpointing_disable(self) -> None:
        self.backbone.activation_checkpointing_disable()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Older name of `activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.backbone.modules())

    # ------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str) -> None:
        """Writes `segmentation_config.json` (build arguments + backbone and decoder configs) and
        `model.safetensors` (the full state dict, e.g. of a merged model)."""
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        cfg = dict(self.build_config)
        bcfg = getattr(self.backbone.model, "config", None)
        if bcfg is None or not hasattr(bcfg, "to_dict"):
            raise NotImplementedError(f"backbone {self.backbone.name!r} has no transformers config to save")
        cfg["backbone_config"] = bcfg.to_dict()
        if self._decoder.saved_config is not None:
            cfg["decoder_config"] = self._decoder.saved_config(self.decode_head)
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(save_directory, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str) -> "SegmentationModel":
        """Loads what `save_pretrained` wrote (strict: every weight must match)."""
        from safetensors.torch import load_file

        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: not a directory written by SegmentationModel.save_pretrained")
        with open(path) as f:
            cfg = json.load(f)
        bcls = get_backbone_class(cfg.pop("backbone"))
        bdict = cfg.pop("backbone_config")
        bdict.pop("model_type", None)
        backbone_config = bcls.config_class(**bdict)
        ddict = cfg.pop("decoder_config", None)
        decoder_config = None
        if ddict is not None:
            ddict.pop("model_type", None)
            decoder_config = Mask2FormerConfig(**ddict)
        model = build_segmentation_model(
            backbone=bcls.name, backbone_config=backbone_config, decoder_config=decoder_config, **cfg
        )
        model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_NAME)), strict=True)
        return model


def tiny_backbone_config(kind: str, **overrides):
    """A tiny config of backbone `kind` (random weights; tests and demos)."""
    return get_backbone_class(kind).tiny_config(**overrides)


def build_segmentation_model(
    backbone: str = "dinov2",
    model_name_or_path: str | None = None,
    backbone_config=None,
    decoder: str = "mask2former",
    num_labels: int = 19,
    out_indices=None,
    pyramid_channels: int = 256,
    pyramid_norm: str = "layernorm",
    decoder_config: Mask2FormerConfig | dict | None = None,
    upernet_hidden_size: int = 512,
    ignore_index: int = 255,
    **pretrained_kwargs,
) -> SegmentationModel:
    """Backbone `backbone` (a registry name) from a hub id / local checkpoint dir
    (`model_name_or_path`) or a config (`backbone_config`), plus a decoder.

    decoder: "mask2former" (the paper's; `decoder_config` = Mask2FormerConfig or a
    dict of its fields), "linear" (BN + 1x1 conv, no pyramid), "upernet".
    """
    bb = build_backbone(backbone, model_name_or_path, backbone_config, out_indices=out_indices, **pretrained_kwargs)
    return SegmentationModel(
        bb,
        decoder=decoder,
        num_labels=num_labels,
        pyramid_channels=pyramid_channels,
        pyramid_norm=pyramid_norm,
        decoder_config=decoder_config,
        upernet_hidden_size=upernet_hidden_size,
        ignore_index=ignore_index,
    )
