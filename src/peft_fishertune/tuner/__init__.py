"""The PEFT tuner: config -> layer -> model (PEFT's three-file layout)."""

from .config import FisherTuneConfig
from .layer import FisherTuneLayer
from .model import FisherTuneModel

__all__ = ["FisherTuneConfig", "FisherTuneLayer", "FisherTuneModel"]
