"""Experiment configuration: one YAML file with four sections, validated before anything runs.

    model:    what to build (backbone, checkpoint, decoder)
    data:     source dataset, target datasets, transforms, evaluation protocol
    method:   fishertune or a baseline, and the FisherTuneConfig fields
    training: transformers.TrainingArguments fields plus the three stage lengths

Command-line overrides use dotted keys: ``--training.stage3_steps 100 --model.decoder linear``
(values are parsed as YAML, so ``--data.crop_size [256,256]`` works). Unknown keys, wrong
types, missing dataset roots and stage lengths that do not add up raise ``ConfigError``
naming the key, before any training starts.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from .methods import get_method, method_names

METHODS = method_names()  # the rows of training/methods.py
SPARSE_METHODS = method_names(sparse=True)


class ConfigError(ValueError):
    """A bad experiment configuration (names the key and what was expected)."""


@dataclass
class DatasetEntry:
    name: str
    root: str
    split: str = "val"
    condition: Optional[str] = None
    label: Optional[str] = None  # how the domain is called in tables (default: name[/condition])
    max_images: Optional[int] = None

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        return f"{self.name}/{self.condition}" if self.condition else self.name


@dataclass
class ModelSection:
    backbone: str = "dinov2"
    model_name_or_path: Optional[str] = None  # a hub id or a local checkpoint directory
    tiny_backbone: Optional[dict] = None  # build a small random-init backbone from tiny_config(**this) instead
    decoder: str = "mask2former"
    decoder_config: Optional[dict] = None
    pyramid_channels: int = 256
    num_labels: int = 19
    out_indices: Optional[list] = None
    candidate_kinds: list = field(default_factory=lambda: ["linear"])


@dataclass
class DataSection:
    train: Optional[DatasetEntry] = None
    eval: list = field(default_factory=list)  # of DatasetEntry
    synthetic: Optional[dict] = None  # generate synthetic domains first: {root, styles, num_images, size, seed}
    crop_size: list = field(default_factory=lambda: [512, 512])
    base_scale: list = field(default_factory=lambda: [1024, 512])
    ratio_range: list = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    photometric: bool = True
    test_scale: list = field(default_factory=lambda: [1024, 512])
    eval_mode: str = "slide"
    window: list = field(default_factory=lambda: [512, 512])
    stride: list = field(default_factory=lambda: [341, 341])


@dataclass
class MethodSection:
    name: str = "fishertune"
    lora_r: int = 16
    selection_update_steps: int = 1  # recompute δ(t) every this many stage-3 steps
    fishertune: dict = field(default_factory=dict)  # FisherTuneConfig fields (target_modules come from the model)


@dataclass
class ExperimentConfig:
    model: ModelSection
    data: DataSection
    method: MethodSection
    training: dict
    source: str = "<dict>"


def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        annotation = origin
    return isinstance(value, annotation)


def _build(cls, data, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        ann = hints[key]
        if ann in (DatasetEntry, Optional[DatasetEntry]) and value is not None:
            value = _build(DatasetEntry, value, f"{where}.{key}")
        elif not _type_ok(value, ann):
            raise ConfigError(f"{where}.{key}={value!r} has type {type(value).__name__}; expected {_fmt(ann)}")
        kwargs[key] = value
    missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in kwargs]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    return cls(**kwargs)


def _fmt(ann) -> str:
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """['--a.b', '1', '--c.d=x'] -> {'a.b': 1, 'c.d': 'x'} (values parsed as YAML)."""
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ConfigError(f"override {arg!r}: expected --section.key VALUE or --section.key=VALUE")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {arg!r} has no value")
            key, raw = arg[2:], argv[i + 1]
            i += 2
        out[key] = yaml.safe_load(raw)
    return out


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    raw = dict(raw)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if parts[0] not in ("model", "data", "method", "training"):
            raise ConfigError(f"override --{dotted}: the first part must be model, data, method or training")
        node = raw
        for p in parts[:-1]:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[parts[-1]] = value
    return raw


def load_config(path_or_dict, overrides: Optional[dict[str, Any]] = None, *, check_paths: bool = True) -> ExperimentConfig:
    if isinstance(path_or_dict, (str, os.PathLike)):
        if not os.path.isfile(path_or_dict):
            raise ConfigError(f"config file {str(path_or_dict)!r} does not exist")
        with open(path_or_dict) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path_or_dict}: not valid YAML: {e}") from None
        source = str(path_or_dict)
    else:
        raw, source = dict(path_or_dict), "<dict>"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with model/data/method/training")
    raw = apply_overrides(raw, overrides or {})
    unknown = sorted(set(raw) - {"model", "data", "method", "training"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {unknown}; allowed: model, data, method, training")
    cfg = ExperimentConfig(
        model=_build(ModelSection, raw.get("model"), "model"),
        data=_build(DataSection, raw.get("data"), "data"),
        method=_build(MethodSection, raw.get("method"), "method"),
        training=dict(raw.get("training") or {}),
        source=source,
    )
    cfg.data.eval = [_build(DatasetEntry, e, f"data.eval[{i}]") for i, e in enumerate(cfg.data.eval)]
    validate(cfg, check_paths=check_paths)
    return cfg


def validate(cfg: ExperimentConfig, *, check_paths: bool = True) -> None:
    m, d, t = cfg.method, cfg.data, cfg.training
    if m.name not in METHODS:
        raise ConfigError(f"method.name={m.name!r} is not allowed; expected one of {list(METHODS)}")
    if m.selection_update_steps < 1:
        raise ConfigError(f"method.selection_update_steps={m.selection_update_steps} must be >= 1")
    if m.fishertune:
        from ..tuner.config import FisherTuneConfig

        try:
            FisherTuneConfig(**{"target_modules": ["x"], **m.fishertune})
        except TypeError as e:
            raise ConfigError(f"method.fishertune: {e}") from None
        except ValueError as e:
            raise ConfigError(f"method.fishertune: {e}") from None
    if d.train is None:
        raise ConfigError("data.train is required: {name, root, split}")
    if d.eval_mode not in ("slide", "whole"):
        raise ConfigError(f"data.eval_mode={d.eval_mode!r} is not allowed; expected 'slide' or 'whole'")
    for key in ("crop_size", "base_scale", "test_scale", "window", "stride", "ratio_range"):
        v = getattr(d, key)
        if len(v) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in v):
            raise ConfigError(f"data.{key}={v!r}: expected two positive numbers")
    stages = {k: t.get(k) for k in ("stage1_steps", "stage2_steps", "stage3_steps")}
    for k, v in stages.items():
        if v is None:
            raise ConfigError(f"training.{k} is required (the length of that stage in optimizer steps)")
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"training.{k}={v!r}: expected an integer >= 0")
    total = sum(stages.values())
    if total <= 0:
        raise ConfigError("training: stage1_steps + stage2_steps + stage3_steps must be > 0")
    if "max_steps" in t and t["max_steps"] not in (None, -1) and t["max_steps"] != total:
        raise ConfigError(
            f"training.max_steps={t['max_steps']} does not equal stage1_steps + stage2_steps + stage3_steps = "
            f"{stages['stage1_steps']} + {stages['stage2_steps']} + {stages['stage3_steps']} = {total}"
        )
    for key, why in get_method(m.name).stage_requirements().items():
        if stages[key] == 0:
            raise ConfigError(f"method.name={m.name!r} {why}: training.{key} must be > 0")
    if check_paths:
        synthetic_root = (d.synthetic or {}).get("root")
        for where, entry in [("data.train", d.train)] + [(f"data.eval[{i}]", e) for i, e in enumerate(d.eval)]:
            generated = synthetic_root and os.path.abspath(entry.root).startswith(os.path.abspath(synthetic_root))
            if not generated and not os.path.isdir(entry.root):
                raise ConfigError(f"{where}.root={entry.root!r} does not exist (dataset {entry.name!r})")
        if cfg.model.model_name_or_path and cfg.model.tiny_backbone:
            raise ConfigError("model: give model_name_or_path or tiny_backbone, not both")
