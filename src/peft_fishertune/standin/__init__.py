"""A stand-in vision foundation model for the demo and the benchmark: a small DINOv2 pretrained here with
SimMIM on unlabeled synthetic street scenes (or supervised on their coarse categories, `supervised.py`), because real VFM weights cannot be downloaded everywhere this
project runs. Not part of the FisherTune method."""

from .presets import STANDIN_PRESETS, is_standin_ref, resolve_standin, standin_cache_dir, standin_preset
from .pretrain import PretrainConfig, default_cache_dir, pretrain_standin
from .supervised import SupervisedPretrainConfig

__all__ = [
    "PretrainConfig",
    "STANDIN_PRESETS",
    "SupervisedPretrainConfig",
    "default_cache_dir",
    "is_standin_ref",
    "pretrain_standin",
    "resolve_standin",
    "standin_cache_dir",
    "standin_preset",
]
