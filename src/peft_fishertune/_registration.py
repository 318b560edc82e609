"""Registers FisherTune with PEFT. Run once, on `import peft_fishertune`.

PEFT's `PeftType` enum is closed to outside packages, but every lookup PEFT
does (get_peft_model, PeftModel.from_pretrained, load_adapter, saving) goes
through the three dicts in `peft.mapping`, keyed by the peft-type string. We
add our key there. `tests/test_registration.py` round-trips an adapter through
save -> load so that a PEFT upgrade that changes this fails loudly.
"""

from __future__ import annotations

import peft.mapping as _mapping
from peft import PeftModel

from .tuner.card import write_card_section
from .tuner.config import PEFT_TYPE_NAME, FisherTuneConfig, FisherTunePeftType
from .tuner.model import FisherTuneModel

PREFIX = "ft_"


def register() -> None:
    for key in (PEFT_TYPE_NAME, FisherTunePeftType.FISHERTUNE):
        _mapping.PEFT_TYPE_TO_CONFIG_MAPPING[key] = FisherTuneConfig
        _mapping.PEFT_TYPE_TO_TUNER_MAPPING[key] = FisherTuneModel
        _mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] = PREFIX
    _extend_model_card()


def _extend_model_card() -> None:
    """PeftModel writes a generic model card; append the FisherTune section (δ, targets, counts per module type).

    PEFT has no per-method hook for the card, so we wrap `PeftModel.create_or_update_model_card` once. It only adds
    text when the model holds a FisherTune adapter.
    """
    if getattr(PeftModel.create_or_update_model_card, "_fishertune", False):
        return
    original = PeftModel.create_or_update_model_card

    def create_or_update_model_card(self, output_dir: str):
        original(self, output_dir)
        write_card_section(self, output_dir)

    create_or_update_model_card._fishertune = True
    PeftModel.create_or_update_model_card = create_or_update_model_card


register()
