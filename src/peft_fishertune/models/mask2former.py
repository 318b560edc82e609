"""Mask2Former decoder (Cheng et al. 2022) on pyramid features, from transformers' own modules.

transformers' `Mask2FormerForUniversalSegmentation` builds its backbone itself
(`load_backbone`) and, fed a plain ViT, predicts masks at the patch stride. We
keep its parts and replace only the input: `Mask2FormerPixelDecoder`
(multi-scale deformable attention on the 3 coarsest levels + FPN to the finest),
`Mask2FormerTransformerModule` (masked-attention transformer decoder),
the class predictor and `Mask2FormerLoss` (Hungarian matching, point-sampled
mask BCE + dice, class CE with no-object weight), all unchanged, fed with the
4 maps of the simple feature pyramid. The class inherits
`Mask2FormerPreTrainedModel` to reuse transformers' weight initialization.

Semantic logits (Mask2Former's semantic inference):
    sem[b, k, y, x] = sum_q softmax(class_logits[b, q])[k] * sigmoid(mask_logits[b, q, y, x])
over the K real classes (the last, "no object", column is dropped). They are
probabilities-like scores in [0, 1] (not log-probabilities); argmax and
sliding-window averaging work on them as on logits.

Linked queries (Rein's `link_token_to_query`): `forward(features, queries=q)` with q (Q, hidden_dim) or
(B, Q, hidden_dim) uses q as the query positions instead of the learned `queries_embedder`; with
`config.replace_query_feat = True` the initial query features are `query_feat_proj(q)` instead of the learned
`queries_features`. Without `queries` the decoder is unchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerLoss,
    Mask2FormerPixelDecoder,
    Mask2FormerPreTrainedModel,
    Mask2FormerTransformerModule,
)


def tiny_mask2former_config(num_labels: int = 19, **overrides) -> Mask2FormerConfig:
    """A small Mask2Former config for tests and demos."""
    kw = dict(
        feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64, dim_feedforward=64,
        encoder_layers=1, decoder_layers=3, num_attention_heads=2, num_queries=8, train_num_points=256,
    )
    kw.update(overrides)
    return make_mask2former_config(num_labels=num_labels, **kw)


def make_mask2former_config(num_labels: int = 19, **kwargs) -> Mask2FormerConfig:
    """`Mask2FormerConfig` with paper defaults (100 queries, 9 decoder layers, 256 dims, loss weights
    2/5/5, no-object 0.1). Its backbone entry (default Swin) is unused: this decoder never builds it."""
    return Mask2FormerConfig(num_labels=num_labels, **kwargs)


def labels_to_mask_targets(
    labels: torch.Tensor, num_labels: int, ignore_index: int = 255
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Semantic maps (B, H, W) -> per image `mask_labels` (n_i, H, W) float and `class_labels` (n_i,) long.

    One binary mask per class present; `ignore_index` pixels belong to no mask
    (as in Mask2Former's semantic dataset mapper).
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be (B, H, W) class ids; got shape {tuple(labels.shape)}")
    mask_labels, class_labels = [], []
    for sem in labels:
        classes = torch.unique(sem)
        classes = classes[classes != ignore_index]
        bad = classes[(classes < 0) | (classes >= num_labels)]
        if bad.numel():
            raise ValueError(
                f"labels contain class ids {bad.tolist()} outside [0, {num_labels}) "
                f"(num_labels={num_labels}, ignore_index={ignore_index})"
            )
        mask_labels.append((sem[None] == classes[:, None, None]).float())
        class_labels.append(classes.long())
    return mask_labels, class_labels


def semantic_from_queries(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """(B, Q, K+1) class logits, (B, Q, h, w) mask logits -> (B, K, h, w) semantic scores."""
    probs = class_logits.softmax(-1)[..., :-1]
    return torch.einsum("bqk,bqhw->bkhw", probs, mask_logits.sigmoid())


class Mask2FormerSemanticDecoder(Mask2FormerPreTrainedModel):
    """Pixel decoder + transformer decoder + class head + loss, on 4 maps of strides s/4, s/2, s, 2s."""

    def __init__(self, config: Mask2FormerConfig, in_channels: Sequence[int]):
        super().__init__(config)
        if len(in_channels) != 4:
            raise ValueError(f"in_channels={list(in_channels)} must list 4 levels (finest first)")
        for name in ("feature_size", "mask_feature_size"):
            if getattr(config, name) % 32:
                raise ValueError(f"Mask2FormerConfig.{name}={getattr(config, name)} must be divisible by 32 (GroupNorm(32))")
        self.pixel_decoder = Mask2FormerPixelDecoder(config, feature_channels=list(in_channels))
        self.transformer_module = Mask2FormerTransformerModule(in_features=config.feature_size, config=config)
        self.class_predictor = nn.Linear(config.hidden_dim, config.num_labels + 1)
        # linked queries (Rein): also replace the query features, through this projection
        self.replace_query_feat = bool(getattr(config, "replace_query_feat", False))
        self.query_feat_proj = nn.Linear(config.hidden_dim, config.hidden_dim) if self.replace_query_feat else None
        self.weight_dict = {
            "loss_cross_entropy": config.class_weight,
            "loss_mask": config.mask_weight,
            "loss_dice": config.dice_weight,
        }
        self.criterion = Mask2FormerLoss(config=config, weight_dict=self.weight_dict)
        self.post_init()

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    def forward(
        self, features: Sequence[torch.Tensor], queries: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Returns per decoder layer (last = final) class logits (B, Q, K+1) and mask logits (B, Q, h/4, w/4).

        queries: linked query positions (Q, hidden_dim) or (B, Q, hidden_dim) replacing the learned ones (Rein)."""
        pix = self.pixel_decoder(list(features), return_dict=True)
        if queries is None:
            dec = self.transformer_module(
                multi_scale_features=pix.multi_scale_features,
                mask_features=pix.mask_features,
                output_hidden_states=True,
            )
        else:
            dec = self._transformer_with_queries(pix.multi_scale_features, pix.mask_features, queries)
        class_logits = [self.class_predictor(h.transpose(0, 1)) for h in dec.intermediate_hidden_states]
        return class_logits, list(dec.masks_queries_logits)

    def _transformer_with_queries(self, multi_scale_features, mask_features, queries: torch.Tensor):
        """`Mask2FormerTransformerModule.forward` with the query positions (and features) given."""
        tm = self.transformer_module
        hidden = self.config.hidden_dim
        if queries.ndim not in (2, 3) or queries.shape[-1] != hidden:
            raise ValueError(f"queries must be (Q, {hidden}) or (B, Q, {hidden}); got shape {tuple(queries.shape)}")
        feats, pos, sizes = [], [], []
        for i in range(tm.num_feature_levels):
            x = multi_scale_features[i]
            sizes.append(x.shape[-2:])
            pos.append(tm.position_embedder(x.shape, x.device, x.dtype, None).flatten(2).permute(2, 0, 1))
            feats.append((tm.input_projections[i](x).flatten(2) + tm.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
        batch = feats[0].shape[1]
        if queries.ndim == 2:
            query_pos = queries.unsqueeze(1).expand(-1, batch, -1)  # (Q, B, C)
        elif queries.shape[0] != batch:
            raise ValueError(f"queries has batch size {queries.shape[0]}, the features {batch}")
        else:
            query_pos = queries.transpose(0, 1)
        if self.replace_query_feat:
            query_feat = self.query_feat_proj(query_pos)
        else:
            if query_pos.shape[0] != tm.queries_features.num_embeddings:
                raise ValueError(
                    f"{query_pos.shape[0]} linked queries but {tm.queries_features.num_embeddings} learned query "
                    "features (config.num_queries); set replace_query_feat or pass num_queries queries"
                )
            query_feat = tm.queries_features.weight.unsqueeze(1).repeat(1, batch, 1)
        return tm.decoder(
            inputs_embeds=query_feat,
            multi_stage_positional_embeddings=pos,
            pixel_embeddings=mask_features,
            encoder_hidden_states=feats,
            query_position_embeddings=query_pos,
            feature_size_list=sizes,
            output_hidden_states=True,
            output_attentions=False,
            return_dict=True,
        )

    def loss(
        self,
        class_logits: list[torch.Tensor],
        mask_logits: list[torch.Tensor],
        labels: torch.Tensor,
        ignore_index: int = 255,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mask2Former loss from semantic labels (B, H, W) covering the same extent as the mask logits."""
        mask_labels, class_labels = labels_to_mask_targets(labels, self.num_labels, ignore_index)
        aux = None
        if self.config.use_auxiliary_loss:
            aux = [
                {"masks_queries_logits": m.float(), "class_queries_logits": c.float()}
                for m, c in zip(mask_logits[:-1], class_logits[:-1])
            ]
        loss_dict = self.criterion(
            masks_queries_logits=mask_logits[-1].float(),
            class_queries_logits=class_logits[-1].float(),
            mask_labels=mask_labels,
            class_labels=class_labels,
            auxiliary_predictions=aux,
        )
        for key, weight in self.weight_dict.items():
            for loss_key in loss_dict:
                if key in loss_key:  # transformers' own keys: "loss_mask", "loss_mask_0", ...
                    loss_dict[loss_key] = loss_dict[loss_key] * weight
        return sum(loss_dict.values()), loss_dict

    @staticmethod
    def semantic_logits(class_logits: torch.Tensor, mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Final-layer predictions -> (B, K, *size) semantic scores (bilinear resize)."""
        sem = semantic_from_queries(class_logits, mask_logits)
        return F.interpolate(sem, size=size, mode="bilinear", align_corners=False)
