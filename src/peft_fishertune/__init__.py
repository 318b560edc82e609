"""peft-fishertune: FisherTune (CVPR 2025) as a PEFT method.

    from peft import get_peft_model
    from peft_fishertune import FisherTuneConfig
    model = get_peft_model(seg_model, FisherTuneConfig(target_modules=[...]))

Importing this package registers the "FISHERTUNE" peft type with PEFT.
"""

from . import _registration  # noqa: F401  (registers the peft type with PEFT)
from .rein import ReinConfig, ReinModel, get_rein_segmentation_model  # noqa: F401  (registers "REIN" too)
from .tuner import AdapterFileError, FisherTuneConfig, FisherTuneLayer, FisherTuneModel
from .tuner.selection import (
    SelectionSummary,
    select_parameters,
    selection_summary,
    set_active_fraction,
    target_parameters,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "FisherTuneConfig",
    "FisherTuneLayer",
    "FisherTuneModel",
    "SelectionSummary",
    "select_parameters",
    "selection_summary",
    "set_active_fraction",
    "target_parameters",
]
