"""Experiment configuration: one YAML file with four typed sections, validated before anything is built.

    model:    ModelSection                  what to build (backbone, checkpoint, decoder)
    data:     DataSection (+ DatasetEntry)  source dataset, target datasets, transforms, evaluation protocol
    method:   MethodSection                 fishertune or a baseline, and the FisherTuneConfig fields
    training: FisherTuneTrainingArguments   transformers.TrainingArguments plus the three stage lengths

Every section is a dataclass whose defaults are the defaults of a run. Command-line overrides use dotted keys
and are typed by the field they set, never guessed from the text:

    --training.backbone_lr 1e-5          a float (the field is a float)
    --training.save_strategy no          a save strategy (the string "no", not YAML's False)
    --data.eval.0.root /data/cityscapes  changes one evaluation entry (index into the list)
    --method.fishertune.delta_max 0.1    typed by FisherTuneConfig.delta_max
    --data.crop_size [256,256]           lists and mappings are written as YAML / JSON

The `training` section is parsed by transformers' `HfArgumentParser` (the parser of `TrainingArguments`), the
other sections by their dataclass field types. The YAML file itself is read with YAML 1.2 scalars (`no` stays a
string, `1e-5` is a float). Unknown keys, wrong types, unknown backbones / decoders / datasets / splits /
conditions, dataset roots that do not hold the official layout and model checkpoints that are missing raise
`ConfigError` naming the key, before any model is built or any training starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from .methods import get_method, method_names

METHODS = method_names()  # the rows of training/methods.py
SPARSE_METHODS = method_names(sparse=True)
SECTIONS = ("model", "data", "method", "training")
# data fault options of `load_dgss_dataset` (peft_fishertune.data.loading / registry)
ON_FAULT = ("error", "skip")
VERIFY = ("none", "headers", "full")
UNKNOWN_LABEL = ("error", "ignore")
SIZE_MISMATCH = ("resize_image", "resize_label", "skip", "error")


class ConfigError(ValueError):
    """A bad experiment configuration (names the key and what was expected)."""


# ------------------------------------------------------------------------------------------------ sections


@dataclass
class DatasetEntry:
    """One dataset of the run: the training source or an evaluation target."""

    name: str = field(metadata={"help": "a registered dataset (peft_fishertune.data.list_datasets())."})
    root: str = field(metadata={"help": "the folder the official archives were unpacked into (docs/data.md)."})
    split: str = field(default="val", metadata={"help": "a split of that dataset (GTA5 'all' = the 24,966 images)."})
    condition: Optional[str] = field(default=None, metadata={"help": "ACDC: fog / night / rain / snow."})
    label: Optional[str] = field(default=None, metadata={"help": "the domain's name in tables (default name[/condition])."})
    max_images: Optional[int] = field(default=None, metadata={"help": "evaluate on the first N images only."})
    on_fault: str = field(default="error", metadata={"help": f"a faulty or unlabelled image: one of {ON_FAULT}."})
    verify: str = field(default="none", metadata={"help": f"scan files when loading: one of {VERIFY}."})
    unknown_label: str = field(default="error", metadata={"help": f"a raw mask value outside the table: {UNKNOWN_LABEL}."})
    size_mismatch: Optional[str] = field(
        default=None, metadata={"help": f"image/label of different size: {SIZE_MISMATCH} (None = dataset default)."})

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        return f"{self.name}/{self.condition}" if self.condition else self.name

    def loader_options(self) -> dict[str, Any]:
        """The keyword arguments of `load_dgss_dataset` this entry sets."""
        return {"split": self.split, "condition": self.condition, "on_fault": self.on_fault, "verify": self.verify,
                "unknown_label": self.unknown_label, "size_mismatch": self.size_mismatch}


@dataclass
class ModelSection:
    backbone: str = field(default="dinov2", metadata={"help": "a registered backbone (models.BACKBONES)."})
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "a hub id or a local checkpoint directory holding config.json."})
    tiny_backbone: Optional[dict] = field(
        default=None, metadata={"help": "build a small random-init backbone from tiny_config(**this) instead."})
    decoder: str = field(default="mask2former", metadata={"help": "mask2former | linear | upernet."})
    decoder_config: Optional[dict] = field(default=None, metadata={"help": "Mask2FormerConfig fields."})
    pyramid_channels: int = field(default=256, metadata={"help": "channels of the ViTDet-style feature pyramid."})
    num_labels: int = field(default=19, metadata={"help": "classes (19 Cityscapes trainIds)."})
    out_indices: Optional[list] = field(default=None, metadata={"help": "backbone blocks feeding the decoder."})
    candidate_kinds: list = field(default_factory=lambda: ["linear"],
                                  metadata={"help": "which backbone weights FisherTune may select."})


@dataclass
class DataSection:
    train: Optional[DatasetEntry] = field(default=None, metadata={"help": "the source dataset (required)."})
    eval: list[DatasetEntry] = field(default_factory=list, metadata={"help": "the target datasets (at least one)."})
    synthetic: Optional[dict] = field(
        default=None, metadata={"help": "generate synthetic domains first: {root, styles, num_images, size, seed}."})
    crop_size: list = field(default_factory=lambda: [512, 512], metadata={"help": "training crop (h, w)."})
    base_scale: list = field(default_factory=lambda: [1024, 512], metadata={"help": "resize before crop (long, short)."})
    ratio_range: list = field(default_factory=lambda: [0.5, 2.0], metadata={"help": "random rescale range."})
    cat_max_ratio: float = field(default=0.75, metadata={"help": "max share of one class in a crop (mmseg)."})
    photometric: bool = field(default=True, metadata={"help": "photometric distortion when training."})
    test_scale: list = field(default_factory=lambda: [1024, 512], metadata={"help": "test resize (long, short)."})
    eval_mode: str = field(default="slide", metadata={"help": "slide | whole."})
    window: list = field(default_factory=lambda: [512, 512], metadata={"help": "sliding window (h, w)."})
    stride: list = field(default_factory=lambda: [341, 341], metadata={"help": "sliding stride (h, w)."})


@dataclass
class MethodSection:
    name: str = field(default="fishertune", metadata={"help": f"one of {list(METHODS)}."})
    lora_r: int = field(default=16, metadata={"help": "rank of the LoRA baseline."})
    selection_update_steps: int = field(default=1, metadata={"help": "recompute δ(t) every this many stage-3 steps."})
    fishertune: dict = field(default_factory=dict,
                             metadata={"help": "FisherTuneConfig fields (target_modules come from the model)."})
    rein: dict = field(default_factory=dict,
                       metadata={"help": "ReinConfig fields for method.name: rein (token_length, rank, ...)."})


@dataclass
class ExperimentConfig:
    model: ModelSection
    data: DataSection
    method: MethodSection
    training: Any  # FisherTuneTrainingArguments (None when loaded with training=False)
    source: str = "<dict>"
    resolved: dict = field(default_factory=dict)  # the four sections as run: file + overrides, plain YAML types


_SECTION_CLASSES = {"model": ModelSection, "data": DataSection, "method": MethodSection}


def _training_class():
    from .trainer import FisherTuneTrainingArguments

    return FisherTuneTrainingArguments


# ------------------------------------------------------------------------------------------------ YAML


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: only true/false are booleans (`no`, `off` stay strings) and `1e-5` is a
    float (YAML 1.1 wants `1.0e-5`)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml(text_or_stream):
    """YAML with 1.2 scalars (see `_Yaml12Loader`)."""
    return yaml.load(text_or_stream, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


# ------------------------------------------------------------------------------------------------ types


def _fmt(ann) -> str:
    origin = typing.get_origin(ann)
    if origin is Literal:
        return f"one of {list(typing.get_args(ann))}"
    if origin in (Union, types.UnionType):
        return " | ".join(_fmt(a) for a in typing.get_args(ann))
    if ann is type(None):
        return "None"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_fmt(a) for a in typing.get_args(ann))}]"
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def _type_ok(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, annotation) or value in {m.value for m in annotation}
    if origin is not None:
        annotation = origin
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, (dict, annotation))
    return isinstance(value, annotation)


def _parse_yaml_value(raw: str, where: str):
    try:
        return load_yaml(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}={raw!r}: not a valid YAML/JSON value ({e})") from None


def _coerce(raw: str, ann, where: str):
    """The command-line text `raw` as a value of type `ann` (the field it sets)."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (Union, types.UnionType):
        if type(None) in args and raw.strip() in ("null", "None", "none", "~"):
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _coerce(raw, rest[0], where)
        if str in rest and not raw.lstrip().startswith(("[", "{")):
            return raw
        return _parse_yaml_value(raw, where)
    if origin is Literal:
        if raw not in args:
            raise ConfigError(f"{where}={raw!r}: expected one of {list(args)}")
        return raw
    if ann is bool:
        low = raw.strip().lower()
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{where}={raw!r}: expected true or false")
    if ann is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{where}={raw!r}: expected an integer") from None
    if ann is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{where}={raw!r}: expected a number") from None
    if ann is str:
        return raw
    return _parse_yaml_value(raw, where)  # lists, mappings, dataset entries, Any


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_type(parts: list[str], where: str):
    """The annotation of the field a dotted override path sets (Any below free-form mappings);
    `method.fishertune.<key>` is typed by `FisherTuneConfig.<key>`."""
    from ..tuner.config import FisherTuneConfig

    ann: Any = _SECTION_CLASSES[parts[0]]
    for i, p in enumerate(parts[1:], start=1):
        if typing.get_origin(ann) in (Union, types.UnionType):
            rest = [a for a in typing.get_args(ann) if a is not type(None)]
            ann = rest[0] if len(rest) == 1 else Any
        if dataclasses.is_dataclass(ann):
            hints = _hints(ann)
            if p not in hints:
                raise ConfigError(f"override --{where}: {'.'.join(parts[:i])} has no key {p!r}; "
                                  f"allowed: {sorted(hints)}")
            ann = FisherTuneConfig if parts[:i + 1] == ["method", "fishertune"] else hints[p]
        elif typing.get_origin(ann) is list or ann is list:
            if not p.isdigit():
                raise ConfigError(f"override --{where}: {'.'.join(parts[:i])} is a list; expected an index, got {p!r}")
            args = typing.get_args(ann)
            ann = args[0] if args else Any
        else:
            ann = Any
    return dict if ann is FisherTuneConfig else ann


