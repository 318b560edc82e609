"""What a wrapped segmentation model trains: the segmentor inside a PEFT wrapper, and the backbone parameters a
PEFT baseline left trainable when it was built (recorded then, turned on when the backbone starts training).

A leaf of training/: the method table (methods.py) and the PEFT baselines (baselines.py) both read it.
"""

from __future__ import annotations

from torch import nn

from .config.errors import ConfigError


def segmentor_of(model: nn.Module) -> nn.Module:
    """The `SegmentationModel` inside a PEFT wrapper (or the model itself)."""
    base = getattr(model, "base_model", None)
    inner = getattr(base, "model", None)
    return inner if isinstance(inner, nn.Module) else model


def record_trainable(model: nn.Module) -> nn.Module:
    """Remember which backbone parameters PEFT left trainable (the trainer freezes the backbone for stage 1 and
    turns exactly these on when the backbone starts)."""
    names = tuple(n for n, p in segmentor_of(model).backbone.named_parameters() if p.requires_grad)
    if not names:
        raise ConfigError("the PEFT config trains nothing in the backbone (no trainable parameter under "
                          "backbone.): check its target_modules")
    model._baseline_trainable = names
    return model


def wrapped_trainable(model: nn.Module) -> list[nn.Parameter]:
    """The backbone parameters PEFT left trainable when the model was wrapped (see `record_trainable`)."""
    names = getattr(model, "_baseline_trainable", None)
    if names is None:
        raise RuntimeError("this model was not wrapped by a PEFT baseline row (no recorded trainable parameters)")
    wanted = set(names)
    return [p for n, p in segmentor_of(model).backbone.named_parameters() if n in wanted]
