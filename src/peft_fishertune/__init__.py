"""peft-fishertune: FisherTune (CVPR 2025) as a PEFT method.

    from peft import get_peft_model
    from peft_fishertune import FisherTuneConfig
    model = get_peft_model(seg_model, FisherTuneConfig(target_modules=[...]))

Importing this package registers the "FISHERTUNE" peft type with PEFT.
"""

from .tuner.config import FisherTuneConfig

__version__ = "0.1.0"

__all__ = ["FisherTuneConfig"]
