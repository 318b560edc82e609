"""Which parameters get weight decay: decided by the module that owns a parameter, never by its name.

A >= 2-D parameter of a Linear / Bilinear / Conv* / ConvTranspose* / MultiheadAttention (weight matrices, kernels)
decays. Everything else does not: biases, norms, `nn.Embedding` tables (Mask2Former queries), position tables,
CLS / register / mask tokens, LayerScale, and 1-D values such as FisherTune's sparse deltas.

`SegmentationModel.param_groups` / `no_weight_decay` and the stand-in VFM pretraining both use this rule.
"""

from __future__ import annotations

from torch import nn

#: module types whose >= 2-D parameters (weight matrices / kernels) get weight decay
DECAY_OWNER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.MultiheadAttention,
)


def parameter_owners(module: nn.Module) -> dict[int, nn.Module]:
    """{id(parameter): the submodule that holds it directly}, over every parameter of `module`."""
    owners = {}
    for m in module.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = m
    return owners


def decays(param: nn.Parameter, owner: nn.Module) -> bool:
    """True when `param`, held directly by `owner`, gets weight decay."""
    return isinstance(owner, DECAY_OWNER_TYPES) and param.ndim >= 2


def split_by_decay(module: nn.Module, *, trainable_only: bool = False) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decay, no_decay): every parameter of `module` once, in module order."""
    owners = parameter_owners(module)
    decay, no_decay = [], []
    for p in module.parameters():
        if trainable_only and not p.requires_grad:
            continue
        (decay if decays(p, owners[id(p)]) else no_decay).append(p)
    return decay, no_decay


__all__ = ["DECAY_OWNER_TYPES", "decays", "parameter_owners", "split_by_decay"]
