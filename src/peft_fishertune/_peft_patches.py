"""Mends to PEFT itself that any model of ours needs, whichever package part wrapped it. Applied once, on
`import peft_fishertune` (by `_registration`); this module imports only PEFT, so nothing here can close an
import circle (the training package re-exports `patch_peft_unload` for older callers).

`tests/test_peft_patches.py` runs each mend in a fresh process that never imports the training package, so a
PEFT upgrade that fixes (or changes) the patched code shows up there.
"""

from __future__ import annotations


def patch_peft_unload() -> None:
    """peft 0.21.2's generic `BaseTuner._replace_module` (used by Super-Tuning, SHiRA and other tuners that do not
    override it) copies `child.weight` onto the module it puts back, also when unloading a `modules_to_save` wrapper;
    our decoders have no `.weight`, so `merge_and_unload()` raised AttributeError ('LinearHead' object has no
    attribute 'weight'). Put such a module back as it is. Idempotent; LoRA (which overrides it) is untouched."""
    from peft.tuners.tuners_utils import BaseTuner

    original = BaseTuner._replace_module
    if getattr(original, "_fishertune_patched", False):
        return

    def _replace_module(self, parent, child_name, new_module, child):
        inner = getattr(child, "base_layer", child) if not _is_wrapper(child) else child
        if not hasattr(new_module, "base_layer") and not hasattr(inner, "weight"):
            setattr(parent, child_name, new_module)
            return
        return original(self, parent, child_name, new_module, child)

    _replace_module._fishertune_patched = True
    BaseTuner._replace_module = _replace_module


def _is_wrapper(module) -> bool:
    from peft.utils.other import AuxiliaryTrainingWrapper

    return isinstance(module, AuxiliaryTrainingWrapper)


def apply() -> None:
    """Every mend of this module (idempotent)."""
    patch_peft_unload()
