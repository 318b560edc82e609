"""The public selection API: which weight elements a FisherTune adapter trains.

- `target_parameters(model)` names every targeted base weight;
- `select_parameters(model, scores)` ranks their elements by score, keeps the
  top δ_max as the ordered candidate list and activates the top δ_min;
- `set_active_fraction(model, f)` activates the top f of that list (growing
  keeps everything already learned: values, and optimizer moments, since the
  values tensor is never reallocated; only the rank threshold moves).

Names are the weight's name in the original, unwrapped model, e.g.
``"encoder.layer.0.attention.attention.query.weight"`` -- the same key as in
that model's own ``state_dict()``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .layer import FisherTuneLayer

_FRACTION_TOL = 1e-9


def _layers(model: nn.Module, adapter_name: str | None) -> tuple[str, list[FisherTuneLayer]]:
    layers = [m for m in model.modules() if isinstance(m, FisherTuneLayer)]
    if not layers:
        raise ValueError("the model has no FisherTune layers: wrap it with get_peft_model(model, FisherTuneConfig(...)) first")
    names = []
    for m in layers:
        for a in m.ft_values.keys():
            if a not in names:
                names.append(a)
    if adapter_name is None:
        active = [a for a in layers[0].active_adapters if a in names]
        if len(active) != 1:
            raise ValueError(f"adapter_name is required: the model has FisherTune adapters {names} with active {active}")
        adapter_name = active[0]
    elif adapter_name not in names:
        raise ValueError(f"adapter_name={adapter_name!r} is not a FisherTune adapter of this model; have {names}")
    return adapter_name, [m for m in layers if adapter_name in m.ft_values]


def _config(model: nn.Module, adapter_name: str):
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, Mapping) and adapter_name in configs:
        return configs[adapter_name]
    return None


def target_parameters(model: nn.Module, adapter_name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
    """Yield `(name, weight)` for every base weight targeted by the FisherTune adapter, in module order."""
    adapter_name, layers = _layers(model, adapter_name)
    for layer in layers:
        yield f"{layer.ft_key}.weight", layer.get_base_layer().weight


@dataclass
class SelectionSummary:
    adapter_name: str
    scope: str
    num_targeted: int  # elements in all targeted weights
    num_candidates: int  # kept (δ_max)
    num_active: int  # active now
    per_tensor: dict[str, tuple[int, int]]  # name -> (candidates, active)

    @property
    def active_fraction(self) -> float:
        return self.num_active / max(self.num_targeted, 1)


def _validate_scores(targets: dict[str, nn.Parameter], scores: Mapping[str, torch.Tensor]) -> None:
    if not isinstance(scores, Mapping):
        raise ValueError(f"scores must be a mapping {{name: tensor}}, got {type(scores).__name__}")
    missing = [n for n in targets if n not in scores]
    unknown = [n for n in scores if n not in targets]
    if missing:
        raise ValueError(f"scores: missing for {len(missing)} targeted weight(s), e.g. {missing[:3]}; "
                         "names come from target_parameters(model)")
    if unknown:
        raise ValueError(f"scores: unknown name(s) {unknown[:3]}; expected the names of target_parameters(model), "
                         f"e.g. {list(targets)[:2]}")
    for name, weight in targets.items():
        s = scores[name]
        if not isinstance(s, torch.Tensor):
            raise ValueError(f"scores[{name!r}] must be a tensor, got {type(s).__name__}")
        if tuple(s.shape) != tuple(weight.shape):
            raise ValueError(f"scores[{name!r}] has shape {tuple(s.shape)}; expected the weight's shape {tuple(weight.shape)}")
        if s.is_floating_point() and not torch.isfinite(s).all():
            raise ValueError(f"scores[{name!r}] holds NaN or inf; scores must be finite")


def select_parameters(
    model: nn.Module,
    scores: Mapping[str, torch.Tensor],
    *,
    scope: str | None = None,
    adapter_name: str | None = None,
    delta_min: float | None = None,
    delta_max: float | None = None,
) -> SelectionSummary:
    """Rank every targeted element by `scores`; keep the top δ_max as candidates, activate the top δ_min.

    `scope="global"` ranks all targeted elements together; `"per_tensor"` takes the same fraction of each weight.
    δ_min, δ_max and the scope default to the adapter's config (a scope given here is written back to it, so it is
    saved and used by `set_active_fraction`). Deltas already learned for elements that stay candidates are kept.
    """
    adapter_name, layers = _layers(model, adapter_name)
    config = _config(model, adapter_name)
    scope = scope if scope is not None else (config.scope if config is not None else "global")
    if scope not in ("global", "per_tensor"):
        raise ValueError(f"scope={scope!r} is not allowed; expected 'global' or 'per_tensor'")
    delta_min = delta_min if delta_min is not None else config.delta_min
    delta_max = delta_max if delta_max is not None else config.delta_max
    if not 0 < delta_min <= delta_max <= 1:
        raise ValueError(f"need 0 < delta_min <= delta_max <= 1, got delta_min={delta_min}, delta_max={delta_max}")
    if config is not None:
        config.scope = scope
    targets = {f"{m.ft_key}.weight": m.get_base_layer().weight for m in layers}
    _validate_scores(targets, scores)
    numels = [m.weight_numel for m in layers]
    total = sum(numels)
    with torch.no_grad():
        if scope == "per_tensor":
            for layer, name, n in zip(layers, targets, numels):
                k_max = round(delta_max * n)
                s = scores[name].detach().reshape(-1).float()
                idx = torch.topk(s, k_max, sorted=True).indices if k_max else torch.empty(0, dtype=torch.int64)
                # local ranks 0..k_max-1; active: rank < round(δ·numel)
                layer.set_candidates(adapter_name, idx, torch.arange(k_max), round(delta_min * n))
        else:
            flat = torch.cat([scores[name].detach().reshape(-1).float().cpu() for name in targets])
            k_max = round(delta_max * total)
            gidx = torch.topk(flat, k_max, sorted=True).indices  # rank order
            del flat
            ends = torch.tensor(numels).cumsum(0)
            owner = torch.searchsorted(ends, gidx, right=True)  # which tensor each candidate is in
            order = torch.argsort(owner, stable=True)  # grouped by tensor, rank order kept inside a group
            counts = torch.bincount(owner, minlength=len(layers)).tolist()
            starts = [0] + ends[:-1].tolist()
            k_min = round(delta_min * total)
            for layer, start, group in zip(layers, starts, torch.split(order, counts)):
                # positions in gidx are global ranks; active: rank < round(δ·total)
                layer.set_candidates(adapter_name, gidx[group] - start, group, k_min)
    return _summary(model, adapter_name, scope, layers)


def _summary(model, adapter_name, scope, layers) -> SelectionSummary:
    per = {f"{m.ft_key}.weight": (m.num_candidates(adapter_name), m.num_active(adapter_name)) for m in layers}
    return SelectionSummary(
        adapter_name=adapter_name,
        scope=scope,
        num_targeted=sum(m.weight_numel for m in layers),
        num_candidates=sum(c for c, _ in per.values()),
        num_active=sum(a for _, a in per.values()),
        per_tensor=per,
    )


def set_active_fraction(model: nn.Module, fraction: float, *, adapter_name: str | None = None) -> SelectionSummary:
    """Activate the top `fraction` of the candidate list (δ_min <= fraction <= δ_max of the adapter's config)."""
    adapter_name, layers = _layers(model, adapter_name)
    config = _config(model, adapter_name)
    if config is None:
        raise ValueError("set_active_fraction needs the model's peft_config (use the model returned by get_peft_model)")
    if not isinstance(fraction, (int, float)) or not math.isfinite(fraction) or not (
        config.delta_min - _FRACTION_TOL <= fraction <= config.delta_max + _FRACTION_TOL
    ):
        raise ValueError(
            f"fraction={fraction!r} is outside [delta_min, delta_max] = [{config.delta_min}, {config.delta_max}] "
            f"of adapter {adapter_name!r}"
        )
    if all(m.num_candidates(adapter_name) == 0 for m in layers):
        raise ValueError(f"adapter {adapter_name!r} has no candidates yet: call select_parameters(model, scores) first")
    if any(m.num_candidates(adapter_name) and bool((m.ft_rank[adapter_name] < 0).any()) for m in layers):
        raise ValueError(
            f"adapter {adapter_name!r} was loaded from a saved file, which holds only its active elements (not the "
            "ranked candidate list); its selection is fixed. Resume from a trainer checkpoint to keep growing it."
        )
    total = sum(m.weight_numel for m in layers)
    for layer in layers:
        threshold = round(fraction * (layer.weight_numel if config.scope == "per_tensor" else total))
        layer.set_threshold(adapter_name, threshold)
    return _summary(model, adapter_name, config.scope, layers)


def selection_summary(model: nn.Module, adapter_name: str | None = None) -> SelectionSummary:
    """Counts of candidates and active elements per targeted weight."""
    adapter_name, layers = _layers(model, adapter_name)
    config = _config(model, adapter_name)
    return _summary(model, adapter_name, config.scope if config is not None else "global", layers)
