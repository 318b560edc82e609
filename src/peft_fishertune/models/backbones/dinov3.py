"""DINOv3 ViT from transformers (`DINOv3ViTModel`).

Tokens are [CLS, registers..., patches]; positions are RoPE computed from the
patch grid of each input, so any (padded) size works.
"""

from __future__ import annotations

from transformers import DINOv3ViTConfig, DINOv3ViTModel

from .base import BackboneAdapter, register_backbone


@register_backbone("dinov3")
class Dinov3Backbone(BackboneAdapter):
    config_class = DINOv3ViTConfig
    model_class = DINOv3ViTModel

    TINY_CONFIG = dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        patch_size=8, image_size=32, num_register_tokens=2,
    )

    @property
    def blocks(self):
        return self.model.model.layer

    @property
    def patch_embed(self):
        return self.model.embeddings.patch_embeddings

    def embed(self, pixel_values):
        pixel_values, grid = self.patch_input(pixel_values)
        hidden = self.model.embeddings(pixel_values)
        rope = self.model.rope_embeddings(pixel_values)
        return hidden, {"grid": grid, "num_prefix": 1 + self.model.config.num_register_tokens, "rope": rope}

    def run_block(self, block, hidden, ctx):
        return block(hidden, position_embeddings=ctx["rope"])

    def _drop_unused_head(self):
        self.model.norm = None
        self.model.embeddings.mask_token = None
