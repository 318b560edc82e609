"""Segmentation models: vision foundation model backbones, a simple feature
pyramid, Mask2Former / linear / UperNet decoders (see docs/models.md)."""

from .backbones import BACKBONES, BackboneAdapter, build_backbone, get_backbone_class, register_backbone
from .mask2former import Mask2FormerSemanticDecoder, make_mask2former_config, tiny_mask2former_config
from .pyramid import SimpleFeaturePyramid
from .segmentor import (
    DECODERS,
    SegmentationModel,
    SegmentationOutput,
    build_segmentation_model,
    tiny_backbone_config,
)

__all__ = [
    "BACKBONES",
    "BackboneAdapter",
    "DECODERS",
    "Mask2FormerSemanticDecoder",
    "SegmentationModel",
    "SegmentationOutput",
    "SimpleFeaturePyramid",
    "build_backbone",
    "build_segmentation_model",
    "get_backbone_class",
    "make_mask2former_config",
    "register_backbone",
    "tiny_backbone_config",
    "tiny_mask2former_config",
]
