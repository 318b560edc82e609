"""DR-FIM (Eq. 14/15 as METHOD.md reads them): result type, combination, and the
entry points that pick the estimator from the config.

    ΔF  = |F(x) − F(x')| / (min(F(x), F(x')) + ε)                       (Eq. 14)
    DRF = (1 − λ)·F̂(x) + λ·w·ΔF̂,   F̂ = F(x)/mean F(x),  ΔF̂ = ΔF/mean ΔF

with w = exp(−(|ε_μ| + |ε_σ|)) (mean over channels, then over the micro-batches'
draws). Means are global over all targeted elements. ε is relative:
ε = dr_eps · mean F(x) (interpretation: an absolute ε means nothing when Fisher
values span orders of magnitude with the loss scale). For the variational
estimate the same formula is applied to F̂ = γ(Λ − τ⁻²) of x and x' (Eq. 15 after
Eq. 13; the literal Eq. 15 puts min(Λ) = min F/γ + τ⁻² in the denominator, i.e.
an extra γτ⁻² inside ε, which at the paper's γ = τ = 0.01 is 100 and flattens ΔF).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ._common import FisherInputError

DEFAULT_DR_EPS = 1e-3


@dataclass
class DRFIMResult:
    """What an estimator returns; all tensor dicts are keyed like `target_parameters(model)`.

    Attributes:
        scores: the DR-FIM, {name: fp32 tensor shaped like the weight}; rank by this.
        fisher_x: F(x) (empirical mean of squared gradients, or variational γ(Λ_x − τ⁻²)/data_scale).
        fisher_xp: F(x'), or None when the perturbation was off.
        delta_f: ΔF (Eq. 14), zeros when the perturbation was off.
        perturbation_weight: w, mean over the micro-batches' draws (1.0 when off).
        estimator: "empirical" or "variational".
        mode: "per_sample" or "batch" (the statistic used); "gradient" for variational "reparam".
        num_samples: samples seen, all processes (per clean pass).
        num_steps: estimator steps taken.
        metadata: everything else (per-sample method and why, γ, τ, data_scale, λ, ...).
    """

    scores: dict[str, torch.Tensor]
    fisher_x: dict[str, torch.Tensor]
    fisher_xp: Optional[dict[str, torch.Tensor]]
    delta_f: dict[str, torch.Tensor]
    perturbation_weight: float
    estimator: str
    mode: str
    num_samples: int
    num_steps: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def w(self) -> float:
        return self.perturbation_weight


def _global_mean(tensors: Mapping[str, torch.Tensor]) -> float:
    total = sum(float(t.double().sum()) for t in tensors.values())
    count = sum(t.numel() for t in tensors.values())
    return total / max(count, 1)


def delta_fisher(
    fisher_x: Mapping[str, torch.Tensor], fisher_xp: Mapping[str, torch.Tensor], *, dr_eps: float = DEFAULT_DR_EPS
) -> dict[str, torch.Tensor]:
    """ΔF = |F(x) − F(x')| / (min(F(x), F(x')) + ε), ε = dr_eps · mean F(x) (Eq. 14)."""
    if set(fisher_x) != set(fisher_xp):
        raise FisherInputError("fisher_x and fisher_xp have different parameter names")
    eps = dr_eps * _global_mean(fisher_x)
    if eps <= 0:
        eps = torch.finfo(torch.float32).tiny
    return {n: (fisher_x[n] - fisher_xp[n]).abs() / (torch.minimum(fisher_x[n], fisher_xp[n]) + eps) for n in fisher_x}


def combine_dr_fim(
    fisher_x: Mapping[str, torch.Tensor],
    delta_f: Mapping[str, torch.Tensor],
    *,
    lambda_dr: float,
    w: float,
) -> dict[str, torch.Tensor]:
    """DRF = (1 − λ)·F/mean F + λ·w·ΔF/mean ΔF (a term whose mean is 0 contributes 0)."""
    if not 0.0 <= lambda_dr <= 1.0:
        raise FisherInputError(f"lambda_dr={lambda_dr!r}; expected a number in [0, 1]")
    mf, md = _global_mean(fisher_x), _global_mean(delta_f)
    out = {}
    for n, f in fisher_x.items():
        s = torch.zeros_like(f)
        if mf > 0:
            s = s + (1.0 - lambda_dr) * f / mf
        if md > 0:
            s = s + lambda_dr * w * delta_f[n] / md
        out[n] = s
    return out


def make_estimator(model: nn.Module, config, params=None, loss_fn=None, accelerator=None, **kwargs):
    """The estimator `config.fisher_estimator` names ("variational" or "empirical")."""
    kind = getattr(config, "fisher_estimator", None)
    if kind == "variational":
        from .variational import VariationalFisherEstimator

        return VariationalFisherEstimator(model, config, params, loss_fn, accelerator, **kwargs)
    if kind == "empirical":
        from .empirical import EmpiricalFisherEstimator

        return EmpiricalFisherEstimator(model, config, params, loss_fn, accelerator, **kwargs)
    raise FisherInputError(f"config.fisher_estimator={kind!r}; expected 'variational' or 'empirical'")


# A name that reads well in the trainer: DRFIMEstimator(model, config, ...) -> the configured estimator.
DRFIMEstimator = make_estimator


def estimate_dr_fim(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    config,
    loss_fn=None,
    params: Optional[Mapping[str, nn.Parameter]] = None,
    accelerator=None,
    max_batches: Optional[int] = None,
    micro_batches_per_step: int = 1,
    progress: bool = True,
    **kwargs,
) -> DRFIMResult:
    """F(x) and F(x') in one pass over `batches`, ΔF and the DR-FIM scores.

    The estimator is `config.fisher_estimator`; `micro_batches_per_step` groups that many
    batches into one estimator step (matters for the variational estimate only, where
    one step = one weight sample and one precision update). Extra keyword arguments go
    to the estimator (e.g. `per_sample_method`, `input_key`, `data_scale`, `dr_eps`).
    """
    from tqdm.auto import tqdm

    if not isinstance(micro_batches_per_step, int) or micro_batches_per_step < 1:
        raise FisherInputError(f"micro_batches_per_step={micro_batches_per_step!r}; expected an integer >= 1")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise FisherInputError(f"max_batches={max_batches!r}; expected None or an integer >= 1")
    est = make_estimator(model, config, params, loss_fn, accelerator, **kwargs)
    try:
        total = None
        if max_batches is not None:
            total = max_batches
        elif hasattr(batches, "__len__"):
            total = len(batches)
        bar = tqdm(total=total, desc=f"DR-FIM ({est.describe()})", disable=not (progress and est.ranks.is_main))
        group: list = []
        n = 0
        for batch in batches:
            if max_batches is not None and n >= max_batches:
                break
            group.append(batch)
            n += 1
            if len(group) == micro_batches_per_step:
                est.step(group)
                group = []
            bar.update(1)
        bar.close()
        if group:
            est.step(group)
        if n == 0:
            raise FisherInputError("batches is empty: no data to estimate the Fisher information from")
        return est.result()
    finally:
        est.release()