@functools.lru_cache(maxsize=1)
def _training_parser():
    from transformers import HfArgumentParser

    return HfArgumentParser(_training_class(), exit_on_error=False)


def _coerce_training(key: str, raw: str):
    """A `training.<key>` text value typed as `HfArgumentParser` types `--<key>` of the training arguments."""
    import argparse

    parser = _training_parser()
    action = parser._option_string_actions.get(f"--{key}")  # noqa: SLF001 - argparse's own index of options
    try:
        ns = parser.parse_args([f"--{key}={raw}"])
    except argparse.ArgumentError:
        if action is not None and action.choices:
            raise ConfigError(f"training.{key}={raw!r}: expected one of {list(action.choices)}") from None
        what = {int: "an integer", float: "a number"}.get(getattr(action, "type", None))
        if what is None and getattr(action, "type", None) is not None and "bool" in getattr(action.type, "__name__", ""):
            what = "true or false"
        raise ConfigError(f"training.{key}={raw!r}: expected {what or _fmt(_hints(_training_class())[key])}") from None
    value = getattr(ns, key)
    ann = _hints(_training_class())[key]
    if isinstance(value, str) and value.lstrip().startswith(("{", "[")) and (_type_ok({}, ann) or _type_ok([], ann)):
        value = _parse_yaml_value(value, f"training.{key}")  # dict / list fields given as JSON
    return value


