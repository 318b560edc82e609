"""Reading config files: YAML 1.2 scalars, `_base_` inheritance and the key-by-key merge that both inheritance and
mapping-valued overrides use.

    # configs/my_run.yaml
    _base_: fishertune_dinov2-l_mask2former_gta2citybddmap_512x512_bs4.yaml   # or a list; relative to this file
    training: {output_dir: outputs/my_run, backbone_lr: 2.0e-5}                 # merged into the base's training

Merging (`merge`): mappings merge key by key, recursively; a list or a scalar replaces what was there; the
including file wins over its bases, a later base over an earlier one. `_delete_: true` inside a mapping replaces
the base's mapping instead of merging into it (mmseg's convention), and `key: null` sets the key to null.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any

import yaml

from .sections import ConfigError

BASE_KEY = "_base_"
DELETE_KEY = "_delete_"


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


def merge(base: Any, update: Any) -> Any:
    """`update` merged into a copy of `base`: mappings key by key (recursively), anything else replaced. A mapping
    of `update` holding `_delete_: true` replaces `base`'s mapping instead."""
    if not isinstance(update, dict):
        return copy.deepcopy(update)
    if update.get(DELETE_KEY) is True or not isinstance(base, dict):
        return {k: merge(None, v) for k, v in update.items() if k != DELETE_KEY}
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key == DELETE_KEY:
            continue
        out[key] = merge(out.get(key), value)
    return out


def strip_delete_marks(value: Any) -> Any:
    """`value` without `_delete_` keys (left where there was nothing to delete, e.g. in a file without a base)."""
    if isinstance(value, dict):
        return {k: strip_delete_marks(v) for k, v in value.items() if k != DELETE_KEY}
    if isinstance(value, list):
        return [strip_delete_marks(v) for v in value]
    return value


def read_config_file(path: str | os.PathLike, _chain: tuple[str, ...] = ()) -> dict:
    """The mapping of one config file with its `_base_` files merged in (bases first, in order, then the file)."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if path in _chain:
        loop = " -> ".join(os.path.relpath(p) for p in (*_chain[_chain.index(path):], path))
        raise ConfigError(f"config inheritance loops: {loop} (a file cannot be its own _base_)")
    if not os.path.isfile(path):
        if _chain:
            raise ConfigError(f"{os.path.relpath(_chain[-1])}: _base_ file {os.path.relpath(path)!r} does not exist "
                              f"(a _base_ path is relative to the file that names it)")
        raise ConfigError(f"config file {os.path.relpath(path)!r} does not exist")
    with open(path) as f:
        try:
            raw = load_yaml(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {os.path.relpath(path)}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{os.path.relpath(path)}: the top level must be a mapping of config sections")
    return resolve_bases(raw, os.path.dirname(path), (*_chain, path))


def resolve_bases(raw: dict, folder: str, chain: tuple[str, ...] = ()) -> dict:
    """`raw` (a config mapping read from a file in `folder`) with its `_base_` files merged under it."""
    bases = raw.get(BASE_KEY)
    own = {k: v for k, v in raw.items() if k != BASE_KEY}
    if bases is None:
        return own
    if isinstance(bases, str):
        bases = [bases]
    where = os.path.relpath(chain[-1]) if chain else "config"
    if not isinstance(bases, list) or not bases or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{where}: _base_={bases!r}: expected a file name or a list of file names")
    merged: dict = {}
    for base in bases:
        merged = merge(merged, read_config_file(os.path.join(folder, os.path.expanduser(base)), chain))
    return merge(merged, own)


def read_configs(paths) -> tuple[dict, str]:
    """One mapping from one or several config files (each later file merged over the earlier ones, as if it named
    them in `_base_`), and the source string naming them."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [str(p) for p in paths]
    if not paths:
        raise ConfigError("no config file given")
    raw: dict = {}
    for p in paths:
        raw = merge(raw, read_config_file(p))
    return strip_delete_marks(raw), " + ".join(paths)
