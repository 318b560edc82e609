"""Light decoders for quick runs.

`LinearHead`: the DINOv2 linear-probe head on dense features: the 4 backbone
maps (same stride) are concatenated, batch-normalized and classified by a 1x1
conv; no pyramid. `UperNetDecoder`: transformers' `UperNetHead` (PSP + FPN) on
the 4 maps of the simple feature pyramid.
Both return logits at the stride of their finest input; the segmentor resizes.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers import UperNetConfig
from transformers.models.upernet.modeling_upernet import UperNetHead


class LinearHead(nn.Module):
    def __init__(self, in_channels: Sequence[int], num_labels: int, dropout: float = 0.0):
        super().__init__()
        total = int(sum(in_channels))
        self.in_channels = list(in_channels)
        self.bn = nn.BatchNorm2d(total)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(total, num_labels, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        if any(f.shape[-2:] != size for f in features):
            features = [nn.functional.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features]
        x = torch.cat(list(features), dim=1)
        return self.classifier(self.dropout(self.bn(x)))


class UperNetDecoder(nn.Module):
    def __init__(self, in_channels: Sequence[int], num_labels: int, hidden_size: int = 512, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        config = UperNetConfig(num_labels=num_labels, hidden_size=hidden_size, pool_scales=list(pool_scales))
        self.head = UperNetHead(config, in_channels=list(in_channels))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.head(list(features))
