"""The PEFT baselines of `METHODS` (training/methods.py): Super-Tuning, SHiRA, DoRA, SoMA and any PEFT config.

Each `*_wrap(segmentor, method section, candidate kinds)` returns (PEFT model, PEFT config), like the other rows.
What a wrapped model trains in the backbone is what PEFT left trainable when it was built (`wrapped_trainable`),
so a config that also trains biases (`bias: lora_only`, SoMA) trains them here too.

Sizes are matched to FisherTune's final active set, δ_max of the targeted elements (`method.fishertune.delta_max`,
default 0.15) on the same target layers (`model.candidate_kinds`, Linear layers only for these methods):
    supertuning  SupertuningConfig(sparsity = 1 - δ_max): int(δ_max · numel) entries of every targeted weight, the
                 largest |w| of that weight (per layer, data-free)
    shira        ShiraConfig(r): r·(m + n) random entries per m x n weight, with r = round(δ_max · Σ mn / Σ (m + n))
                 over the targets, so the total is within half a rank of δ_max · Σ mn (`shira_rank`)
`method.peft_config` may override fields of these rows' PEFT config (e.g. `{select_top: false}`); for `peft` it is
the whole config.

SoMA (CVPR 2025, ysj9909/SoMA, `configs/sora/sora_dinov2-L_mask2former.py` and `rein/peft/sora.py`): LoRA with
r = lora_alpha = `method.lora_r` (16) on every Linear layer (q, k, v, o, fc1, fc2) of the blocks from index
round(8/24 · blocks) on (8 of DINOv2-L's 24: the last two thirds), A and B from the r *smallest* singular triplets
of each weight, W = U S Vᵀ: B = U_r √(S_r/s), A = √(S_r/s) V_rᵀ (s = alpha / r), the base weight replaced by the
residual W − s·B A, so the wrapped model's initial output is the pretrained model's; the targeted layers' biases
train too (SoMA's `bias="all"` default). Saving: PEFT's own conversion for a mutated init (PiSSA / OLoRA): the saved
adapter is a plain LoRA of rank 2r over the *pretrained* weights, A' = [A; A0], B' = [B, −B0] with the initial
A0, B0, since W_res + s·B A = W + s·(B A − B0 A0). Any PEFT loader applies it to the unmodified base; `soma.json`
beside it lets `SomaPeftModel.load_adapter` (a resumed run, whose base already is the residual) split it back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any

import torch
from torch import nn

from .._peft_patches import patch_peft_unload  # noqa: F401 (re-exported; applied on `import peft_fishertune`)
from .trainable import record_trainable, segmentor_of, wrapped_trainable  # noqa: F401 (re-exported)

SOMA_START_FRACTION = 8 / 24  # SoMA's start_lora_idx = 8 on DINOv2-L's 24 blocks
SOMA_FILE = "soma.json"


def _config_error(msg: str) -> Exception:
    from .config.errors import ConfigError

    return ConfigError(msg)


# ----------------------------------------------------------------------------------------------- helpers


def delta_max(section) -> float:
    """FisherTune's final active fraction for this run (`method.fishertune.delta_max`, else the config default)."""
    from ..tuner.config import FisherTuneConfig

    ft = dict(getattr(section, "fishertune", None) or {})
    if "delta_max" in ft:
        return float(ft["delta_max"])
    return float(FisherTuneConfig.__dataclass_fields__["delta_max"].default)


