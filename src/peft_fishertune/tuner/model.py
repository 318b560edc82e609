"""`FisherTuneModel`: the PEFT tuner that wraps targeted layers in FisherTune layers."""

from __future__ import annotations

import zlib

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from . import storage
from .config import FisherTuneConfig
from .layer import LAYER_TYPES, FisherTuneLayer


class FisherTuneModel(BaseTuner):
    """Element-wise sparse fine-tuning of a model's own weights (FisherTune, CVPR 2025).

    Created by `peft.get_peft_model(model, FisherTuneConfig(...))`. The adapter starts with no selected elements
    (`init_selection="none"`): select them with `peft_fishertune.select_parameters(model, scores)` from Fisher scores,
    then grow the active set with `set_active_fraction`.
    """

    prefix: str = "ft_"
    tuner_layer_cls = FisherTuneLayer
    target_module_mapping: dict = {}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs):
        if current_key is None:
            raise ValueError("FisherTuneModel: current_key must not be None")
        if isinstance(target, FisherTuneLayer):
            target.update_layer(adapter_name, config)
            return
        new_module = self._create_new_module(config, adapter_name, target, current_key=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config, adapter_name, target, current_key=""):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        for base_type, layer_cls in LAYER_TYPES.items():
            if type(base) is base_type or isinstance(base, base_type):
                return layer_cls(target, adapter_name, config, current_key=current_key)
        supported = ", ".join(t.__name__ for t in LAYER_TYPES)
        raise ValueError(
            f"FisherTuneConfig.target_modules matched {current_key!r} of type {type(base).__name__}; "
            f"FisherTune wraps only {supported}. Narrow target_modules or exclude it with exclude_modules."
        )

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # Our layers place their tensors on the base weight's device themselves; BaseTuner's version assumes the
        # new module has a `.weight` when it has no `base_layer`, which breaks for modules_to_save containers
        # (e.g. a decoder) when unloading.
        setattr(parent, child_name, new_module)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        config = self.peft_config[adapter_name]
        if config.init_selection != "none" and not _on_meta(model, adapter_name):
            _initial_selection(self, config, adapter_name)

    # ----------------------------------------------------------- saving
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for name, module in model.named_modules():
            if not isinstance(module, FisherTuneLayer) or adapter_name not in module.ft_values:
                continue
            name = name.removeprefix("_fsdp_wrapped_module.")
            for attr in ("ft_values", "ft_indices", "ft_rank", "ft_threshold"):
                to_return.pop(f"{name}.{attr}.{adapter_name}", None)
            encoded = storage.encode_layer(
                module.active_indices(adapter_name), module.active_values(adapter_name),
                module.weight_shape, config.encoding,
            )
            for suffix, tensor in encoded.items():
                to_return[f"{name}.{suffix}.{adapter_name}"] = tensor
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state_dict = dict(state_dict)
        peft_prefix = "base_model.model."
        layers = {n: m for n, m in model.named_modules() if isinstance(m, FisherTuneLayer) and adapter_name in m.ft_values}
        for name, module in layers.items():
            keys = {s: k for s in storage.SUFFIXES for k in (f"{name}.{s}", f"{peft_prefix}{name}.{s}") if k in state_dict}
            if not keys:
                raise storage.AdapterFileError(
                    f"adapter file: no tensors for {name} (expected {name}.ft_shape, .ft_values, .ft_index|.ft_mask); "
                    "the file was saved with other target_modules"
                )
            tensors = {s: state_dict.pop(k) for s, k in keys.items()}
            flat, values = storage.decode_layer(name, tensors, module.weight_shape)
            module.resize_adapter(adapter_name, flat.numel(), value_dtype=values.dtype)
            model_prefix = f"{name}."
            state_dict[f"{model_prefix}ft_indices.{adapter_name}"] = flat.to(module.ft_indices[adapter_name].dtype)
            # a loaded selection is fixed: the file holds the active elements only, not the ranked candidate list
            state_dict[f"{model_prefix}ft_rank.{adapter_name}"] = torch.full_like(flat, -1).to(module.ft_rank[adapter_name].dtype)
            state_dict[f"{model_prefix}ft_threshold.{adapter_name}"] = torch.tensor(0, dtype=torch.int64)  # -1 < 0: all active
            state_dict[f"{model_prefix}ft_values.{adapter_name}"] = values
        leftovers = [k for k in state_dict if k.rsplit(".", 1)[-1] in storage.SUFFIXES]
        if leftovers:
            raise storage.AdapterFileError(
                f"adapter file: tensors {leftovers[:5]} belong to modules this model does not target with FisherTune"
            )
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


def _on_meta(model: nn.Module, adapter_name: str) -> bool:
    """True when the adapter was created empty on the meta device (low_cpu_mem_usage loading): the file decides."""
    meta = torch.device("meta")
    for module in model.modules():
        if isinstance(module, FisherTuneLayer) and adapter_name in module.ft_values:
            return module.ft_values[adapter_name].device == meta or module.get_base_layer().weight.device == meta
    return False


def layer_seed(seed: int, key: str) -> int:
    """A per-layer seed, so same-shaped layers get different random masks (unlike SHiRA)."""
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1)


def _initial_selection(tuner: FisherTuneModel, config: FisherTuneConfig, adapter_name: str) -> None:
    from .selection import select_parameters, target_parameters

    scores = {}
    for name, weight in target_parameters(tuner, adapter_name=adapter_name):
        if config.init_selection == "magnitude":
            scores[name] = weight.detach().abs().float()
        else:
            gen = torch.Generator().manual_seed(layer_seed(config.seed, name))
            scores[name] = torch.rand(weight.shape, generator=gen)
    select_parameters(tuner, scores, scope=config.scope, adapter_name=adapter_name)
    if not config.init_weights:
        for module in tuner.model.modules():
            if isinstance(module, FisherTuneLayer) and adapter_name in module.ft_values:
                gen = torch.Generator().manual_seed(layer_seed(config.seed + 1, module.ft_key))
                vals, mask = module.ft_values[adapter_name], module.ft_rank[adapter_name] < module.ft_threshold[adapter_name]
                with torch.no_grad():  # active elements only: inactive candidates must stay exactly zero
                    noise = 0.1 * torch.randn(vals.shape, generator=gen).to(vals.dtype)
                    vals.copy_(torch.where(mask, noise, torch.zeros_like(noise)))
