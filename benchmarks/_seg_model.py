"""A DINOv2 encoder with a 1x1-conv segmentation head (CE on full-resolution labels), for benchmarks."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Dinov2Config, Dinov2Model


class LinearSegModel(nn.Module):
    def __init__(self, config: Dinov2Config, num_classes: int = 19):
        super().__init__()
        self.backbone = Dinov2Model(config)
        self.head = nn.Conv2d(config.hidden_size, num_classes, 1)

    def forward(self, pixel_values, labels=None):
        h = self.backbone(pixel_values=pixel_values).last_hidden_state[:, 1:]  # (B, N, C), no CLS
        b, n, c = h.shape
        side = int(round(n**0.5))
        logits = self.head(h.transpose(1, 2).reshape(b, c, side, side))  # (B, K, H/14, W/14)
        logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        loss = None if labels is None else F.cross_entropy(logits, labels, ignore_index=255)
        return {"loss": loss, "logits": logits}


def encoder_linear_weights(model: nn.Module) -> dict:
    return {f"{n}.weight": m.weight for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("backbone.encoder")}


def make_batches(n: int, batch_size: int, image_size: int, num_classes: int = 19, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        # smooth "images" and blocky labels so the loss has structure
        x = F.interpolate(torch.randn(batch_size, 3, image_size // 16, image_size // 16, generator=g),
                          size=(image_size, image_size), mode="bilinear", align_corners=False)
        y = F.interpolate(torch.randint(0, num_classes, (batch_size, 1, image_size // 28, image_size // 28),
                                        generator=g).float(), size=(image_size, image_size), mode="nearest")
        out.append({"pixel_values": x, "labels": y[:, 0].long()})
    return out