def linear_targets(seg, kinds, method: str) -> list[str]:
    """The candidate layers of `kinds` (full names); refused when one is not an nn.Linear (these methods are
    Linear-only in PEFT)."""
    targets = seg.fisher_target_modules(tuple(kinds))
    modules = dict(seg.named_modules())
    other = [t for t in targets if not isinstance(modules[t], nn.Linear)]
    if other:
        raise _config_error(f"method.name={method!r} adapts nn.Linear layers only, but model.candidate_kinds="
                            f"{list(kinds)} also names {len(other)} other layers (e.g. {other[0]!r}, "
                            f"{type(modules[other[0]]).__name__}): use candidate_kinds: [linear]")
    if not targets:
        raise _config_error(f"method.name={method!r}: model.candidate_kinds={list(kinds)} names no layer")
    return targets


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def peft_overrides(section, cls, method: str) -> dict[str, Any]:
    """`method.peft_config` as overrides of this row's PEFT config class (keys checked against its fields)."""
    raw = dict(getattr(section, "peft_config", None) or {})
    pt = raw.pop("peft_type", None)
    want = cls.__name__.replace("Config", "").upper()
    if pt is not None and str(getattr(pt, "value", pt)).upper() != want:
        raise _config_error(f"method.peft_config.peft_type={pt!r}, but method.name={method!r} builds a {cls.__name__}"
                            f" ({want}); remove peft_type, or use method.name: peft for another PEFT method")
    bad = sorted(set(raw) - _fields(cls))
    if bad:
        raise _config_error(f"method.peft_config: {bad} are not fields of {cls.__name__} (method.name={method!r}); "
                            f"allowed: {sorted(_fields(cls) - {'peft_type'})}")
    return raw


def _build_config(cls, kwargs: dict, where: str):
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise _config_error(f"{where} ({cls.__name__}): {e}") from None


def _wrap(seg, config, where: str = "method"):
    from peft import get_peft_model

    from .config.errors import ConfigError

    try:
        model = get_peft_model(seg, config)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise _config_error(f"{where} ({type(config).__name__}): {e}") from None
    return record_trainable(model), config


# ------------------------------------------------------------------------------------------ Super-Tuning


def supertuning_wrap(seg, section, kinds=("linear",)):
    """Super-Tuning (peft.SupertuningConfig) at sparsity 1 - δ_max on FisherTune's targets, decoder saved."""
    from peft import SupertuningConfig

    targets = linear_targets(seg, kinds, "supertuning")
    kw = dict(target_modules=targets, modules_to_save=seg.decoder_module_names(), sparsity=1.0 - delta_max(section))
    kw.update(peft_overrides(section, SupertuningConfig, "supertuning"))
    return _wrap(seg, _build_config(SupertuningConfig, kw, "method (supertuning)"), "method (supertuning)")


# ------------------------------------------------------------------------------------------------ SHiRA


def shira_rank(shapes: list[tuple[int, int]], fraction: float) -> int:
    """SHiRA's r whose r·(m + n) entries per m x n weight sum to about `fraction` of all their entries."""
    total = sum(m * n for m, n in shapes)
    per_rank = sum(m + n for m, n in shapes)
    return max(1, round(fraction * total / per_rank))


def _layer_seeded_mask(names_by_id: dict[int, str], seed: int):
    """A SHiRA mask function giving each layer its own random support (seeded by (seed, layer name)); SHiRA's
    `random_mask` gives every same-shaped layer the same support."""
    from ..tuner.selection import layer_seed

    def mask_fn(base_layer, r, **kwargs):
        w = base_layer.weight
        m, n = w.shape
        k = r * (m + n)
        gen = torch.Generator().manual_seed(layer_seed(seed, names_by_id.get(id(base_layer), f"{m}x{n}")))
        idx = torch.randperm(m * n, generator=gen)[:k]
        mask = torch.zeros(m * n, dtype=w.dtype)
        mask[idx] = 1
        return mask.view(m, n).to(w.device)

    return mask_fn


def shira_wrap(seg, section, kinds=("linear",)):
    """SHiRA (peft.ShiraConfig) with r matched to δ_max of the targeted elements, a random support per layer."""
    from peft import ShiraConfig

    targets = linear_targets(seg, kinds, "shira")
    modules = dict(seg.named_modules())
    shapes = [tuple(modules[t].weight.shape) for t in targets]
    over = peft_overrides(section, ShiraConfig, "shira")
    r = over.pop("r", None) or shira_rank(shapes, delta_max(section))
    too_small = [(t, s) for t, s in zip(targets, shapes) if r * (s[0] + s[1]) > s[0] * s[1]]
    if too_small:
        t, s = too_small[0]
        raise _config_error(f"method.name='shira': r={r} asks for r·(m+n) = {r * (s[0] + s[1])} entries of {t} "
                            f"({s[0]}x{s[1]} = {s[0] * s[1]}); lower method.fishertune.delta_max")
    seed = over.get("random_seed")
    seed = int(torch.initial_seed()) if seed is None else int(seed)  # training.seed in a run (set_seed)
    kw = dict(r=r, target_modules=targets, modules_to_save=seg.decoder_module_names(), **over)
    config = _build_config(ShiraConfig, kw, "method (shira)")
    config.mask_fn = _layer_seeded_mask({id(modules[t]): t for t in targets}, seed)
    return _wrap(seg, config, "method (shira)")


