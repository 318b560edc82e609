"""DINOv2 (and DINOv2 with registers) from transformers.

Tokens are [CLS, registers..., patches]; positions are learned and
interpolated (bicubic) to the input grid by the embeddings module itself.
"""

from __future__ import annotations

from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from .base import BackboneAdapter, register_backbone


@register_backbone("dinov2")
class Dinov2Backbone(BackboneAdapter):
    config_class = Dinov2Config
    model_class = Dinov2Model

    TINY_CONFIG = dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        patch_size=8, image_size=32, layerscale_value=1.0,
    )

    @property
    def blocks(self):
        return self.model.encoder.layer

    @property
    def patch_embed(self):
        return self.model.embeddings.patch_embeddings.projection

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + getattr(self.model.config, "num_register_tokens", 0)

    def embed(self, pixel_values):
        pixel_values, grid = self.patch_input(pixel_values)
        hidden = self.model.embeddings(pixel_values)
        return hidden, {"grid": grid, "num_prefix": self.num_prefix_tokens}

    def _drop_unused_head(self):
        self.model.layernorm = None
        # used only for masked-image pre-training (bool_masked_pos), never here
        self.model.embeddings.mask_token = None


@register_backbone("dinov2_registers")
class Dinov2WithRegistersBackbone(Dinov2Backbone):
    config_class = Dinov2WithRegistersConfig
    model_class = Dinov2WithRegistersModel

    @classmethod
    def tiny_config(cls, **overrides):
        overrides.setdefault("num_register_tokens", 2)
        return super().tiny_config(**overrides)
