"""Registers FisherTune with PEFT. Run once, on `import peft_fishertune`.

PEFT's `PeftType` enum is closed to outside packages, but every lookup PEFT
does (get_peft_model, PeftModel.from_pretrained, load_adapter, saving) goes
through the three dicts in `peft.mapping`, keyed by the peft-type string. We
add our key there. `tests/test_registration.py` round-trips an adapter through
save -> load so that a PEFT upgrade that changes this fails loudly.
"""

from __future__ import annotations

import peft.mapping as _mapping

from .tuner.config import PEFT_TYPE_NAME, FisherTuneConfig, FisherTunePeftType
from .tuner.model import FisherTuneModel

PREFIX = "ft_"


def register() -> None:
    for key in (PEFT_TYPE_NAME, FisherTunePeftType.FISHERTUNE):
        _mapping.PEFT_TYPE_TO_CONFIG_MAPPING[key] = FisherTuneConfig
        _mapping.PEFT_TYPE_TO_TUNER_MAPPING[key] = FisherTuneModel
        _mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] = PREFIX


register()