# ------------------------------------------------------------------------------------------------ overrides


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """['--a.b', '1', '--c.d=x'] -> {'a.b': '1', 'c.d': 'x'}: the text of each value; `load_config` types it by the
    field it sets."""
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
        if key.split(".")[0] not in SECTIONS or "." not in key:
            raise ConfigError(f"override --{key}: expected --section.key with section one of {list(SECTIONS)}")
        out[key] = raw
    return out


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """Set each dotted key in a copy of `raw`. Text values (from the command line) are typed by their field;
    other values are set as given. A numeric part indexes a list (`data.eval.0.root`)."""
    import copy

    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if parts[0] not in SECTIONS or len(parts) < 2:
            raise ConfigError(f"override --{dotted}: the first part must be one of {list(SECTIONS)}")
        if isinstance(value, str):
            if parts[0] == "training":
                if len(parts) != 2:
                    raise ConfigError(f"override --{dotted}: training keys are not nested (--training.KEY VALUE)")
                _check_training_keys([parts[1]], "override --training.")
                value = _coerce_training(parts[1], value)
            else:
                value = _coerce(value, _field_type(parts, dotted), dotted)
        node = raw
        for depth, p in enumerate(parts[:-1]):
            node = _child(node, p, parts[:depth + 1], create=True)
        last = parts[-1]
        if isinstance(node, list):
            node[_index(node, last, parts)] = value
        else:
            node[last] = value
    return raw


