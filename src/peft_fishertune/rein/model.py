"""`ReinModel`: the PEFT tuner that wraps every backbone block in a `ReinLayer` and links Rein's tokens to the
Mask2Former queries."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .blocks import BlockInfo, resolve_blocks
from .layer import ReinLayer, ReinShared

SHARED = "rein_shared"


class ReinModel(BaseTuner):
    """Rein (Wei et al., CVPR 2024) as a PEFT method: `peft.get_peft_model(seg_model, ReinConfig())`.

    Per block: tokens (the layers). Shared by all blocks: two MLPs, the scale and the query linking, in
    `self.rein_shared[adapter]` (one `ReinShared` per adapter; each layer registers the same container). With
    `link_token_to_query`, a forward pre-hook on the segmentation model's Mask2Former decoder passes the linked
    queries (`decode_head(features, queries=...)`); while Rein is disabled the decoder uses its own queries.
    """

    prefix: str = "rein_"
    tuner_layer_cls = ReinLayer
    target_module_mapping: dict = {}
    uses_shared_state: bool = True
    mergeable: bool = False  # read by inference.load_for_inference: keep the PeftModel instead of merging

    # ------------------------------------------------------------ injection
    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config  # target_modules=None means "the backbone adapter's blocks", not PEFT's per-model table

    def _check_target_module_exists(self, peft_config, key: str) -> bool:
        return key in self._rein_blocks

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None) -> None:
        config = self.peft_config[adapter_name]
        from ..tuner import fingerprint

        fingerprint.check(model, config, adapter_name, kind="rein")  # a loaded adapter's base and decoder, first
        if config.link_token_to_query is None:  # the default: link where there is a Mask2Former decoder to link to
            config.link_token_to_query = _has_mask2former_segmentation(model)
        self._rein_blocks: dict[str, BlockInfo] = resolve_blocks(model, config)
        dims = {b.dim for b in self._rein_blocks.values()}
        if len(dims) != 1:
            raise ValueError(f"Rein: the wrapped blocks have different widths {sorted(dims)}; the shared MLPs need one")
        decoder = _linked_decoder(model, config) if config.link_token_to_query else None
        if SHARED not in self._modules:
            self.rein_shared = nn.ModuleDict()
        first = model.get_submodule(next(iter(self._rein_blocks)))
        ref = next(first.parameters(), None)
        on_meta = low_cpu_mem_usage or (ref is not None and ref.device.type == "meta")
        with _empty_weights() if on_meta else nullcontext():
            shared = ReinShared(dims.pop(), config)
        if ref is not None and shared.scale.device.type != "meta":  # (a caller's init_empty_weights makes it meta)
            shared.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        self.rein_shared[adapter_name] = shared
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                   low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        except Exception:
            if adapter_name in self.rein_shared:
                del self.rein_shared[adapter_name]
            raise
        if decoder is not None:  # found again: modules_to_save has wrapped it meanwhile
            self._install_query_link(_linked_decoder(model, config))

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **optional_kwargs):
        info = self._rein_blocks[current_key]
        if isinstance(target, ReinLayer):
            target.update_layer(adapter_name, config)
            return
        new = ReinLayer(target, adapter_name, config, shared=self.rein_shared, dim=info.dim,
                        layer_index=info.index, num_prefix=info.num_prefix, patch_size=info.patch_size)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # a block has no `.weight`; BaseTuner's version assumes one when unloading
        setattr(parent, child_name, new_module)

    # ---------------------------------------------------------- merging
    def _check_merge_allowed(self):
        raise NotImplementedError(
            "Rein cannot be merged into the base weights: its refinement f + s·mlp(Δ(f) + f) depends on the features, "
            "it is no weight delta. Keep the adapter (PeftModel), or drop it with unload()."
        )

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None):
        if merge:
            self._check_merge_allowed()
        self._remove_query_link()
        return super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)

    # ---------------------------------------------------------- linking
    def rein_layers(self) -> list[ReinLayer]:
        """The wrapped blocks, in block order."""
        return sorted((m for m in self.model.modules() if isinstance(m, ReinLayer)), key=lambda m: m.layer_index)

    def linked_queries(self) -> Optional[torch.Tensor]:
        """(token_length, query_dims) queries from the active adapter's tokens; None while Rein is disabled or no
        active adapter links its tokens."""
        layers = self.rein_layers()
        if not layers or all(layer.disable_adapters for layer in layers):
            return None
        names = [a for a in self.active_adapters
                 if a in self.peft_config and self.peft_config[a].link_token_to_query and a in self.rein_shared]
        if not names:
            return None
        if len(names) > 1:
            raise ValueError(
                f"Rein: adapters {names} are active together and each links its tokens to the decoder queries; "
                "activate one of them, or build them with link_token_to_query=False"
            )
        name = names[0]
        tokens = torch.stack([layer.tokens(name) for layer in layers if name in layer.rein_tokens_a])  # (L, m, C)
        return self.rein_shared[name].link_queries(tokens)

    def _decoder_pre_hook(self, module, args, kwargs):
        if kwargs.get("queries") is not None:
            return None
        queries = self.linked_queries()
        if queries is None:
            return None
        return args, {**kwargs, "queries": queries}

    def _install_query_link(self, decoder: nn.Module) -> None:
        # (handle, module) in a tuple: a module stored as a plain attribute would become the tuner's submodule
        link = getattr(self, "_query_link", None)
        if link is not None and link[1] is decoder:
            return
        self._remove_query_link()
        self._query_link = (decoder.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True), decoder)

    def _remove_query_link(self) -> None:
        link = getattr(self, "_query_link", None)
        if link is not None:
            link[0].remove()
        self._query_link = None

    # ----------------------------------------------------------- saving
    @classmethod
    def _tuner_prefixes(cls, model: nn.Module) -> list[str]:
        return [f"{n}.{SHARED}." if n else f"{SHARED}." for n, m in model.named_modules() if isinstance(m, ReinModel)]

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """`...rein_shared.<adapter>.mlp_delta_f.weight` -> `...rein_shared.mlp_delta_f.weight` (PEFT's rule only
        removes the adapter name in the last two places); other keys by PEFT's rule."""
        parts = key.split(".")
        for i in range(len(parts) - 1):
            if parts[i] == SHARED and parts[i + 1] == adapter_name:
                return ".".join(parts[: i + 1] + parts[i + 2 :])
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """One copy of the shared parameters (the tuner's); the per-layer references to them are dropped."""
        from ..tuner import fingerprint

        fingerprint.stamp(model, config, adapter_name, tensors=rein_tensors(model, adapter_name))  # written with the config
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        keep = tuple(cls._tuner_prefixes(model))
        return {k: v for k, v in out.items() if SHARED not in k.split(".") or k.startswith(keep)}

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """The file's shared tensors also fill each layer's reference (the same parameters), so nothing is
        reported missing."""
        from ..tuner import fingerprint

        fingerprint.check_saved_module_keys(model, state_dict, adapter_name, "Rein")  # e.g. replace_query_feat
        out = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        layers = [n for n, m in model.named_modules() if isinstance(m, ReinLayer)]
        for tuner_prefix in cls._tuner_prefixes(model):
            own = f"{tuner_prefix}{adapter_name}."
            for key in [k for k in out if k.startswith(own)]:
                rest = key[len(own):]
                for layer in layers:
                    out[f"{layer}.{SHARED}.{adapter_name}.{rest}"] = out[key]
        return out


