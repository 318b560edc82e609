"""Which modules Rein wraps, read from the model's structure.

With `ReinConfig.target_modules=None`, the model holds one `BackboneAdapter` (peft_fishertune.models): its
`blocks` list gives the blocks and their order, `embed_dim` the width, `patch_size` the token-init bound, and
`rein_num_prefix_tokens` how many leading tokens (CLS, registers) are not patch tokens. No module names are matched.
Without a backbone adapter, a plain transformers vision backbone (`TRANSFORMERS_BACKBONES`: Dinov2Model ± registers,
DINOv3ViTModel, ViTModel, CLIPVisionModel, SiglipVisionModel, SamVisionModel, or a model wrapping one, e.g.
Dinov2ForImageClassification) gives them from its config: the `layer` / `layers` ModuleList of `num_hidden_layers`
blocks, `hidden_size`, `patch_size`, and the prefix (CLS + register tokens) of its model type.
With explicit `target_modules`, the matched modules are the blocks, in `named_modules()` order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch import nn


@dataclass(frozen=True)
class BlockInfo:
    index: int  # position in the block list (0 = first block)
    dim: int
    num_prefix: int
    patch_size: Optional[int]


def rein_num_prefix_tokens(adapter) -> int:
    """Leading non-patch tokens of `adapter`'s block outputs (they pass through Rein unchanged).

    DINOv2 (± registers) / DINOv3: CLS + registers; CLIP: CLS; SAM: none (its blocks output (B, h, w, C) grids);
    EVA02 (timm): timm's own `num_prefix_tokens`.
    """
    from ..models.backbones.clip import ClipBackbone
    from ..models.backbones.dinov2 import Dinov2Backbone
    from ..models.backbones.dinov3 import Dinov3Backbone
    from ..models.backbones.eva02 import Eva02Backbone
    from ..models.backbones.sam import SamBackbone

    if isinstance(adapter, Dinov2Backbone):
        return adapter.num_prefix_tokens
    if isinstance(adapter, Dinov3Backbone):
        return 1 + adapter.model.config.num_register_tokens
    if isinstance(adapter, ClipBackbone):
        return 1
    if isinstance(adapter, SamBackbone):
        return 0
    if isinstance(adapter, Eva02Backbone):
        return int(adapter.model.num_prefix_tokens)
    raise ValueError(
        f"Rein does not know the token layout of backbone {type(adapter).__name__!r}: give ReinConfig.target_modules "
        "(its blocks) and ReinConfig.num_prefix_tokens, or add the backbone to rein.blocks.rein_num_prefix_tokens"
    )


# model_type -> leading non-patch tokens of its blocks' outputs (CLS + registers; SAM's blocks output grids)
TRANSFORMERS_BACKBONES = {
    "dinov2": lambda c: 1,
    "dinov2_with_registers": lambda c: 1 + int(getattr(c, "num_register_tokens", 0)),
    "dinov3_vit": lambda c: 1 + int(getattr(c, "num_register_tokens", 0)),
    "vit": lambda c: 1,
    "clip_vision_model": lambda c: 1,
    "siglip_vision_model": lambda c: 0,
    "sam_vision_model": lambda c: 0,
}


def _transformers_blocks(named: list[tuple[str, nn.Module]], num_prefix: Optional[int]) -> Optional[dict]:
    """The blocks of a plain transformers vision backbone (see the module docstring), or None if there is none."""
    holders = [(n, m) for n, m in named
               if getattr(getattr(m, "config", None), "model_type", None) in TRANSFORMERS_BACKBONES]
    if not holders:
        return None
    root, holder = holders[0]  # the outermost (e.g. Dinov2ForImageClassification around its Dinov2Model)
    config = holder.config
    depth = int(config.num_hidden_layers)
    lists = [(n, m) for n, m in named if isinstance(m, nn.ModuleList) and len(m) == depth
             and n.rsplit(".", 1)[-1] in ("layer", "layers") and (not root or n.startswith(root + "."))]
    if len(lists) != 1:
        raise ValueError(
            f"ReinConfig.target_modules=None on a {config.model_type!r} model: expected one `layer`/`layers` list of "
            f"{depth} blocks, found {[n for n, _ in lists]}; give target_modules (its blocks) and num_prefix_tokens"
        )
    name, blocks = lists[0]
    patch = config.patch_size if isinstance(config.patch_size, int) else int(config.patch_size[0])
    prefix = num_prefix if num_prefix is not None else TRANSFORMERS_BACKBONES[config.model_type](config)
    return {f"{name}.{i}": BlockInfo(i, int(config.hidden_size), int(prefix), int(patch)) for i in range(len(blocks))}


def _under_tuner_layer(names_of_tuner_layers: list[str], key: str) -> bool:
    return any(key.startswith(n + ".") for n in names_of_tuner_layers)


def resolve_blocks(model: nn.Module, config) -> dict[str, BlockInfo]:
    """{full module name: BlockInfo} of the blocks to wrap, in forward order."""
    from ..models.backbones.base import BackboneAdapter

    named = list(model.named_modules())
    tuner_layers = [n for n, m in named if isinstance(m, BaseTunerLayer)]
    if config.target_modules is None:
        if config.exclude_modules:
            raise ValueError(
                "ReinConfig.exclude_modules needs explicit target_modules: with target_modules=None Rein wraps every "
                "block of the backbone adapter"
            )
        adapters = [(n, m) for n, m in named if isinstance(m, BackboneAdapter)]
        if not adapters:
            found = _transformers_blocks(named, config.num_prefix_tokens)
            if found is not None:
                return found
        if len(adapters) != 1:
            raise ValueError(
                f"ReinConfig.target_modules=None takes the blocks from the model's backbone adapter "
                f"(peft_fishertune.models.BackboneAdapter) or a transformers vision backbone (model types "
                f"{sorted(TRANSFORMERS_BACKBONES)}), but the model holds {len(adapters)} adapters "
                f"({[n for n, _ in adapters]}) and no such backbone; give target_modules (the blocks, e.g. "
                "'encoder.layer.0', ... or a regex like r'.*encoder\\.layers?\\.\\d+') and num_prefix_tokens instead"
            )
        _, adapter = adapters[0]
        names = {id(m): n for n, m in named}
        prefix = config.num_prefix_tokens if config.num_prefix_tokens is not None else rein_num_prefix_tokens(adapter)
        return {
            names[id(block)]: BlockInfo(i, int(adapter.embed_dim), int(prefix), int(adapter.patch_size))
            for i, block in enumerate(adapter.blocks)
        }
    out: dict[str, BlockInfo] = {}
    for key, module in named:
        if not key or _under_tuner_layer(tuner_layers, key):
            continue
        hit = check_target_module_exists(config, key)
        if not hit or type(hit).__name__ == "_ExcludedModule":
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        norms = [m for m in base.modules() if isinstance(m, nn.LayerNorm)]
        if not norms:
            raise ValueError(
                f"Rein: target module {key!r} ({type(base).__name__}) has no LayerNorm to read its width from; "
                "is it a transformer block?"
            )
        out[key] = BlockInfo(len(out), int(norms[0].normalized_shape[-1]), int(config.num_prefix_tokens), None)
    if not out:
        raise ValueError(f"ReinConfig.target_modules={config.target_modules!r} matched no module of the model")
    return out