def _index(node: list, p: str, parts: list[str]) -> int:
    where = ".".join(parts[:-1]) if parts else ""
    if not p.isdigit():
        raise ConfigError(f"override --{'.'.join(parts)}: {where} is a list; expected an index, got {p!r}")
    i = int(p)
    if i >= len(node):
        raise ConfigError(f"override --{'.'.join(parts)}: {where} has {len(node)} entries (indices 0..{len(node) - 1})")
    return i


def _child(node, p: str, path: list[str], create: bool):
    if isinstance(node, list):
        return node[_index(node, p, path)]
    if not isinstance(node, dict):
        raise ConfigError(f"override --{'.'.join(path)}: {'.'.join(path[:-1])} is not a mapping")
    if node.get(p) is None and create:
        node[p] = {}
    return node[p]


# ------------------------------------------------------------------------------------------------ building


def _build(cls, data, where: str):
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        ann = hints[key]
        if ann in (DatasetEntry, Optional[DatasetEntry]) and value is not None:
            value = _build(DatasetEntry, value, f"{where}.{key}")
        elif ann == list[DatasetEntry]:
            if not isinstance(value, list):
                raise ConfigError(f"{where}.{key}={value!r} has type {type(value).__name__}; expected a list of "
                                  f"datasets ({{name, root, split, ...}})")
            value = [_build(DatasetEntry, e, f"{where}.{key}[{i}]") for i, e in enumerate(value)]
        elif not _type_ok(value, ann):
            raise ConfigError(f"{where}.{key}={value!r} has type {type(value).__name__}; expected {_fmt(ann)}")
        kwargs[key] = value
    missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in kwargs]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    return cls(**kwargs)


def _check_training_keys(keys, prefix: str = "training: ") -> None:
    names = {f.name for f in dataclasses.fields(_training_class()) if f.init}
    for k in keys:
        if k not in names:
            close = difflib.get_close_matches(k, sorted(names), n=3)
            hint = f"; did you mean {close}?" if close else " (see transformers.TrainingArguments)"
            raise ConfigError(f"{prefix}{k}: unknown training argument{hint}")


STAGE_KEYS = ("stage1_steps", "stage2_steps", "stage3_steps")


def build_training_arguments(data: dict, where: str = "training"):
    """`FisherTuneTrainingArguments` from the `training:` mapping: every text value typed by `HfArgumentParser`,
    every other value checked against its field type, the stage lengths required."""
    cls = _training_class()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    _check_training_keys(data, f"{where}.")
    hints = _hints(cls)
    values = {}
    for key, value in data.items():
        if isinstance(value, str):
            value = _coerce_training(key, value)
        elif not _type_ok(value, hints[key]):
            raise ConfigError(f"{where}.{key}={value!r} has type {type(value).__name__}; expected {_fmt(hints[key])}")
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


def load_config(path_or_dict, overrides: Optional[dict[str, Any]] = None, *, check_paths: bool = True,
                training: bool = True) -> ExperimentConfig:
    """Read a YAML file (or a dict), apply dotted `overrides`, type and validate every section.

    check_paths: also check that dataset roots hold their official layout and that the model checkpoint exists
    (False for inference, which reads no dataset of the config). training: build the training arguments (False for
    inference: `cfg.training` is then None and e.g. `bf16` on a CPU machine is not an error)."""
    if isinstance(path_or_dict, (str, os.PathLike)):
        if not os.path.isfile(path_or_dict):
            raise ConfigError(f"config file {str(path_or_dict)!r} does not exist")
        with open(path_or_dict) as f:
            try:
                raw = load_yaml(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path_or_dict}: not valid YAML: {e}") from None
        source = str(path_or_dict)
    else:
        raw, source = dict(path_or_dict), "<dict>"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with {', '.join(SECTIONS)}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {unknown}; allowed: {', '.join(SECTIONS)}")
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
    return cfg


