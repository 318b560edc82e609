"""Registers Rein with PEFT (run once, on `import peft_fishertune`), the same way as FisherTune: its string peft
type "REIN" in the three dicts of `peft.mapping` (PEFT's `PeftType` enum is closed to outside packages).
`tests/test_rein.py` round-trips an adapter through save -> load so a PEFT upgrade that changes this fails loudly."""

from __future__ import annotations

import peft.mapping as _mapping

from .config import PEFT_TYPE_NAME, ReinConfig, ReinPeftType
from .model import ReinModel

PREFIX = "rein_"


def register() -> None:
    for key in (PEFT_TYPE_NAME, ReinPeftType.REIN):
        _mapping.PEFT_TYPE_TO_CONFIG_MAPPING[key] = ReinConfig
        _mapping.PEFT_TYPE_TO_TUNER_MAPPING[key] = ReinModel
        _mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] = PREFIX
