"""The PEFT tuner: config -> layer -> model (PEFT's three-file layout), plus the saved-file format."""

from .config import FisherTuneConfig
from .layer import FisherTuneLayer
from .model import FisherTuneModel
from .storage import AdapterFileError

__all__ = ["AdapterFileError", "FisherTuneConfig", "FisherTuneLayer", "FisherTuneModel"]