# ------------------------------------------------------------------------------------------------ validation


def validate(cfg: ExperimentConfig, *, check_paths: bool = True) -> None:
    """Everything that can be checked without building a model or reading a dataset's files."""
    _validate_method(cfg)
    _validate_model(cfg.model, check_paths=check_paths)
    _validate_data(cfg.data, check_paths=check_paths)


def _validate_method(cfg: ExperimentConfig) -> None:
    m, t = cfg.method, cfg.training
    if m.name not in METHODS:
        raise ConfigError(f"method.name={m.name!r} is not allowed; expected one of {list(METHODS)}")
    if m.selection_update_steps < 1:
        raise ConfigError(f"method.selection_update_steps={m.selection_update_steps} must be >= 1")
    if m.lora_r < 1:
        raise ConfigError(f"method.lora_r={m.lora_r} must be >= 1")
    if m.fishertune:
        from ..tuner.config import FisherTuneConfig

        try:
            FisherTuneConfig(**{"target_modules": ["x"], **m.fishertune})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"method.fishertune: {e}") from None
    if m.rein:
        if m.name != "rein":
            raise ConfigError(f"method.rein is set but method.name={m.name!r}: it would do nothing; remove it")
        from ..rein import ReinConfig

        try:
            ReinConfig(**m.rein)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"method.rein: {e}") from None
    if m.name == "rein" and cfg.model.decoder == "mask2former" and m.rein.get("link_token_to_query", True):
        queries = (cfg.model.decoder_config or {}).get("num_queries")
        tokens = m.rein.get("token_length", 100)
        if queries != tokens:
            raise ConfigError(f"method.rein links its {tokens} tokens to Mask2Former's queries: set "
                              f"model.decoder_config.num_queries: {tokens} (now {queries!r}), or "
                              "method.rein.link_token_to_query: false")
        width, dims = (cfg.model.decoder_config or {}).get("hidden_dim", 256), m.rein.get("query_dims")
        if dims is not None and dims != width:
            raise ConfigError(f"method.rein.query_dims={dims} must equal the decoder's width "
                              f"model.decoder_config.hidden_dim={width} (leave query_dims out to follow the decoder)")
    if t is None:
        return
    for key, why in get_method(m.name).stage_requirements().items():
        if getattr(t, key) == 0:
            raise ConfigError(f"method.name={m.name!r} {why}: training.{key} must be > 0")


