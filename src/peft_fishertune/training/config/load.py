"""`load_config`: config file(s) -> `_base_` merged -> overrides applied -> typed sections -> validated."""

from __future__ import annotations

import dataclasses
import enum
import os
from typing import Any, Optional

from .overrides import apply_overrides, check_training_keys, coerce_training
from .sections import (
    SECTIONS,
    STAGE_KEYS,
    ConfigError,
    DataSection,
    DatasetEntry,
    ExperimentConfig,
    MethodSection,
    ModelSection,
    fmt,
    hints,
    training_class,
    type_ok,
)
from .validation import validate
from .yaml_io import read_configs, resolve_bases, strip_delete_marks


def load_config(path_or_dict, overrides: Optional[dict[str, Any]] = None, *, check_paths: bool = True,
                training: bool = True) -> ExperimentConfig:
    """Read a YAML file (or a list of them, each merged over the ones before, or a dict), resolve `_base_`, apply
    dotted `overrides`, type and validate every section.

    check_paths: also check that dataset roots hold their official layout and that the model checkpoint exists
    (False for inference, which reads no dataset of the config). training: build the training arguments (False for
    inference: `cfg.training` is then None and e.g. `bf16` on a CPU machine is not an error)."""
    if isinstance(path_or_dict, dict):
        raw, source = strip_delete_marks(resolve_bases(dict(path_or_dict), os.getcwd())), "<dict>"
    else:
        raw, source = read_configs(path_or_dict)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {unknown}; allowed: {', '.join(SECTIONS)} "
                          f"(and _base_)")
    raw = apply_overrides(raw, overrides or {})
    train = (raw.get("data") or {}).get("train")
    if isinstance(train, dict) and "split" not in train:
        # DatasetEntry.split defaults to the evaluation split: never train on it by omission
        raise ConfigError("data.train.split is required (e.g. train; all for GTA5): the default 'val' is meant for "
                          "evaluation entries")
    cfg = ExperimentConfig(
        model=_build(ModelSection, raw.get("model"), "model"),
        data=_build(DataSection, raw.get("data"), "data"),
        method=_build(MethodSection, raw.get("method"), "method"),
        training=build_training_arguments(raw.get("training")) if training else None,
        source=source,
        resolved=_plain({k: raw[k] for k in SECTIONS if k in raw}),
    )
    validate(cfg, check_paths=check_paths)
    cap = cfg.data.eval_max_images
    if cap is not None:
        for e in cfg.data.eval:
            e.max_images = cap if e.max_images is None else min(e.max_images, cap)
    return cfg


def _build(cls, data, where: str):
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    types_ = hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        ann = types_[key]
        if ann in (DatasetEntry, Optional[DatasetEntry]) and value is not None:
            value = _build(DatasetEntry, value, f"{where}.{key}")
        elif ann == list[DatasetEntry]:
            if not isinstance(value, list):
                raise ConfigError(f"{where}.{key}={value!r} has type {type(value).__name__}; expected a list of "
                                  f"datasets ({{name, root, split, ...}})")
            value = [_build(DatasetEntry, e, f"{where}.{key}[{i}]") for i, e in enumerate(value)]
        elif not type_ok(value, ann):
            raise ConfigError(f"{where}.{key}={value!r} has type {type(value).__name__}; expected {fmt(ann)}")
        kwargs[key] = value
    missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in kwargs]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    return cls(**kwargs)


def build_training_arguments(data: dict, where: str = "training"):
    """`FisherTuneTrainingArguments` from the `training:` mapping: every text value typed by `HfArgumentParser`,
    every other value checked against its field type, the stage lengths required."""
    cls = training_class()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    check_training_keys(data, f"{where}.")
    types_ = hints(cls)
    values = {}
    for key, value in data.items():
        if isinstance(value, str):
            value = coerce_training(key, value)
        elif not type_ok(value, types_[key]):
            raise ConfigError(f"{where}.{key}={value!r} has type {type(value).__name__}; expected {fmt(types_[key])}")
        values[key] = value
    for k in STAGE_KEYS:
        if k not in values:
            raise ConfigError(f"{where}.{k} is required (the length of that stage in optimizer steps)")
        v = values[k]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"{where}.{k}={v!r}: expected an integer >= 0")
    total = sum(values[k] for k in STAGE_KEYS)
    if total <= 0:
        raise ConfigError(f"{where}: stage1_steps + stage2_steps + stage3_steps must be > 0")
    if values.get("max_steps") not in (None, -1, 0, total):
        raise ConfigError(
            f"{where}.max_steps={values['max_steps']} does not equal stage1_steps + stage2_steps + stage3_steps = "
            f"{values['stage1_steps']} + {values['stage2_steps']} + {values['stage3_steps']} = {total}")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        v = values.get(key)
        if v is not None and v < 1:  # TrainingArguments takes 0 and torch fails after the model is built
            raise ConfigError(f"{where}.{key}={v} must be >= 1")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        msg = str(e)
        if "bf16" in msg or "fp16" in msg:
            msg += " (to train on CPU, add --training.use_cpu true)"
        raise ConfigError(f"{where}: {msg}") from None


def _plain(value):
    """`value` with enums and dataclasses as plain YAML types (for `ExperimentConfig.resolved`)."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