# ------------------------------------------------------------------------------------------------- DoRA


def dora_wrap(seg, section, kinds=("linear",)):
    """DoRA: LoRA r = lora_alpha = method.lora_r with use_dora on FisherTune's targets."""
    from peft import LoraConfig

    r = section.lora_r
    kw = dict(r=r, lora_alpha=r, use_dora=True, target_modules=seg.fisher_target_modules(tuple(kinds)),
              modules_to_save=seg.decoder_module_names())
    kw.update(peft_overrides(section, LoraConfig, "dora"))
    return _wrap(seg, _build_config(LoraConfig, kw, "method (dora)"), "method (dora)")


# -------------------------------------------------------------------------------------- any PEFT config


def _peft_config_class(pt):
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    by_name = {str(getattr(k, "value", k)).upper(): cls for k, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    key = str(getattr(pt, "value", pt)).upper()
    if key not in by_name:
        raise _config_error(f"method.peft_config.peft_type={pt!r} is not a PEFT method; expected one of "
                            f"{sorted(by_name)}")
    return by_name[key]


def _resolve_targets(seg, targets, where: str):
    """Short names (`q_proj`) resolve to the backbone's modules of that name, so no decoder layer is wrapped; a
    regex string is passed as is (PEFT matches it against the full name, e.g. `backbone\\..*q_proj`)."""
    if targets is None or isinstance(targets, str):
        return targets
    names = [n for n, _ in seg.named_modules() if n.startswith("backbone.")]
    out = []
    for t in targets:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if not hits:
            raise _config_error(f"{where}: {t!r} names no module of the backbone")
        out += [h for h in hits if h not in out]
    return out


def _any_peft_config(pc) -> tuple[type, dict]:
    """(config class, its keyword arguments) of `method.peft_config` for the `peft` row, checked: a mapping with a
    known peft_type whose other keys are fields of that class."""
    raw = dict(pc or {})
    if not raw:
        raise _config_error("method.name='peft' needs method.peft_config: a PEFT config as a mapping, e.g. "
                            "{peft_type: LORA, r: 8, lora_alpha: 8}")
    if "peft_type" not in raw:
        raise _config_error("method.peft_config.peft_type is missing (e.g. LORA, SHIRA, SUPERTUNING, IA3, BOFT)")
    cls = _peft_config_class(raw.pop("peft_type"))
    bad = sorted(set(raw) - _fields(cls))
    if bad:
        raise _config_error(f"method.peft_config: {bad} are not fields of {cls.__name__}; allowed: "
                            f"{sorted(_fields(cls) - {'peft_type'})}")
    return cls, raw


def peft_wrap(seg, section, kinds=("linear",)):
    """Any PEFT config from `method.peft_config` ({peft_type: LORA, r: 8, target_modules: [...], ...}).

    target_modules defaults to FisherTune's targets (`model.candidate_kinds`); short names are resolved inside the
    backbone. The decoder is added to modules_to_save. Prompt-learning methods (no layers to adapt) are refused."""
    cls, raw = _any_peft_config(getattr(section, "peft_config", None))
    if "target_modules" in _fields(cls):
        raw["target_modules"] = (_resolve_targets(seg, raw["target_modules"], "method.peft_config.target_modules")
                                 if raw.get("target_modules") is not None
                                 else seg.fisher_target_modules(tuple(kinds)))
    if "modules_to_save" in _fields(cls):
        raw["modules_to_save"] = list(dict.fromkeys([*(raw.get("modules_to_save") or []),
                                                     *seg.decoder_module_names()]))
    config = _build_config(cls, raw, "method.peft_config")
    if config.is_prompt_learning:
        raise _config_error(f"method.peft_config.peft_type={config.peft_type.value!r} is a prompt-learning method "
                            "(virtual tokens): it has no layers of a vision backbone to adapt")
    model, config = _wrap(seg, config, "method.peft_config")
    from peft.tuners.tuners_utils import BaseTunerLayer

    outside = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and ".backbone." not in n]
    if outside:
        raise _config_error(f"method.peft_config.target_modules matched {len(outside)} layers outside the backbone "
                            f"(e.g. {outside[0]!r}); the decoder trains whole (modules_to_save)")
    return model, config


