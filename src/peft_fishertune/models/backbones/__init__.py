"""Backbone registry: one small file per model family.

Adding a backbone = writing one file here that defines a `BackboneAdapter`
subclass decorated with `@register_backbone("<name>")` (see `base.py`). Every
module of this package is imported below, so the file is all it takes; the
imports are explicit at package import, not scattered side effects.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import BACKBONES, CANDIDATE_KINDS, BackboneAdapter, default_out_indices, register_backbone

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")


def get_backbone_class(name: str) -> type[BackboneAdapter]:
    if name not in BACKBONES:
        raise ValueError(f"backbone={name!r} is not registered; expected one of {sorted(BACKBONES)}")
    return BACKBONES[name]


def build_backbone(
    name: str,
    model_name_or_path: str | None = None,
    config=None,
    out_indices=None,
    prune: bool = True,
    **pretrained_kwargs,
) -> BackboneAdapter:
    """A backbone adapter from a hub id / local directory (`model_name_or_path`) or a config object."""
    cls = get_backbone_class(name)
    if (model_name_or_path is None) == (config is None):
        raise ValueError(
            f"build_backbone({name!r}): give exactly one of model_name_or_path (hub id or local dir) or config; "
            f"got model_name_or_path={model_name_or_path!r}, config={type(config).__name__ if config is not None else None}"
        )
    if config is not None:
        if pretrained_kwargs:
            raise ValueError(f"build_backbone: {sorted(pretrained_kwargs)} apply to from_pretrained only, not to a config")
        return cls.from_config(config, out_indices=out_indices, prune=prune)
    return cls.from_pretrained(model_name_or_path, out_indices=out_indices, prune=prune, **pretrained_kwargs)


__all__ = [
    "BACKBONES",
    "CANDIDATE_KINDS",
    "BackboneAdapter",
    "build_backbone",
    "default_out_indices",
    "get_backbone_class",
    "register_backbone",
]
