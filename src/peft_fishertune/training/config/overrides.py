"""Command-line overrides `--<section>.<key> VALUE`, each typed by the field it sets, never guessed from the text:

    --training.backbone_lr 1e-5          a float (the field is a float)
    --training.save_strategy no          a save strategy (the string "no", not YAML's False)
    --data.eval.0.root /data/cityscapes  changes one evaluation entry (index into the list)
    --method.fishertune.delta_max 0.1    typed by FisherTuneConfig.delta_max
    --data.crop_size [256,256]           lists replace the file's list (YAML / JSON text)
    --model.decoder_config '{"hidden_dim": 64}'   mappings are MERGED key by key into the file's mapping

The `training` keys are typed by transformers' `HfArgumentParser` (the parser of `TrainingArguments`), the other
sections by their dataclass field types.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Any, Literal, Union

import yaml

from .sections import SECTION_CLASSES, SECTIONS, ConfigError, fmt, hints, training_class, type_ok
from .yaml_io import load_yaml, merge


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
    other values are set as given. A numeric part indexes a list (`data.eval.0.root`). A mapping value is merged
    key by key into the mapping already there (`yaml_io.merge`); anything else replaces it."""
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
                check_training_keys([parts[1]], "override --training.")
                value = coerce_training(parts[1], value)
            else:
                value = _coerce(value, _field_type(parts, dotted), dotted)
        node = raw
        for depth, p in enumerate(parts[:-1]):
            node = _child(node, p, parts[:depth + 1], create=True)
        last = parts[-1]
        if isinstance(node, list):
            i = _index(node, last, parts)
            node[i] = merge(node[i], value)
        else:
            node[last] = merge(node.get(last), value)
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


# ------------------------------------------------------------------------------------------------ typing


def parse_yaml_value(raw: str, where: str):
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
        return parse_yaml_value(raw, where)
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
    return parse_yaml_value(raw, where)  # lists, mappings, dataset entries, Any


def _field_type(parts: list[str], where: str):
    """The annotation of the field a dotted override path sets (Any below free-form mappings);
    `method.fishertune.<key>` is typed by `FisherTuneConfig.<key>`."""
    from ...tuner.config import FisherTuneConfig

    ann: Any = SECTION_CLASSES[parts[0]]
    for i, p in enumerate(parts[1:], start=1):
        if typing.get_origin(ann) in (Union, types.UnionType):
            rest = [a for a in typing.get_args(ann) if a is not type(None)]
            ann = rest[0] if len(rest) == 1 else Any
        if dataclasses.is_dataclass(ann):
            types_ = hints(ann)
            if p not in types_:
                raise ConfigError(f"override --{where}: {'.'.join(parts[:i])} has no key {p!r}; "
                                  f"allowed: {sorted(types_)}")
            ann = FisherTuneConfig if parts[:i + 1] == ["method", "fishertune"] else types_[p]
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

    return HfArgumentParser(training_class(), exit_on_error=False)


def coerce_training(key: str, raw: str):
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
        raise ConfigError(f"training.{key}={raw!r}: expected {what or fmt(hints(training_class())[key])}") from None
    value = getattr(ns, key)
    ann = hints(training_class())[key]
    if isinstance(value, str) and value.lstrip().startswith(("{", "[")) and (type_ok({}, ann) or type_ok([], ann)):
        value = parse_yaml_value(value, f"training.{key}")  # dict / list fields given as JSON
    return value


def check_training_keys(keys, prefix: str = "training: ") -> None:
    names = {f.name for f in dataclasses.fields(training_class()) if f.init}
    for k in keys:
        if k not in names:
            close = difflib.get_close_matches(k, sorted(names), n=3)
            hint = f"; did you mean {close}?" if close else " (see transformers.TrainingArguments)"
            raise ConfigError(f"{prefix}{k}: unknown training argument{hint}")
