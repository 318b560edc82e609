"""EVA02 from timm (optional: `pip install peft-fishertune[timm]`; timm needs torchvision).

timm is imported only when an EVA02 backbone is built, so the rest of the
package works without it. Features come from timm's own
`forward_intermediates` (its fixed dense-prediction API), with
`dynamic_img_size=True` so positions (and RoPE) follow the input grid.
Configs are dicts: {"model_name": <timm name>, **create_model kwargs}.
"""

from __future__ import annotations

import os

from torch import nn

from .base import BackboneAdapter, _as_int_size, register_backbone


def _import_timm():
    try:
        import timm
    except Exception as err:  # ImportError, or torchvision failing inside timm's import
        raise ImportError(
            f"backbone 'eva02' needs timm (pip install 'peft-fishertune[timm]'); importing it failed: {err!r}"
        ) from err
    return timm


@register_backbone("eva02")
class Eva02Backbone(BackboneAdapter):
    config_class = None  # a dict: {"model_name": ..., **timm.create_model kwargs}
    requires = "timm"

    @classmethod
    def tiny_config(cls, **overrides):
        cfg = dict(model_name="eva02_tiny_patch14_224", embed_dim=32, depth=4, num_heads=2, img_size=56)
        cfg.update(overrides)
        return cfg

    @classmethod
    def _check_config(cls, config) -> None:
        if not isinstance(config, dict) or not isinstance(config.get("model_name"), str):
            raise TypeError(f"backbone 'eva02' expects a dict with a 'model_name' (a timm model name); got {config!r}")

    @classmethod
    def _create(cls, model_name: str, pretrained: bool, **kwargs) -> nn.Module:
        timm = _import_timm()
        kwargs.setdefault("dynamic_img_size", True)
        kwargs.setdefault("num_classes", 0)
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)

    @classmethod
    def from_config(cls, config, out_indices=None, **kwargs):
        cls._check_config(config)
        cfg = dict(config)
        return cls(cls._create(cfg.pop("model_name"), False, **cfg), out_indices=out_indices, **kwargs)

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, out_indices=None, prune: bool = True, **timm_kwargs):
        """A timm name ("eva02_large_patch14_448.mim_m38m"), a hub id ("timm/<name>") or a local
        directory saved by timm (config.json + model.safetensors)."""
        if os.path.isdir(model_name_or_path):
            name = "local-dir:" + os.path.abspath(model_name_or_path)
        elif "/" in model_name_or_path:
            name = "hf-hub:" + model_name_or_path
        else:
            name = model_name_or_path
        return cls(cls._create(name, True, **timm_kwargs), out_indices=out_indices, prune=prune)

    def __init__(self, model, out_indices=None, prune: bool = True):
        super().__init__(model, out_indices=out_indices, prune=False)
        if prune:
            # timm's own pruning: drops trailing blocks, final norm and head
            self.model.prune_intermediate_layers(list(self.out_indices), prune_norm=True, prune_head=True)

    @property
    def blocks(self):
        return self.model.blocks

    @property
    def patch_embed(self):
        return self.model.patch_embed.proj

    @property
    def patch_size(self) -> int:
        return _as_int_size(self.model.patch_embed.patch_size, "patch_size")

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def num_layers(self) -> int:
        # constant after pruning: timm's pruning shortens `blocks`
        if not hasattr(self, "_num_layers"):
            object.__setattr__(self, "_num_layers", len(self.model.blocks))
        return self._num_layers

    def forward(self, pixel_values):
        x = self.pad_to_patch_multiple(pixel_values)
        return list(
            self.model.forward_intermediates(
                x, indices=list(self.out_indices), output_fmt="NCHW", intermediates_only=True
            )
        )

    forward_intermediates = forward

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers=1, offload=False):
        if every_n_layers != 1 or offload:
            raise ValueError("backbone 'eva02' (timm) supports only every_n_layers=1, offload=False")
        self.model.set_grad_checkpointing(True)

    def activation_checkpointing_disable(self):
        self.model.set_grad_checkpointing(False)
