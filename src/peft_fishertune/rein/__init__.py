"""Rein ("Stronger, Fewer, & Superior", Wei et al., CVPR 2024) as a PEFT method, for comparison with FisherTune.

    from peft_fishertune.rein import ReinConfig, get_rein_segmentation_model
    model = get_rein_segmentation_model(seg_model)          # or peft.get_peft_model(seg_model, ReinConfig(...))

config -> layer -> model (PEFT's layout); `blocks` finds the blocks from the backbone adapter; `segmentation`
builds the paper's model (frozen backbone, Rein + Mask2Former decoder trainable, tokens linked to the queries).
"""

from .config import ReinConfig, ReinPeftType
from .layer import ReinLayer, ReinShared
from .model import ReinModel
from .registration import register
from .segmentation import get_rein_segmentation_model, rein_decoder_config, rein_trainable_parameters

register()

__all__ = [
    "ReinConfig",
    "ReinLayer",
    "ReinModel",
    "ReinPeftType",
    "ReinShared",
    "get_rein_segmentation_model",
    "rein_decoder_config",
    "rein_trainable_parameters",
]