def _empty_weights():
    from accelerate import init_empty_weights

    return init_empty_weights()


def _has_mask2former_segmentation(model: nn.Module) -> bool:
    from ..models.segmentor import SegmentationModel

    return any(isinstance(m, SegmentationModel) and m.decoder_type == "mask2former" for m in model.modules())


def _linked_decoder(model: nn.Module, config) -> nn.Module:
    """The module the segmentation model calls as its Mask2Former decoder (`decode_head`, possibly PEFT's
    ModulesToSaveWrapper around it), checked against the Rein config."""
    from ..models.mask2former import Mask2FormerSemanticDecoder
    from ..models.segmentor import SegmentationModel

    segs = [m for m in model.modules() if isinstance(m, SegmentationModel) and m.decoder_type == "mask2former"]
    if len(segs) != 1:
        raise ValueError(
            "ReinConfig.link_token_to_query=True links Rein's tokens to the queries of a Mask2Former decoder, but the "
            f"model holds {len(segs)} SegmentationModel(s) with decoder='mask2former'; set link_token_to_query=False "
            "for other models"
        )
    call_site = segs[0].decode_head
    inner = getattr(call_site, "original_module", call_site)
    if not isinstance(inner, Mask2FormerSemanticDecoder):
        raise TypeError(f"Rein query linking: decode_head is {type(inner).__name__}, expected Mask2FormerSemanticDecoder")
    dc = inner.config
    if dc.num_queries != config.token_length:
        raise ValueError(
            f"Rein query linking: ReinConfig.token_length={config.token_length} must equal the decoder's "
            f"num_queries={dc.num_queries} (the linked tokens replace its queries one for one)"
        )
    if dc.hidden_dim != config.query_dims:
        raise ValueError(
            f"Rein query linking: ReinConfig.query_dims={config.query_dims} must equal the decoder's "
            f"hidden_dim={dc.hidden_dim}"
        )
    return call_site


def rein_tensors(model: nn.Module, adapter_name: str) -> list[tuple[str, torch.Tensor]]:
    """(name, weight) of every weight matrix inside the blocks Rein wraps for `adapter_name`."""
    from ..tuner import fingerprint

    out = []
    for name, module in model.named_modules():
        if isinstance(module, ReinLayer) and adapter_name in module.rein_tokens_a:
            block = module.get_base_layer()
            for pname, p in block.named_parameters():
                if p.ndim >= 2 and not pname.split(".")[0].startswith("rein_"):
                    out.append((f"{fingerprint.strip_adapter_prefix(name)}.{pname}", p))
    return out
