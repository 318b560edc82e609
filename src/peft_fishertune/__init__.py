"""peft-fishertune: FisherTune (CVPR 2025) as a PEFT method.

    from peft import get_peft_model
    from peft_fishertune import FisherTuneConfig
    model = get_peft_model(seg_model, FisherTuneConfig(target_modules=[...]))

Importing this package registers the "FISHERTUNE" peft type with PEFT.

Training any PEFT model through the three stages: `FisherTuneTrainer` / `FisherTuneTrainingArguments`
(transformers.Trainer), or `FisherTuneSchedule` in your own loop (docs/trainer.md).
"""

from . import _registration  # noqa: F401  (registers the peft type with PEFT)
from .rein import ReinConfig, ReinModel, get_rein_segmentation_model  # noqa: F401  (registers "REIN" too)
from .tuner import AdapterFileError, FisherTuneConfig, FisherTuneLayer, FisherTuneModel
from .tuner.schedule import active_fraction
from .tuner.selection import (
    SelectionSummary,
    select_parameters,
    selection_summary,
    set_active_fraction,
    target_parameters,
)
from .tuner.sparse_delta import deltas_in_weights, kept_base_values

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "FisherTuneConfig",
    "FisherTuneLayer",
    "FisherTuneCallback",
    "FisherTuneModel",
    "FisherTuneSchedule",
    "FisherTuneTrainer",
    "FisherTuneTrainingArguments",
    "SelectionSummary",
    "active_fraction",
    "deltas_in_weights",
    "kept_base_values",
    "select_parameters",
    "selection_summary",
    "set_active_fraction",
    "target_parameters",
]

_LAZY = {"FisherTuneCallback": "callback", "FisherTuneSchedule": "schedule", "FisherTuneTrainer": "trainer",
         "FisherTuneTrainingArguments": "trainer"}


def __getattr__(name: str):
    """The trainer's names load on first use (transformers.Trainer is a heavy import that an inference script
    need not pay)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".trainer.{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