def _validate_model(m: ModelSection, *, check_paths: bool) -> None:
    from ..models import BACKBONES, DECODERS
    from ..models.backbones import CANDIDATE_KINDS

    if m.backbone not in BACKBONES:
        raise ConfigError(f"model.backbone={m.backbone!r} is not registered; expected one of {sorted(BACKBONES)}")
    if m.decoder not in DECODERS:
        raise ConfigError(f"model.decoder={m.decoder!r} is not allowed; expected one of {list(DECODERS)}")
    bad = [k for k in m.candidate_kinds if k not in CANDIDATE_KINDS]
    if bad or not m.candidate_kinds:
        raise ConfigError(f"model.candidate_kinds={m.candidate_kinds!r}: expected a non-empty list of {list(CANDIDATE_KINDS)}")
    for key in ("num_labels", "pyramid_channels"):
        if getattr(m, key) < 1:
            raise ConfigError(f"model.{key}={getattr(m, key)} must be >= 1")
    if m.model_name_or_path and m.tiny_backbone is not None:
        raise ConfigError("model: give model_name_or_path or tiny_backbone, not both")
    if not m.model_name_or_path and m.tiny_backbone is None:
        raise ConfigError("model: give model_name_or_path (a hub id or checkpoint directory) or tiny_backbone")
    if m.model_name_or_path and check_paths:
        check_model_source(m.backbone, m.model_name_or_path)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001 - an old huggingface_hub: read the variable
        return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def check_model_source(backbone: str, path: str, where: str = "model.model_name_or_path") -> None:
    """A local checkpoint directory must hold a model config of this backbone; a hub id must be reachable or
    cached (offline: say how to use a local copy)."""
    from ..models import get_backbone_class
    from ..standin import is_standin_ref, standin_preset

    if is_standin_ref(path):  # "standin:<preset>": a stand-in VFM pretrained here and cached (peft_fishertune.standin)
        if backbone != "dinov2":
            raise ConfigError(f"{where}={path!r} is a stand-in DINOv2, but model.backbone={backbone!r}; "
                              "use backbone: dinov2")
        try:
            standin_preset(path.split(":", 1)[1])
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        return
    cls = get_backbone_class(backbone)
    expanded = os.path.expanduser(path)
    if os.path.exists(expanded):
        if not os.path.isdir(expanded):
            raise ConfigError(f"{where}={path!r} is a file; expected a checkpoint directory (config.json + weights) "
                              f"or a hub id")
        cfg_file = os.path.join(expanded, "config.json")
        if not os.path.isfile(cfg_file):
            raise ConfigError(f"{where}={path!r} holds no config.json: not a model checkpoint directory "
                              f"(expected a folder written by save_pretrained or `huggingface-cli download <id> "
                              f"--local-dir <folder>`)")
        want = getattr(cls.config_class, "model_type", None)
        if want:
            try:
                with open(cfg_file) as f:
                    got = json.load(f).get("model_type")
            except (OSError, ValueError) as e:
                raise ConfigError(f"{where}={path!r}: cannot read config.json: {e}") from None
            if got is not None and got != want:
                raise ConfigError(f"{where}={path!r} holds a {got!r} model, but model.backbone={backbone!r} "
                                  f"expects model_type {want!r}")
        return
    looks_local = path.startswith(("/", "./", "../", "~")) or os.sep + os.sep in path or path.count("/") > 1
    if looks_local or not _HUB_ID.match(path):
        raise ConfigError(f"{where}={path!r} does not exist (neither a local checkpoint directory nor a hub id)")
    if backbone == "eva02" and "/" not in path:
        return  # a timm model name
    if _hub_offline():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "config.json")
        except Exception:  # noqa: BLE001
            cached = None
        if not isinstance(cached, str):
            raise ConfigError(
                f"{where}={path!r} is a hub id, but the hub is offline (HF_HUB_OFFLINE=1) and {path} is not in the "
                f"local cache. Download it once where there is network (`huggingface-cli download {path} "
                f"--local-dir /models/{path.split('/')[-1]}`), copy that folder here and set "
                f"--model.model_name_or_path /models/{path.split('/')[-1]}")


def _validate_data(d: DataSection, *, check_paths: bool) -> None:
    if d.train is None:
        raise ConfigError("data.train is required: {name, root, split}")
    if not d.eval:
        raise ConfigError("data.eval is empty: the run would train without evaluating anything. List at least one "
                          "target dataset ({name, root, split}); a DG run's result is its per-domain table")
    if d.eval_mode not in ("slide", "whole"):
        raise ConfigError(f"data.eval_mode={d.eval_mode!r} is not allowed; expected 'slide' or 'whole'")
    for key in ("crop_size", "base_scale", "test_scale", "window", "stride", "ratio_range"):
        v = getattr(d, key)
        if len(v) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in v):
            raise ConfigError(f"data.{key}={v!r}: expected two positive numbers")
    names: dict[str, int] = {}
    for i, e in enumerate(d.eval):
        if e.display in names:
            raise ConfigError(
                f"data.eval[{i}] and data.eval[{names[e.display]}] have the same display name {e.display!r}: their "
                f"results would share one column. Give each a distinct `label:` (e.g. label: {e.display}-2)")
        names[e.display] = i
        if e.max_images is not None and e.max_images < 1:
            raise ConfigError(f"data.eval[{i}].max_images={e.max_images} must be >= 1")
    entries = [("data.train", d.train)] + [(f"data.eval[{i}]", e) for i, e in enumerate(d.eval)]
    synthetic_root = (d.synthetic or {}).get("root")
    if d.synthetic is not None and not synthetic_root:
        raise ConfigError("data.synthetic needs a root (where the synthetic domains are written)")
    for where, entry in entries:
        spec = _validate_entry(where, entry)
        generated = synthetic_root and os.path.abspath(entry.root).startswith(os.path.abspath(synthetic_root))
        if check_paths and not generated:
            _check_layout(where, entry, spec)


