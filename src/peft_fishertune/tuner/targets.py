"""Default `target_modules` per architecture (as PEFT's LoRA table, `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).

`FisherTuneConfig(target_modules=None)` (the default) is filled in when the adapter is created, from the model:

- our `SegmentationModel` (any object with `fisher_target_modules()`): every nn.Linear of its backbone's blocks;
- a transformers model: `TARGET_MODULES[model.config.model_type]`, the nn.Linear layers of the transformer blocks
  (attention q/k/v/out and the MLP), never heads, poolers, patch embeddings or projections between towers;
- timm's EVA02 behind transformers' `TimmWrapperModel` (`model_type="timm_wrapper"`, `architecture="eva02_..."`).

A list is matched as PEFT does (a module name equal to, or ending in ".", an entry); a string is a regex matched
against the full module name. The names were read from transformers 5.23 models built from tiny configs
(tests/test_defaults.py builds each and checks exactly these layers are wrapped). EVA02 follows timm's naming
(`blocks.N.attn.qkv|q_proj|k_proj|v_proj|proj`, `blocks.N.mlp.fc1|fc1_g|fc1_x|fc2`); timm is not installed here,
so that entry is tested on a module tree with timm's names only.
"""

from __future__ import annotations

from typing import Optional, Union

from torch import nn

_VIT = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
_CLIP = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# SigLIP's vision tower ends in a pooling head (nn.MultiheadAttention + MLP): only the encoder layers
_SIGLIP = r".*encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"
# SAM: the ViT image encoder only (not the prompt encoder or the mask decoder)
_SAM = r"(.*\.)?vision_encoder\.layers\.\d+\.(attn\.(qkv|proj)|mlp\.(lin1|lin2))"
_BERT = (r"(.*\.)?encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
         r"|intermediate\.dense|output\.dense)")
# Mask2Former: its backbone (Swin, or a DINOv2 backbone) only; not the pixel decoder or the transformer decoder
_MASK2FORMER = r".*pixel_level_module\.encoder\..*\.(q_proj|k_proj|v_proj|o_proj|fc1|fc2)"
_EVA02 = r"(.*\.)?blocks\.\d+\.(attn\.(qkv|q_proj|k_proj|v_proj|proj)|mlp\.(fc1|fc1_g|fc1_x|fc2))"

TARGET_MODULES: dict[str, Union[list[str], str]] = {
    "vit": _VIT,
    "dinov2": _VIT,
    "dinov2_with_registers": _VIT,
    "dinov3_vit": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "clip": _CLIP,
    "clip_vision_model": _CLIP,
    "siglip": _SIGLIP,
    "siglip_vision_model": _SIGLIP,
    "sam": _SAM,
    "sam_vision_model": _SAM,
    "eva02": _EVA02,
    "bert": _BERT,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "mask2former": _MASK2FORMER,
}


def _model_type(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type == "timm_wrapper":
        arch = str(getattr(config, "architecture", "") or "")
        if arch.startswith("eva02"):
            return "eva02"
    return model_type


def default_target_modules(model: nn.Module) -> Union[list[str], str]:
    """The default `target_modules` of `model` (see the module docstring); a ValueError naming the model type and
    its Linear layer names when there is none."""
    own = getattr(model, "fisher_target_modules", None)
    if callable(own):
        return list(own())
    model_type = _model_type(model)
    if model_type in TARGET_MODULES:
        found = TARGET_MODULES[model_type]
        return list(found) if isinstance(found, list) else found
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    raise ValueError(
        f"FisherTuneConfig.target_modules=None: no default for model_type {model_type!r} "
        f"({type(model).__name__}); defaults exist for {sorted(TARGET_MODULES)} and for models with "
        f"fisher_target_modules(). Give target_modules, e.g. from this model's Linear layer names {names[:12]} "
        "(e.g. ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'fc1', 'fc2']), or a regex"
    )