def check_peft_config(section) -> None:
    """What can be checked of `method.peft_config` without a model (for the config validation, before anything is
    built): the row reads it, its peft_type exists, its keys are fields of that config class. Raises ConfigError."""
    pc = getattr(section, "peft_config", None)
    name = section.name
    if name == "peft":
        _any_peft_config(pc)
        return
    if not pc:
        return
    rows = {"dora": "LoraConfig", "supertuning": "SupertuningConfig", "shira": "ShiraConfig"}
    if name not in rows:  # the rows that take overrides (Method.takes_peft_config; soma takes none)
        raise _config_error(f"method.peft_config is set but method.name={name!r} does not read it; remove it, or "
                            "use method.name: peft (any PEFT config) / dora / supertuning / shira (overrides)")
    import peft

    peft_overrides(section, getattr(peft, rows[name]), name)


# ------------------------------------------------------------------------------------------------- SoMA


def soma_start_block(num_blocks: int) -> int:
    """First adapted block: SoMA's 8 of 24 (DINOv2-L), the same fraction of other depths."""
    return int(round(num_blocks * SOMA_START_FRACTION))


def soma_targets(seg, kinds=("linear",)) -> list[str]:
    from ..plotting import block_index

    targets = [t for t in linear_targets(seg, ("linear",), "soma")]
    blocks = sorted({b for b in (block_index(t) for t in targets) if b is not None})
    if not blocks:
        raise _config_error("method.name='soma': no Linear layer of the backbone lies in a numbered block")
    first = blocks[soma_start_block(len(blocks))] if soma_start_block(len(blocks)) < len(blocks) else blocks[-1]
    return [t for t in targets if (block_index(t) or -1) >= first]


