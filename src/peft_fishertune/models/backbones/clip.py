"""CLIP vision tower from transformers (`CLIPVisionModel`).

Tokens are [CLS, patches] after `pre_layrnorm`; the learned position table is
interpolated to the input grid (`interpolate_pos_encoding=True`).
"""

from __future__ import annotations

from transformers import CLIPVisionConfig, CLIPVisionModel

from .base import BackboneAdapter, register_backbone


@register_backbone("clip")
class ClipBackbone(BackboneAdapter):
    config_class = CLIPVisionConfig
    model_class = CLIPVisionModel

    TINY_CONFIG = dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        patch_size=8, image_size=32, projection_dim=16,
    )

    @property
    def blocks(self):
        return self.model.encoder.layers

    @property
    def patch_embed(self):
        return self.model.embeddings.patch_embedding

    def embed(self, pixel_values):
        pixel_values, grid = self.patch_input(pixel_values)
        hidden = self.model.embeddings(pixel_values, interpolate_pos_encoding=True)
        hidden = self.model.pre_layrnorm(hidden)
        return hidden, {"grid": grid, "num_prefix": 1}

    def run_block(self, block, hidden, ctx):
        return block(hidden, attention_mask=None)

    def _drop_unused_head(self):
        self.model.post_layernorm = None
