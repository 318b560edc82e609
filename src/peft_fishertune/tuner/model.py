"""`FisherTuneModel`: the PEFT tuner that wraps targeted layers in FisherTune layers."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from . import fingerprint, storage
from .config import FisherTuneConfig
from .layer import LAYER_TYPES, FisherTuneLayer
from .selection import layer_seed, magnitude_scores, random_scores, select_parameters
from .targets import default_target_modules

__all__ = ["FisherTuneModel", "layer_seed"]

_STATE_ATTRS = FisherTuneLayer.adapter_layer_names + FisherTuneLayer.other_param_names


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
        if isinstance(parent, nn.MultiheadAttention):
            # F.multi_head_attention_forward reads out_proj.weight itself: a wrapper would never be called
            raise ValueError(
                f"FisherTuneConfig.target_modules matched {current_key!r}, the {target_name} of an "
                "nn.MultiheadAttention, which reads its weight directly (the layer is never called), so a FisherTune "
                "delta there would have no effect. Exclude it with exclude_modules."
            )
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        shared = [n for n in self._ft_weight_owners().get(id(getattr(base, "weight", None)), []) if n != current_key]
        if shared:
            raise ValueError(
                f"FisherTuneConfig.target_modules matched {current_key!r}, whose weight is shared with {shared} (tied "
                "weights): those modules read it directly, so the delta would act in one place only and merging would "
                "change both. Exclude it with exclude_modules (or untie the weights)."
            )
        new_module = self._create_new_module(config, adapter_name, target, current_key=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _ft_weight_owners(self) -> dict[int, list[str]]:
        """id(parameter) -> the names of the modules that hold it (more than one: tied weights)."""
        if getattr(self, "_ft_owner_cache", None) is not None:
            return self._ft_owner_cache
        owners: dict[int, list[str]] = {}
        for name, module in self.model.named_modules(remove_duplicate=False):
            if isinstance(module, FisherTuneLayer):
                continue
            w = module._parameters.get("weight")
            name = name.replace(".base_layer", "")
            if w is not None and name not in owners.get(id(w), []):
                owners.setdefault(id(w), []).append(name)
        self._ft_owner_cache = owners
        return owners

    @staticmethod
    def _create_new_module(config, adapter_name, target, current_key=""):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        for base_type, layer_cls in LAYER_TYPES.items():
            if type(base) is base_type or isinstance(base, base_type):
                if type(base).forward is not base_type.forward:
                    raise ValueError(
                        f"FisherTuneConfig.target_modules matched {current_key!r} of type {type(base).__name__}, a "
                        f"subclass of {base_type.__name__} with its own forward; FisherTune would compute "
                        f"{base_type.__name__}'s op instead. Exclude it with exclude_modules."
                    )
                return layer_cls(target, adapter_name, config, current_key=current_key)
        supported = ", ".join(t.__name__ for t in LAYER_TYPES)
        raise ValueError(
            f"FisherTuneConfig.target_modules matched {current_key!r} of type {type(base).__name__}; "
            f"FisherTune wraps only {supported}. Narrow target_modules or exclude it with exclude_modules."
        )

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if not hasattr(new_module, "base_layer") and not hasattr(new_module, "weight"):
            # unloading a modules_to_save container (e.g. a decoder): BaseTuner would copy a `.weight` it lacks;
            # there is nothing to place, it is the original module
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)  # PEFT places devices (and meta) for us

    def _prepare_adapter_config(self, peft_config, model_config):
        """target_modules=None: the architecture's default (tuner.targets), as PEFT's LoRA table does."""
        if peft_config.target_modules is None:
            peft_config.target_modules = default_target_modules(self._ft_injecting[0])
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        # a loaded adapter's base and decoder against this model, before anything is wrapped (tuner/fingerprint.py)
        fingerprint.check(model, self.peft_config[adapter_name], adapter_name)
        self._ft_owner_cache = None  # tied-weight map, built once per injection
        self._ft_injecting = (model,)  # a tuple: a module attribute would become the tuner's submodule
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            self._ft_injecting = None
        self._ft_owner_cache = None
        self._ft_unchecked = None  # layers not yet seen called in a forward (None: all of them)
        self._ft_warned: set = set()
        config = self.peft_config[adapter_name]
        if config.init_selection != "none" and not _on_meta(model, adapter_name):
            _initial_selection(self, config, adapter_name)

    # ------------------------------------------------------- forward checks
    def _ft_layers(self) -> list[FisherTuneLayer]:
        return [m for m in self.model.modules() if isinstance(m, FisherTuneLayer)]

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Run by PeftModel.forward around the model's forward: find wrapped layers that were never called (their
        parent reads `.weight` directly, so the delta has no effect) and a model with nothing to train."""
        if torch.compiler.is_compiling():
            yield
            return
        pending = getattr(self, "_ft_unchecked", None)
        if pending is None:
            pending = self._ft_unchecked = self._ft_layers()
        for layer in pending:
            layer._ft_called = False
        yield
        self._ft_after_forward(pending)

    def _ft_after_forward(self, pending: list[FisherTuneLayer]) -> None:
        still = []
        for layer in pending:
            if layer._ft_called:
                layer._ft_not_applied = False
                continue
            still.append(layer)
            if any(a in layer.ft_values and layer.num_active(a) for a in layer.active_adapters):
                layer._ft_not_applied = True
                if layer.ft_key not in self._ft_warned:
                    self._ft_warned.add(layer.ft_key)
                    warnings.warn(
                        f"FisherTune layer {layer.ft_key!r} has active elements but was not called in the forward: its "
                        "parent reads the weight directly (e.g. a weight-tied or lookup-table weight), so the delta "
                        "has no effect and gets no gradient. Exclude it with exclude_modules; merging it is refused.",
                        stacklevel=4,
                    )
        self._ft_unchecked = still
        if self.model.training and torch.is_grad_enabled() and "nothing-active" not in self._ft_warned:
            layers = self._ft_layers()
            trainable = [(m, a) for m in layers for a in m.active_adapters
                         if a in m.ft_values and m.ft_values[a].requires_grad]
            if trainable and not any(m.num_active(a) for m, a in trainable):
                self._ft_warned.add("nothing-active")
                warnings.warn(
                    f"FisherTune adapter(s) {sorted({a for _, a in trainable})} have no active element in any layer "
                    "(no selection yet: call select_parameters(model, scores); or delta_min rounds to zero elements): "
                    "the backbone deltas train nothing (their gradients are zero).",
                    stacklevel=4,
                )

    # ----------------------------------------------------------- saving
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        fingerprint.stamp(model, config, adapter_name)  # written with the config (tuner/fingerprint.py)
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        layers = [(n.removeprefix("_fsdp_wrapped_module."), m) for n, m in model.named_modules()
                  if isinstance(m, FisherTuneLayer) and adapter_name in m.ft_values]
        # a partly grown selection keeps its ranked candidate list in the file (so a reloaded adapter can keep
        # growing); a fully grown one (every candidate active) stores the active elements only
        partial = any(m.num_active(adapter_name) < m.num_candidates(adapter_name) for _, m in layers)
        for name, module in layers:
            for attr in _STATE_ATTRS:
                to_return.pop(f"{name}.{attr}.{adapter_name}", None)
            encoded = storage.encode_layer(
                module.active_indices(adapter_name), module.active_values(adapter_name),
                module.weight_shape, config.encoding,
            )
            if partial:
                encoded.update(storage.encode_ranking(
                    module.ft_indices[adapter_name], module.ft_rank[adapter_name], module._threshold(adapter_name)))
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
            ranking = storage.decode_ranking(name, tensors, flat, module.weight_shape)
            if ranking is None:  # fully grown: a fixed selection, every element active (rank -1 < threshold 0)
                indices, ranks, threshold = flat, torch.full_like(flat, -1), 0
            else:
                indices, ranks, threshold, active = ranking
                full = torch.zeros(indices.numel(), dtype=values.dtype)
                full[active] = values
                values = full
            module.resize_adapter(adapter_name, indices.numel(), value_dtype=values.dtype)
            model_prefix = f"{name}."
            state_dict[f"{model_prefix}ft_indices.{adapter_name}"] = indices.to(module.ft_indices[adapter_name].dtype)
            state_dict[f"{model_prefix}ft_rank.{adapter_name}"] = ranks.to(module.ft_rank[adapter_name].dtype)
            state_dict[f"{model_prefix}ft_threshold.{adapter_name}"] = torch.tensor(threshold, dtype=torch.int64)
            state_dict[f"{model_prefix}ft_values.{adapter_name}"] = values
        ours = {f"{n}.{a}.{adapter_name}" for n in layers for a in _STATE_ATTRS}
        leftovers = [k for k in state_dict if k.rsplit(".", 1)[-1] in storage.SUFFIXES]
        if leftovers:
            raise storage.AdapterFileError(
                f"adapter file: tensors {leftovers[:5]} belong to modules this model does not target with FisherTune"
            )
        saved_modules = [n.removeprefix(peft_prefix) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
        unknown = [k for k in state_dict if k not in ours
                   and not any(k.removeprefix(peft_prefix).startswith(f"{n}.") for n in saved_modules)]
        if unknown:
            raise storage.AdapterFileError(
                f"adapter file: tensor(s) {unknown[:5]} are neither FisherTune tensors (ft_*) of a targeted module nor "
                f"weights of a modules_to_save module ({saved_modules or 'none'}); the file is not this adapter's"
            )
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


def _on_meta(model: nn.Module, adapter_name: str) -> bool:
    """True when the adapter was created empty on the meta device (low_cpu_mem_usage loading): the file decides."""
    meta = torch.device("meta")
    for module in model.modules():
        if isinstance(module, FisherTuneLayer) and adapter_name in module.ft_values:
            return module.ft_values[adapter_name].device == meta or module.get_base_layer().weight.device == meta
    return False


def _initial_selection(tuner: FisherTuneModel, config: FisherTuneConfig, adapter_name: str) -> None:
    if config.init_selection == "magnitude":
        scores = magnitude_scores(tuner, adapter_name=adapter_name)
    else:
        scores = random_scores(tuner, config.seed, adapter_name=adapter_name)
    delta_min, delta_max = config.delta_min, config.delta_max
    if not config.init_weights:
        # PEFT's "non-identity init for tests": every targeted layer must change the output visibly, even where
        # delta_min rounds to no element (tiny layers). One element of every row (dim 0: each output unit, each
        # embedding row; every element of a 1-D weight such as a LayerNorm's) is ranked first and activated.
        total, rows_needed, worst = 0, 0, 0.0
        for name, s in scores.items():
            gen = torch.Generator().manual_seed(layer_seed(config.seed + 2, name))
            rows = s.shape[0]
            flat = s.view(rows, -1)
            cols = torch.randint(0, flat.shape[1], (rows,), generator=gen)
            flat[torch.arange(rows), cols] = float(s.max()) + 1.0
            total += s.numel()
            rows_needed += rows
            worst = max(worst, rows / s.numel())
        need = worst if config.scope == "per_tensor" else rows_needed / total
        delta_min = min(1.0, max(delta_min, need))
        delta_max = max(delta_max, delta_min)
    select_parameters(tuner, scores, scope=config.scope, adapter_name=adapter_name,
                      delta_min=delta_min, delta_max=delta_max)
    if not config.init_weights:
        for module in tuner.model.modules():
            if isinstance(module, FisherTuneLayer) and adapter_name in module.ft_values:
                gen = torch.Generator().manual_seed(layer_seed(config.seed + 1, module.ft_key))
                vals, mask = module.ft_values[adapter_name], module.ft_rank[adapter_name] < module.ft_threshold[adapter_name]
                with torch.no_grad():  # active elements only: inactive candidates must stay exactly zero
                    noise = 0.3 * torch.randn(vals.shape, generator=gen).to(device=vals.device, dtype=vals.dtype)
                    noise = noise + 0.2 * torch.sign(noise)  # at least 0.2: a visible change
                    vals.copy_(torch.where(mask, noise, torch.zeros_like(noise)))
                module._check_inactive_zero(adapter_name)
