"""Registers FisherTune with PEFT. Run once, on `import peft_fishertune`.

PEFT's `PeftType` enum is closed to outside packages, but every lookup PEFT
does (get_peft_model, PeftModel.from_pretrained, load_adapter, saving) goes
through the three dicts in `peft.mapping`, keyed by the peft-type string. We
add our key there. `tests/test_registration.py` round-trips an adapter through
save -> load so that a PEFT upgrade that changes this fails loudly.
"""

from __future__ import annotations

import functools
import json
import os

import peft.mapping as _mapping
from peft import PeftModel

from . import _peft_patches
from .tuner import fingerprint
from .tuner.card import write_card_section
from .tuner.config import PEFT_TYPE_NAME, FisherTuneConfig, FisherTunePeftType
from .tuner.layer import FisherTuneLayer
from .tuner.model import FisherTuneModel
from .tuner.storage import SUFFIXES, AdapterFileError

PREFIX = "ft_"


def register_peft_type(keys, config_cls, tuner_cls, prefix: str) -> None:
    """Make PEFT resolve each peft-type key (the string and its enum member) to our config, tuner and prefix."""
    for key in keys:
        _mapping.PEFT_TYPE_TO_CONFIG_MAPPING[key] = config_cls
        _mapping.PEFT_TYPE_TO_TUNER_MAPPING[key] = tuner_cls
        _mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] = prefix


def register() -> None:
    register_peft_type((PEFT_TYPE_NAME, FisherTunePeftType.FISHERTUNE), FisherTuneConfig, FisherTuneModel, PREFIX)
    _extend_model_card()
    _count_active_elements()
    _check_adapter_files()
    _peft_patches.apply()  # merge_and_unload of Super-Tuning / SHiRA models with our decoders in modules_to_save


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



# ------------------------------------------------------------------ trainable counts
def fishertune_counts(peft_model) -> tuple[int, int]:
    """(active, candidates) over the FisherTune deltas that require grad (0, 0 when there are none)."""
    active = candidates = 0
    for m in peft_model.modules():
        if isinstance(m, FisherTuneLayer):
            for a, v in m.ft_values.items():
                if v.requires_grad:
                    active += m.num_active(a)
                    candidates += v.numel()
    return active, candidates


def _inactive_candidates(peft_model) -> int:
    """FisherTune candidate values not (yet) active, of every adapter: storage, not parameters of the model."""
    return sum(v.numel() - m.num_active(a) for m in peft_model.modules() if isinstance(m, FisherTuneLayer)
               for a, v in m.ft_values.items())


def _count_active_elements() -> None:
    """PeftModel counts every candidate delta as a parameter; a FisherTune adapter trains only its active elements
    (the others are exactly zero and get exact zero gradients until the schedule activates them). Report the active
    count as trainable, and "all params" as the base model's count plus the active values (plus what PEFT adds
    for modules_to_save, as for every method), so neither grows with the candidate list: the candidate count is
    shown beside it in `print_trainable_parameters`."""
    if getattr(PeftModel.get_nb_trainable_parameters, "_fishertune", False):
        return
    original_count = PeftModel.get_nb_trainable_parameters

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable, total = original_count(self)
        active, candidates = fishertune_counts(self)
        return trainable - (candidates - active), total - _inactive_candidates(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        active, candidates = fishertune_counts(self)
        extra = f" (FisherTune: {active:,d} active of {candidates:,d} candidates)" if candidates else ""
        print(f"trainable params: {trainable:,d}{extra} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    get_nb_trainable_parameters._fishertune = True
    PeftModel.get_nb_trainable_parameters = get_nb_trainable_parameters
    PeftModel.print_trainable_parameters = print_trainable_parameters


# ------------------------------------------------------------------ adapter files
def _adapter_dir(model_id, kwargs) -> str | None:
    path = os.fspath(model_id)
    if kwargs.get("subfolder"):
        path = os.path.join(path, kwargs["subfolder"])
    return path if os.path.isdir(path) else None


def _precheck(path: str) -> None:
    """Before PEFT reads a local adapter: a broken adapter_config.json or weights file, or a file of FisherTune
    tensors declared as another method, is refused naming the file and what is wrong."""
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.exists(cfg_path):
        return
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise AdapterFileError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    weights = os.path.join(path, "adapter_model.safetensors")
    if not os.path.exists(weights):
        return
    declared = str(cfg.get("peft_type"))
    try:
        from safetensors import safe_open

        with safe_open(weights, framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
        if declared != PEFT_TYPE_NAME:
            return  # not ours: PEFT reports it as it does for every method
        raise AdapterFileError(f"{weights}: not a readable safetensors file (truncated or overwritten?): {exc}") from None
    ours = [k for k in keys if k.rsplit(".", 1)[-1] in SUFFIXES]
    if declared != PEFT_TYPE_NAME and ours:
        raise AdapterFileError(
            f"{cfg_path}: declares peft_type {declared!r}, but {weights} holds FisherTune tensors (e.g. {ours[0]!r}); "
            f"it is a FisherTune adapter: set \"peft_type\": \"{PEFT_TYPE_NAME}\""
        )


def _naming_the_file(path: str | None, exc: AdapterFileError) -> AdapterFileError:
    msg = str(exc)
    if path and msg.startswith("adapter file:"):
        return AdapterFileError(os.path.join(path, "adapter_model.safetensors") + msg.removeprefix("adapter file"))
    if path and path not in msg:  # e.g. the fingerprint check's "adapter 'default': ... another decoder"
        return AdapterFileError(f"{path}: {msg}")
    return exc


def _check_adapter_files() -> None:
    if getattr(PeftModel.load_adapter, "_fishertune", False):
        return
    original_from_pretrained = PeftModel.from_pretrained.__func__
    original_load_adapter = PeftModel.load_adapter

    @functools.wraps(original_from_pretrained)
    def from_pretrained(cls, model, model_id, *args, **kwargs):
        path = _adapter_dir(model_id, kwargs)
        if path is not None and kwargs.get("config") is None:
            _precheck(path)
        try:
            return original_from_pretrained(cls, model, model_id, *args, **kwargs)
        except AdapterFileError as exc:
            raise _naming_the_file(path, exc) from None

    @functools.wraps(original_load_adapter)
    def load_adapter(self, model_id, *args, **kwargs):
        path = _adapter_dir(model_id, kwargs)
        if path is not None:
            _precheck(path)
        try:
            return original_load_adapter(self, model_id, *args, **kwargs)
        except AdapterFileError as exc:
            raise _naming_the_file(path, exc) from None
        except KeyError as exc:  # PEFT's bare KeyError: a modules_to_save weight the file lacks (another decoder)
            adapter_name = kwargs.get("adapter_name", args[0] if args else "default")
            config = self.peft_config.get(adapter_name)
            peft_type = str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", "PEFT")))
            explained = fingerprint.explain_missing_key(self, adapter_name, str(exc.args[0]) if exc.args else "",
                                                        path, peft_type)
            if explained is None:
                raise
            raise explained from None

    load_adapter._fishertune = True
    PeftModel.from_pretrained = classmethod(from_pretrained)
    PeftModel.load_adapter = load_adapter


register()
