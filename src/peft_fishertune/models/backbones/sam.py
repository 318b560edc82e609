"""SAM image encoder from transformers (`SamVisionModel`, ViTDet-style windowed ViT).

Hidden states are (B, h, w, C) grids with no prefix tokens. The absolute
position grid is interpolated (bicubic) to the input grid, so inputs need not
be 1024x1024; the relative positions of global-attention blocks are resized by
the attention module itself. The neck (256-channel projection) is not used.
"""

from __future__ import annotations

from transformers import SamVisionConfig, SamVisionModel

from .base import BackboneAdapter, interpolate_grid_embedding, register_backbone


@register_backbone("sam")
class SamBackbone(BackboneAdapter):
    config_class = SamVisionConfig
    model_class = SamVisionModel

    TINY_CONFIG = dict(
        hidden_size=32, output_channels=16, num_hidden_layers=4, num_attention_heads=2,
        patch_size=8, image_size=64, window_size=2, global_attn_indexes=[1, 3], mlp_dim=64,
        num_pos_feats=8, initializer_range=0.02,
    )

    @property
    def encoder(self):
        return self.model.vision_encoder

    @property
    def blocks(self):
        return self.encoder.layers

    @property
    def patch_embed(self):
        return self.encoder.patch_embed.projection

    def embed(self, pixel_values):
        pixel_values = pixel_values.to(self.patch_embed.weight.dtype)
        # the projection directly: SamPatchEmbeddings rejects sizes other than config.image_size
        hidden = self.patch_embed(pixel_values).permute(0, 2, 3, 1)  # (B, h, w, C)
        grid = tuple(hidden.shape[1:3])
        if self.encoder.pos_embed is not None:
            hidden = hidden + interpolate_grid_embedding(self.encoder.pos_embed, grid)
        return hidden, {"grid": grid}

    def to_map(self, hidden, ctx):
        return hidden.permute(0, 3, 1, 2)

    def _drop_unused_head(self):
        self.encoder.neck = None
