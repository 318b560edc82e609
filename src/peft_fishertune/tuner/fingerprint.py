"""A fingerprint of the base an adapter was trained on, saved with it and checked when it is loaded.

A FisherTune adapter is a set of per-element corrections of one base's weights; on other weights of the same
architecture it loads without an error and computes something else. A Rein adapter depends on its decoder
(e.g. Mask2Former's `replace_query_feat`). So `save_pretrained` stamps the adapter's config
(`config.base_fingerprint`, a field of FisherTuneConfig / ReinConfig, written to adapter_config.json) with

- ``tensors``: per targeted weight (FisherTune: the wrapped layers' weights; Rein: the wrapped blocks' weight
  matrices), its shape and the values at 64 fixed positions (evenly spaced over the flattened tensor), stored as
  bfloat16 in base64 (about 170 characters per tensor). Values rather than a hash: the same base loaded in
  another dtype (bf16, fp16) still matches within rounding, while other weights differ in nearly every sample;
- ``decoder``: for our `SegmentationModel`, the decoder's kind and the options that shape it (and, for
  Mask2Former, `replace_query_feat`); None for other models.

On load (`PeftModel.from_pretrained`, `load_adapter`: the check runs when the tuner injects the adapter, before
any weight is read):

- a decoder of another kind or with other options is an error (`AdapterFileError`) naming both, always: the
  decoder's weights cannot load, or load into a decoder that computes something else;
- targeted weights with other shapes or values warn (default) or raise, per `on_base_mismatch` ('warn' |
  'error'; the environment variable `PEFT_FISHERTUNE_ON_BASE_MISMATCH` overrides the config's value), naming the
  tensors and what differs.

Adapters saved before fingerprints existed (`base_fingerprint` absent) load without the weight check. Their decoder
is still checked by its weights: saved decoder weights this model's decoder lacks are refused
(`check_saved_module_keys`, Rein's `query_feat_proj`), and weights the file lacks (PEFT's bare `KeyError` on
another decoder kind) become an `AdapterFileError` naming the missing and unexpected weights (`explain_missing_key`,
called by `_registration`'s `load_adapter`); the model is then left wrapped, as PEFT leaves it: build it again.
"""

from __future__ import annotations

import base64
import os
import warnings
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn

from .storage import AdapterFileError

VERSION = 1
SAMPLES = 64
ENV = "PEFT_FISHERTUNE_ON_BASE_MISMATCH"
POLICIES = ("warn", "error")
# two bfloat16 values of one base weight differ by at most one bf16 rounding (2^-8 relative) when the base was
# loaded in another dtype; a value differs when it is further apart than 2^-6 relative (or than 2^-10 of the
# sample's scale, for values near zero)
REL_TOL = 2.0**-6
ABS_TOL = 2.0**-10

# the Mask2Former options that shape the decoder's tensors or its computation
MASK2FORMER_KEYS = ("num_labels", "num_queries", "hidden_dim", "feature_size", "mask_feature_size", "decoder_layers",
                    "encoder_layers", "dim_feedforward", "encoder_feedforward_dim", "num_attention_heads", "pre_norm",
                    "enforce_input_projection", "common_stride", "replace_query_feat")
BUILD_KEYS = ("backbone", "num_labels", "out_indices", "pyramid_channels", "pyramid_norm", "upernet_hidden_size")


# ----------------------------------------------------------------------------- making one
def sample_positions(numel: int, k: int = SAMPLES) -> torch.Tensor:
    """k fixed flat positions spread evenly over a tensor of `numel` elements (all of them when numel <= k)."""
    if numel <= k:
        return torch.arange(numel)
    return torch.linspace(0, numel - 1, k, dtype=torch.float64).round().long()


def tensor_entry(weight: torch.Tensor) -> dict[str, Any]:
    flat = weight.detach().reshape(-1)
    vals = flat[sample_positions(flat.numel()).to(flat.device)].to(torch.bfloat16).cpu().contiguous()
    return {"shape": list(weight.shape), "sample": base64.b64encode(vals.view(torch.uint8).numpy().tobytes()).decode()}