def minor_components(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SoMA's init of one weight [out, in]: (A [r, in], B [out, r]) from its r smallest singular triplets,
    B A · scaling = U_r S_r V_rᵀ (in float32)."""
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    if r > S.numel():
        raise _config_error(f"method.lora_r={r} exceeds the rank {S.numel()} of a {tuple(weight.shape)} weight")
    root = torch.sqrt(S[-r:] / scaling)
    return root[:, None] * Vh[-r:, :], U[:, -r:] * root[None, :]


class _SomaMixin:
    """Save as a plain rank-2r LoRA over the pretrained base; load either form back into a SoMA training model."""

    soma_init: dict  # module name -> (A0, B0) on the CPU, float32

    def save_pretrained(self, save_directory: str, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        from safetensors.torch import load_file, save_file

        names = [a for a in self.peft_config] if kwargs.get("selected_adapters") is None else kwargs["selected_adapters"]
        for adapter in names:
            out = save_directory if adapter == "default" else os.path.join(save_directory, adapter)
            path = os.path.join(out, "adapter_model.safetensors")
            if not os.path.isfile(path):
                raise RuntimeError(f"SoMA: {path} was not written (save with safe_serialization)")
            sd = load_file(path)
            done = 0
            for key in list(sd):
                for part, dim, sign in ((".lora_A.", 0, 1.0), (".lora_B.", 1, -1.0)):
                    if part in key:
                        mod = key.split(part)[0]
                        a0, b0 = self.soma_init[mod]
                        init = a0 if dim == 0 else b0
                        sd[key] = torch.cat([sd[key], sign * init.to(sd[key].dtype)], dim=dim).contiguous()
                        done += 1
            if done != 2 * len(self.soma_init):
                raise RuntimeError(f"SoMA: converted {done} lora tensors, expected {2 * len(self.soma_init)}")
            save_file(sd, path, metadata={"format": "pt"})
            cfg_path = os.path.join(out, "adapter_config.json")
            with open(cfg_path) as f:
                cfg = json.load(f)
            r, alpha = cfg["r"], cfg["lora_alpha"]
            cfg.update(r=2 * r, lora_alpha=2 * alpha, init_lora_weights=True)
            with open(cfg_path, "w") as f:
                json.dump(cfg, f, indent=2)
            with open(os.path.join(out, SOMA_FILE), "w") as f:
                json.dump({"method": "soma", "rank": r, "lora_alpha": alpha,
                           "format": "plain LoRA of rank 2r over the pretrained base: lora_A = [A; A0], "
                                     "lora_B = [B, -B0] (A0, B0: the minor-component init)"}, f, indent=2)

    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        meta = os.path.join(str(model_id), SOMA_FILE)
        if not os.path.isfile(meta):
            return super().load_adapter(model_id, adapter_name, *args, **kwargs)
        from safetensors.torch import load_file, save_file

        with open(meta) as f:
            info = json.load(f)
        r = int(info["rank"])
        sd = load_file(os.path.join(str(model_id), "adapter_model.safetensors"))
        for key in list(sd):
            for part, dim in ((".lora_A.", 0), (".lora_B.", 1)):
                if part in key:
                    mod = key.split(part)[0]
                    t = sd[key]
                    own, init = (t[:r], t[r:]) if dim == 0 else (t[:, :r], -t[:, r:])
                    a0, b0 = self.soma_init[mod]
                    mine = a0 if dim == 0 else b0
                    if not torch.allclose(init.float(), mine, atol=1e-5, rtol=1e-4):
                        raise ValueError(f"{model_id}: the SoMA init stored for {mod} differs from this model's "
                                         "minor components: it was trained from other base weights")
                    sd[key] = own.contiguous()
        with tempfile.TemporaryDirectory() as tmp:
            save_file(sd, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
            with open(os.path.join(str(model_id), "adapter_config.json")) as f:
                cfg = json.load(f)
            cfg.update(r=r, lora_alpha=info["lora_alpha"])
            with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
                json.dump(cfg, f)
            return super().load_adapter(tmp, adapter_name, *args, **kwargs)


def _soma_class():
    from peft import PeftModel

    return type("SomaPeftModel", (_SomaMixin, PeftModel), {"__module__": __name__})


def soma_init_(model, r: int, scaling: float) -> dict:
    """Replace each LoRA layer's A, B with the weight's minor components and its base weight with the residual;
    returns {module name: (A0, B0)}."""
    from peft.tuners.lora import LoraLayer

    init = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LoraLayer):
                base = m.get_base_layer()
                a0, b0 = minor_components(base.weight, r, scaling)
                m.lora_A["default"].weight.copy_(a0)
                m.lora_B["default"].weight.copy_(b0)
                residual = base.weight.float() - scaling * (b0 @ a0)
                base.weight.copy_(residual.to(base.weight.dtype))
                init[name] = (a0.cpu().clone(), b0.cpu().clone())
    return init


def soma_wrap(seg, section, kinds=("linear",)):
    """SoMA: minor-component LoRA (see the module docstring); `kinds` does not apply (SoMA's own targets)."""
    from peft import LoraConfig

    if getattr(section, "peft_config", None):
        raise _config_error("method.peft_config is set but method.name='soma' builds its own LoRA config; remove it")
    r = section.lora_r
    config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, bias="lora_only", target_modules=soma_targets(seg),
                        modules_to_save=seg.decoder_module_names())
    config.base_model_name_or_path = seg.__dict__.get("name_or_path", None) or None
    model = _soma_class()(seg, config)
    model.soma_init = soma_init_(model, r, config.lora_alpha / r)
    return record_trainable(model), config
