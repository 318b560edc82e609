"""ViTDet-style simple feature pyramid (Li et al. 2022, "Exploring Plain Vision
Transformer Backbones for Object Detection"), fed with 4 intermediate maps.

A plain ViT gives maps at one stride, the patch size p. Level i takes the i-th
intermediate map and resamples it by a fixed factor:

    level 0: x4 up  (deconv 2x2/2 -> norm -> GELU -> deconv 2x2/2)   stride p/4
    level 1: x2 up  (deconv 2x2/2)                                    stride p/2
    level 2: x1     (identity)                                        stride p
    level 3: x1/2   (max-pool 2x2/2, ceil mode)                       stride 2p

then projects it to `out_channels` (1x1 conv -> norm -> 3x3 conv -> norm).
For p = 16 the strides are 4/8/16/32; for p = 14 (DINOv2, CLIP-L/14, EVA02)
they are 3.5/7/14/28, and the decoders resize their output to the input size.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

SCALES = (4.0, 2.0, 1.0, 0.5)
NORMS = ("layernorm", "groupnorm", "batchnorm")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "layernorm":
        return LayerNorm2d(channels, eps=1e-6)
    if kind == "groupnorm":
        groups = 32 if channels % 32 == 0 else 1
        return nn.GroupNorm(groups, channels)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"norm={kind!r} is not supported; expected one of {list(NORMS)}")


def _resample(scale: float, dim: int, norm: str) -> tuple[nn.Module, int]:
    if scale == 4.0:
        return (
            nn.Sequential(
                nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
                make_norm(norm, dim // 2),
                nn.GELU(),
                nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
            ),
            dim // 4,
        )
    if scale == 2.0:
        return nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), dim // 2
    if scale == 1.0:
        return nn.Identity(), dim
    if scale == 0.5:
        return nn.MaxPool2d(2, stride=2, ceil_mode=True), dim
    raise ValueError(f"pyramid scale {scale} is not supported; expected one of {SCALES}")


class SimpleFeaturePyramid(nn.Module):
    """4 same-stride maps (B, in_channels, h, w) -> 4 maps (B, out_channels, h*s, w*s), s in (4, 2, 1, 1/2)."""

    def __init__(self, in_channels: int, out_channels: int = 256, patch_size: int = 16, norm: str = "layernorm"):
        super().__init__()
        if in_channels % 4:
            raise ValueError(f"in_channels={in_channels} must be divisible by 4 (the x4 branch halves it twice)")
        if out_channels <= 0:
            raise ValueError(f"out_channels={out_channels} must be positive")
        make_norm(norm, 4)  # validates `norm`
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.patch_size = patch_size
        self.resample = nn.ModuleList()
        self.project = nn.ModuleList()
        for scale in SCALES:
            op, dim = _resample(scale, in_channels, norm)
            self.resample.append(op)
            self.project.append(
                nn.Sequential(
                    nn.Conv2d(dim, out_channels, 1, bias=False),
                    make_norm(norm, out_channels),
                    nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                    make_norm(norm, out_channels),
                )
            )

    @property
    def strides(self) -> tuple[float, ...]:
        """Output strides in input pixels: patch_size / scale."""
        return tuple(self.patch_size / s for s in SCALES)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(SCALES):
            raise ValueError(f"expected {len(SCALES)} feature maps, got {len(features)}")
        return [proj(op(x)) for x, op, proj in zip(features, self.resample, self.project)]
