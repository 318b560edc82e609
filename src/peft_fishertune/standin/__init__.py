"""A stand-in vision foundation model for the demo and the benchmark: a small DINOv2 pretrained here with
SimMIM on unlabeled synthetic street scenes, because real VFM weights cannot be downloaded everywhere this
project runs. Not part of the FisherTune method."""

from .pretrain import PretrainConfig, default_cache_dir, pretrain_standin

__all__ = ["PretrainConfig", "default_cache_dir", "pretrain_standin"]
