"""Registers Rein with PEFT (run once, on `import peft_fishertune`), the same way as FisherTune: its string peft
type "REIN" in the three dicts of `peft.mapping` (PEFT's `PeftType` enum is closed to outside packages).
`tests/test_rein.py` round-trips an adapter through save -> load so a PEFT upgrade that changes this fails loudly."""

from __future__ import annotations

from .config import PEFT_TYPE_NAME, ReinConfig, ReinPeftType
from .model import ReinModel

PREFIX = "rein_"


def register() -> None:
    from .._registration import register_peft_type

    register_peft_type((PEFT_TYPE_NAME, ReinPeftType.REIN), ReinConfig, ReinModel, PREFIX)