def _decode_sample(entry: dict) -> torch.Tensor:
    raw = bytearray(base64.b64decode(entry["sample"]))
    return torch.frombuffer(raw, dtype=torch.bfloat16).float() if raw else torch.empty(0)


def decoder_entry(model: nn.Module) -> Optional[dict[str, Any]]:
    """{"kind", "options"} of the (one) SegmentationModel in `model`, else None."""
    from ..models.segmentor import SegmentationModel

    segs = [m for m in model.modules() if isinstance(m, SegmentationModel)]
    if len(segs) != 1:
        return None
    seg = segs[0]
    options = {k: seg.build_config[k] for k in BUILD_KEYS if k in seg.build_config}
    if seg.decoder_type != "upernet":
        options.pop("upernet_hidden_size", None)
    head = getattr(seg.decode_head, "original_module", seg.decode_head)
    if seg.decoder_type == "mask2former":
        cfg = getattr(head, "config", None)
        for k in MASK2FORMER_KEYS:
            if cfg is not None and hasattr(cfg, k):
                options[k] = getattr(cfg, k)
        options["replace_query_feat"] = bool(getattr(head, "replace_query_feat", False))
    return {"kind": seg.decoder_type, "options": _jsonable(options)}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def make(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """The fingerprint of `tensors` (name, base weight) and of `model`'s decoder."""
    entries = {name: tensor_entry(w) for name, w in tensors if w.device.type != "meta"}
    return {"version": VERSION, "tensors": entries, "decoder": decoder_entry(model)}


def strip_adapter_prefix(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer", "")


def fishertune_tensors(model: nn.Module, adapter_name: str) -> list[tuple[str, torch.Tensor]]:
    """(name in the unwrapped model, base weight) of every FisherTune layer holding `adapter_name`; a merged layer's
    weight has the merged deltas subtracted first."""
    from .layer import FisherTuneLayer

    out = []
    for module in model.modules():
        if isinstance(module, FisherTuneLayer) and adapter_name in module.ft_values:
            w = module.get_base_layer().weight
            merged = [a for a in getattr(module, "merged_adapters", []) if a in module.ft_values]
            if merged and w.device.type != "meta":
                w = w.detach().clone()
                for a in merged:
                    w -= module.get_delta_weight(a).to(w.dtype)
            out.append((f"{module.ft_key}.weight", w))
    return out


# ----------------------------------------------------------------------------- stamping and checking
def stamp(model: nn.Module, config, adapter_name: str, tensors: Optional[list] = None) -> None:
    """Set `config.base_fingerprint` from `model` (at save time; the base is untouched by the adapters).
    `tensors`: the (name, weight) pairs to fingerprint; default: the FisherTune layers' base weights (another tuner,
    e.g. Rein's `rein_tensors`, passes its own)."""
    if tensors is None:
        tensors = fishertune_tensors(model, adapter_name)
    config.base_fingerprint = make(model, tensors)
    # this config object now describes a base in memory, not a file's: reusing it for a new adapter on another
    # base (get_peft_model(other, config)) is no load and is not checked (the marker is not a field: never saved)
    config.__dict__["_fingerprint_stamped_here"] = True


def policy(config) -> str:
    env = os.environ.get(ENV)
    if env:
        value, source = env.strip().lower(), f"${ENV}"
    else:
        value, source = getattr(config, "on_base_mismatch", None) or "warn", "on_base_mismatch"
    if value not in POLICIES:
        raise ValueError(f"{source}={value!r}; expected one of {list(POLICIES)}")
    return value


def compare(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(decoder differences, weight differences), each a list of human-readable lines."""
    dec: list[str] = []
    s_dec, c_dec = saved.get("decoder"), current.get("decoder")
    if s_dec is not None and c_dec is not None:
        if s_dec.get("kind") != c_dec.get("kind"):
            dec.append(f"decoder kind: the adapter was saved with decoder={s_dec.get('kind')!r}, this model has "
                       f"decoder={c_dec.get('kind')!r}")
        else:
            so, co = s_dec.get("options") or {}, c_dec.get("options") or {}
            for k in sorted(set(so) | set(co)):
                if so.get(k, "<absent>") != co.get(k, "<absent>"):
                    dec.append(f"decoder option {k}: saved {so.get(k, '<absent>')!r}, this model "
                               f"{co.get(k, '<absent>')!r}")
    weights: list[str] = []
    s_t, c_t = saved.get("tensors") or {}, current.get("tensors") or {}
    absent = sorted(set(s_t) - set(c_t))
    if absent:
        weights.append(f"{len(absent)} fingerprinted weight(s) absent from this model (e.g. {absent[0]})")
    for name in sorted(set(s_t) & set(c_t)):
        a, b = s_t[name], c_t[name]
        if list(a.get("shape", [])) != list(b.get("shape", [])):
            weights.append(f"{name}: shape {tuple(a.get('shape', []))} saved, {tuple(b.get('shape', []))} here")
            continue
        x, y = _decode_sample(a), _decode_sample(b)
        if x.numel() != y.numel():
            weights.append(f"{name}: {x.numel()} sampled values saved, {y.numel()} here")
            continue
        if not x.numel():
            continue
        scale = float(torch.maximum(x.abs().max(), y.abs().max()))
        diff = (x - y).abs()
        bad = diff > torch.maximum(REL_TOL * torch.maximum(x.abs(), y.abs()), torch.tensor(ABS_TOL * scale))
        if bool(bad.any()):
            weights.append(f"{name}: {int(bad.sum())} of {x.numel()} sampled values differ (max |diff| "
                           f"{float(diff.max()):.3g})")
    return dec, weights


def current_tensors(model: nn.Module, names: Iterable[str]) -> list[tuple[str, torch.Tensor]]:
    """The model's parameters under the saved names (names of the unwrapped model; PEFT's `base_layer` levels and
    prefix are ignored, so this works before and after the adapter wraps the layers). Absent names are skipped."""
    wanted = set(names)
    found: dict[str, torch.Tensor] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        key = strip_adapter_prefix(pname)
        if key in wanted and key not in found:
            found[key] = p
    return [(n, found[n]) for n in names if n in found]


def check(model: nn.Module, config, adapter_name: str, kind: str = "fishertune") -> None:
    """Compare `config.base_fingerprint` (from the adapter file) with `model`; see the module docstring. Runs before
    the adapter wraps the model (so a refusal leaves the model as it was), or after."""
    saved = getattr(config, "base_fingerprint", None)
    if not saved or not isinstance(saved, dict) or config.__dict__.get("_fingerprint_stamped_here"):
        return
    current = make(model, current_tensors(model, list(saved.get("tensors") or {})))
    dec, weights = compare(saved, current)
    what = "FisherTune" if kind == "fishertune" else "Rein"
    if dec:
        hint = ""
        if any("replace_query_feat" in d for d in dec):
            hint = (" (replace_query_feat: Rein's linked queries also replace the decoder's query features through "
                    "query_feat_proj; without it the adapter's decoder weights do not fit and the scores are wrong)")
        raise AdapterFileError(
            f"adapter {adapter_name!r}: this {what} adapter was trained with another decoder: " + "; ".join(dec)
            + hint + ". Build the model with the decoder the adapter was saved with (its adapter_config.json, "
            "base_fingerprint.decoder)."
        )
    if not weights:
        return
    shown = "; ".join(weights[:5]) + (f"; and {len(weights) - 5} more" if len(weights) > 5 else "")
    n = len(saved.get("tensors") or {})
    msg = (f"adapter {adapter_name!r}: this {what} adapter was trained on another base: {len(weights)} of {n} "
           f"fingerprinted weights differ ({shown}). "
           + ("Sparse per-element deltas are corrections of the saved base's weights; on other weights they are "
              "meaningless. " if kind == "fishertune" else "Rein refines the saved base's features. ")
           + f"Load it onto the base it was trained on (on_base_mismatch='error' or {ENV}=error refuses this).")
    if policy(config) == "error":
        raise AdapterFileError(msg)
    warnings.warn(msg, stacklevel=3)


def check_saved_module_keys(model: nn.Module, state_dict: dict, adapter_name: str, what: str) -> None:
    """For adapters without a fingerprint: weights the file holds for a `modules_to_save` module (e.g. the decoder)
    that this model's module lacks (PEFT leaves them unconsumed and loads the rest silently) mean the adapter was
    trained with another module, e.g. a Mask2Former decoder with `replace_query_feat` (`query_feat_proj`)."""
    from peft.utils import ModulesToSaveWrapper

    wrappers = [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    left = sorted(k for k in state_dict for w in wrappers
                  if k.startswith(w + ".") and not k.startswith((f"{w}.modules_to_save.", f"{w}.original_module.")))
    if not left:
        return
    hint = (" (query_feat_proj exists only with replace_query_feat=True: build the decoder with "
            "replace_query_feat: true, as the adapter was trained)") if any("query_feat_proj" in k for k in left) else ""
    raise AdapterFileError(
        f"adapter file: {what} adapter {adapter_name!r} holds weights {[strip_adapter_prefix(k) for k in left[:5]]} for modules_to_save "
        f"that this model's module lacks: the adapter was trained with another decoder / module{hint}"
    )


def saved_keys(path: Optional[str]) -> Optional[list[str]]:
    """The tensor names of a local adapter folder's weights file (safetensors or .bin), None when unreadable."""
    if not path:
        return None
    st, pt = os.path.join(path, "adapter_model.safetensors"), os.path.join(path, "adapter_model.bin")
    try:
        if os.path.isfile(st):
            from safetensors import safe_open

            with safe_open(st, framework="pt") as f:
                return list(f.keys())
        if os.path.isfile(pt):
            return list(torch.load(pt, map_location="cpu", weights_only=True))
    except Exception:  # an unreadable file is reported by the load itself
        return None
    return None


def explain_missing_key(peft_model: nn.Module, adapter_name: str, key: str, path: Optional[str],
                        peft_type: str) -> Optional[AdapterFileError]:
    """PEFT's bare `KeyError: 'base_model.model.decode_head.bn.weight'` (raised when a file lacks a weight of a
    `modules_to_save` module, before any tuner hook runs) as an error naming the module, the missing and the
    unexpected weights and the likely cause: an adapter without a fingerprint trained with another decoder. None
    when `key` is no weight of a modules_to_save module (the KeyError is then not ours to explain)."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    wrappers = {n: m for n, m in peft_model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)}
    if not any(key.startswith(n + ".") for n in wrappers):
        return None
    keys = saved_keys(path)
    rows = []
    for name, module in wrappers.items():
        expected = {f"{name}.{k}" for k in module.adapter_state_dict_load_map(adapter_name)}
        if keys is None:
            missing, unexpected = sorted(k for k in expected if k == key), []
        else:
            saved = {k for k in keys if k.startswith(name + ".")}
            missing, unexpected = sorted(expected - saved), sorted(saved - expected)
        if missing or unexpected:
            def show(ks):
                named = [strip_adapter_prefix(k) for k in ks[:4]]
                return f"{len(ks)} {named}{' ...' if len(ks) > 4 else ''}"

            rows.append(f"{strip_adapter_prefix(name)}: missing {show(missing)}"
                        + (f", unexpected {show(unexpected)}" if unexpected else ""))
    where = os.path.join(path, "adapter_model.safetensors") if path else "adapter file"
    return AdapterFileError(
        f"{where}: the {peft_type} adapter {adapter_name!r} does not fit this model's modules_to_save weights ("
        + "; ".join(rows) + "). The adapter was trained on a model with another module there: for our segmentation "
        "models, another decoder (kind, e.g. linear / upernet / mask2former, or options such as num_queries). Its "
        "adapter_config.json has no base_fingerprint (saved before fingerprints existed), so the decoder it was "
        "trained with is not recorded: build the model with the run's decoder (the training config.yaml's "
        "model.decoder and model.decoder_config).")