def _validate_entry(where: str, e: DatasetEntry):
    from ..data import get_spec, list_datasets

    if e.name not in list_datasets():
        raise ConfigError(f"{where}.name={e.name!r} is not a registered dataset; expected one of {list_datasets()}")
    spec = get_spec(e.name)
    if e.split not in spec.splits:
        raise ConfigError(f"{where}.split={e.split!r} is not a split of {e.name}; expected one of {list(spec.splits)}")
    if e.condition is not None:
        if not spec.conditions:
            raise ConfigError(f"{where}.condition={e.condition!r}: {e.name} has no conditions")
        if e.condition not in spec.conditions:
            raise ConfigError(f"{where}.condition={e.condition!r} is not a condition of {e.name}; expected one of "
                              f"{list(spec.conditions)}")
    for key, allowed in (("on_fault", ON_FAULT), ("verify", VERIFY), ("unknown_label", UNKNOWN_LABEL)):
        if getattr(e, key) not in allowed:
            raise ConfigError(f"{where}.{key}={getattr(e, key)!r} is not allowed; expected one of {list(allowed)}")
    if e.size_mismatch is not None and e.size_mismatch not in SIZE_MISMATCH:
        raise ConfigError(f"{where}.size_mismatch={e.size_mismatch!r} is not allowed; expected one of "
                          f"{list(SIZE_MISMATCH)} or null (the dataset's default)")
    return spec


def _check_layout(where: str, e: DatasetEntry, spec) -> None:
    """The root exists and holds the official layout (one directory walk; files are not opened)."""
    from pathlib import Path

    from ..data import DatasetFileError, DatasetLayoutError

    if not os.path.isdir(e.root):
        raise ConfigError(f"{where}.root={e.root!r} does not exist (dataset {e.name!r})")
    try:
        pairs = spec.find_pairs(Path(e.root).expanduser(), e.split, e.condition)
    except DatasetLayoutError as err:
        raise ConfigError(f"{where}: {err}") from None
    except DatasetFileError as err:
        raise ConfigError(f"{where}: {err}") from None
    if not pairs:
        raise ConfigError(f"{where}: {e.name} ({e.split}) under {e.root!r} holds no images")


def describe_sections(width: int = 100) -> str:
    """Every key of the model / data / method sections and of a dataset entry, with its type, default and help;
    then the training fields FisherTune adds or whose default it changes (for `scripts/train.py --help`)."""
    import textwrap

    def rows(cls, prefix: str, only=None) -> list[str]:
        out, hints = [], _hints(cls)
        for f in dataclasses.fields(cls):
            if only is not None and f.name not in only:
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default.value if isinstance(f.default, enum.Enum) else f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "(required)"
            head = f"  --{prefix}{f.name} ({_fmt(hints[f.name])}, default {default!r})"
            out.append(head)
            if f.metadata.get("help"):
                out += textwrap.wrap(f.metadata["help"], width, initial_indent=" " * 6, subsequent_indent=" " * 6)
        return out

    own = set(_training_class().__annotations__)  # declared (or re-declared) by FisherTuneTrainingArguments
    lines = ["config sections (YAML keys; override any with --<section>.<key> VALUE):", ""]
    lines += ["model:"] + rows(ModelSection, "model.") + [""]
    lines += ["data:"] + rows(DataSection, "data.") + [""]
    lines += ["a dataset entry (data.train, data.eval.<i>):"] + rows(DatasetEntry, "data.train.") + [""]
    lines += ["method:"] + rows(MethodSection, "method.") + ["  --method.fishertune.<field>: any FisherTuneConfig field", ""]
    lines += ["training: every transformers.TrainingArguments field, plus (or with FisherTune's default):"]
    lines += rows(_training_class(), "training.", only=own)
    lines += ["  (stage1_steps, stage2_steps and stage3_steps must be written in the config: a forgotten one would",
              "  silently start a run of the paper's length)"]
    return "\n".join(lines)
