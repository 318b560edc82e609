"""DR-FIM score math (the bottom layer): ΔF, the λ mix, the result type, the prior pull.

    ΔF_d = |F_d(x) − F_d(x')| / (min(F_d(x), F_d(x')) + ε_d)            (Eq. 14, one perturbation draw d)
    ΔF   = Σ_d w_d ΔF_d / Σ_d w_d,  w_d = mean_c exp(−(|ε_μ,c| + |ε_σ,c|))  (each draw weighted by its own w)
    DRF  = (1 − λ)·F/mean F + λ·ΔF/mean ΔF                                  (λ = 0.5: an even mix)

ε_d = dr_eps · mean F_d(x) (relative: an absolute ε means nothing when Fisher values scale with the loss).
Both terms are divided by their global mean over all targeted elements, so each contributes a share
(1 − λ) and λ of the total score mass; w weights draws against each other and no longer rescales λ.
See docs/fisher.md for why (a global mean of w, ≈ 0.27, turned λ = 0.5 into an effective 0.2).

Nothing here knows about models or estimators.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .errors import FisherInputError
from .seeds import derived_generator

DEFAULT_DR_EPS = 1e-3
_SUBSAMPLE_STREAM = 0x5AB


@dataclass
class DRFIMResult:
    """What an estimator returns; all tensor dicts are keyed like the `params` it was given.

    Attributes:
        scores: the DR-FIM, {name: fp32 tensor shaped like the weight}; rank by this.
        fisher_x, delta_f: None in a result made with `result(consume=True)` (scores only, built in place).
        fisher_x: F(x) (running mean of squared gradients; for the variational estimate γ(Λ_x − τ⁻²)/data_scale).
        fisher_xp: F(x') when it was kept (`keep_fisher_xp=True`, or the variational "reparam" method), else None.
        delta_f: ΔF (Eq. 14): the w-weighted mean over draws of each draw's ΔF; zeros when the DR term is off.
        perturbation_weight: mean w over the draws (reported; each draw's own w weights its ΔF). 1.0 when off.
        estimator: "empirical" or "variational".
        mode: "per_sample" or "batch" (the statistic used); "gradient" for variational "reparam".
        num_samples: samples seen, all processes (per clean pass).
        num_steps: estimator steps taken.
        metadata: everything else (λ and the effective mix, per-sample method and why, γ, τ, ...).
    """

    scores: dict[str, torch.Tensor]
    fisher_x: Optional[dict[str, torch.Tensor]]
    fisher_xp: Optional[dict[str, torch.Tensor]]
    delta_f: Optional[dict[str, torch.Tensor]]
    perturbation_weight: float
    estimator: str
    mode: str
    num_samples: int
    num_steps: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def w(self) -> float:
        return self.perturbation_weight


def global_mean(tensors: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> float:
    """Mean over every element of every tensor (a float32 sum per tensor -- torch sums pairwise, so it is accurate
    to ~1e-7 and ~100x faster on CPU than a float64 sum -- then Python floats across tensors)."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    total, count = 0.0, 0
    for t in values:
        total += float(t.sum(dtype=torch.float32))
        count += t.numel()
    return total / max(count, 1)


def relative_eps(mean_fisher: float, dr_eps: float = DEFAULT_DR_EPS) -> float:
    """ε of Eq. 14: dr_eps · mean F(x), or the smallest positive float when that is 0."""
    eps = dr_eps * mean_fisher
    return eps if eps > 0 else torch.finfo(torch.float32).tiny


def delta_fisher_tensor(fx: torch.Tensor, fxp: torch.Tensor, eps: float) -> torch.Tensor:
    """|F(x) − F(x')| / (min(F(x), F(x')) + ε) for one tensor (fp32)."""
    fx, fxp = fx.float(), fxp.float()
    return (fx - fxp).abs_().div_(torch.minimum(fx, fxp).add_(eps))


def delta_fisher_(fx: torch.Tensor, fxp: torch.Tensor, eps: float,
                  work: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`delta_fisher_tensor` written into `fx` (fp32, modified in place); returns `fx`. The denominator goes into
    `work` (fp32, fx's shape) when given, else into a temporary."""
    denom = (torch.minimum(fx, fxp) if work is None else torch.minimum(fx, fxp, out=work)).add_(eps)
    return fx.sub_(fxp).abs_().div_(denom)


def scores_in_place(fisher_x: list[torch.Tensor], delta_f: Optional[list[torch.Tensor]], *, lambda_dr: float,
                    mean_f: float, mean_df: float) -> list[torch.Tensor]:
    """`combine_dr_fim` on accumulators proportional to F and ΔF, consuming them (the lean path of a run).

    Each F entry becomes its fp32 score in place (a copy only when it is not fp32) and each ΔF entry is dropped
    from its list once added, so the extra memory is one tensor. The means are those of the lists as given:
    a constant factor on F or on ΔF cancels in the score, so accumulators need not be normalised first.
    """
    a = (1.0 - lambda_dr) / mean_f if mean_f > 0 and lambda_dr < 1 else 0.0
    b = lambda_dr / mean_df if delta_f is not None and mean_df > 0 and lambda_dr > 0 else 0.0
    out = []
    for i in range(len(fisher_x)):
        f = fisher_x[i]
        fisher_x[i] = None
        s = f if f.dtype == torch.float32 else f.float()
        del f
        s.clamp_min_(0.0).mul_(a)
        if delta_f is not None:
            d = delta_f[i]
            delta_f[i] = None
            if b:
                s.add_(d.to(s.device, torch.float32), alpha=b)
            del d
        out.append(s)
    return out


def delta_fisher(
    fisher_x: Mapping[str, torch.Tensor], fisher_xp: Mapping[str, torch.Tensor], *, dr_eps: float = DEFAULT_DR_EPS
) -> dict[str, torch.Tensor]:
    """ΔF of one pair of estimates, ε = dr_eps · global mean F(x) (Eq. 14)."""
    if set(fisher_x) != set(fisher_xp):
        raise FisherInputError("fisher_x and fisher_xp have different parameter names")
    eps = relative_eps(global_mean(fisher_x), dr_eps)
    return {n: delta_fisher_tensor(fisher_x[n], fisher_xp[n], eps) for n in fisher_x}


def combine_dr_fim(
    fisher_x: Mapping[str, torch.Tensor],
    delta_f: Mapping[str, torch.Tensor],
    *,
    lambda_dr: float,
) -> dict[str, torch.Tensor]:
    """DRF = (1 − λ)·F/mean F + λ·ΔF/mean ΔF (a term whose mean is 0 contributes 0).

    ΔF already carries each draw's w (see `delta_fisher` / the estimators); λ applies as written.
    """
    if not isinstance(lambda_dr, (int, float)) or not 0.0 <= lambda_dr <= 1.0:
        raise FisherInputError(f"lambda_dr={lambda_dr!r}; expected a number in [0, 1]")
    mf, md = global_mean(fisher_x), global_mean(delta_f)
    out = {}
    for n, f in fisher_x.items():
        s = torch.zeros_like(f, dtype=torch.float32)
        if mf > 0 and lambda_dr < 1:
            s.add_(f.float(), alpha=(1.0 - lambda_dr) / mf)
        if md > 0 and lambda_dr > 0:
            s.add_(delta_f[n].float(), alpha=lambda_dr / md)
        out[n] = s
    return out


def mix_report(
    fisher_x: Mapping[str, torch.Tensor],
    delta_f: Optional[Mapping[str, torch.Tensor]],
    *,
    lambda_dr: float,
    top_fraction: float = 0.15,
    sample_size: int = 1 << 16,
    seed: int = 0,
) -> dict[str, float]:
    """How much the DR term weighs in the scores.

    `lambda_effective`: share of the total score mass from the ΔF term (= λ when both terms are non-zero).
    `dr_share_top`: mean share of the ΔF term in the scores of the top `top_fraction` elements, estimated on a
    fixed random subsample of `sample_size` elements (a heavy-tailed F can dominate the top even at λ = 0.5).
    Either input may be scaled by a positive constant (the shares do not change); `delta_f=None` is ΔF = 0.
    """
    mf = global_mean(fisher_x)
    md = global_mean(delta_f) if delta_f is not None else 0.0
    a = (1.0 - lambda_dr) / mf if mf > 0 else 0.0
    b = lambda_dr / md if md > 0 else 0.0
    mass_f, mass_d = (a * mf, b * md)
    lam_eff = mass_d / (mass_f + mass_d) if mass_f + mass_d > 0 else 0.0
    names = list(fisher_x)
    sizes = torch.tensor([fisher_x[n].numel() for n in names], dtype=torch.float64)
    total = int(sizes.sum())
    k = min(sample_size, total)
    g = derived_generator(_SUBSAMPLE_STREAM, seed)
    flat_idx = torch.randint(0, total, (k,), generator=g) if k < total else torch.arange(total)
    offsets = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.float64), sizes]), 0).long()
    f_s = torch.empty(k, dtype=torch.float64)
    d_s = torch.empty(k, dtype=torch.float64)
    which = torch.searchsorted(offsets[1:], flat_idx, right=True)
    for i, n in enumerate(names):
        sel = (which == i).nonzero().flatten()
        if sel.numel():
            local = (flat_idx[sel] - offsets[i]).to(fisher_x[n].device)
            f_s[sel] = fisher_x[n].reshape(-1)[local].double().cpu()
            d_s[sel] = delta_f[n].reshape(-1)[local].double().cpu() if delta_f is not None else 0.0
    s_f, s_d = a * f_s, b * d_s
    score = s_f + s_d
    top = max(1, int(round(top_fraction * k)))
    idx = torch.topk(score, top).indices
    denom = score[idx]
    share = torch.where(denom > 0, s_d[idx] / denom.clamp_min(1e-300), torch.zeros_like(denom))
    return {"lambda_effective": float(lam_eff), "dr_share_top": float(share.mean()), "top_fraction": top_fraction}


# --------------------------------------------------------------------------- Eq. 7's prior pull
def prior_pull_coefficient(gamma: float, tau: float, data_scale: Optional[float] = None) -> float:
    """κ = (γ / s)·τ⁻² of the pull κ‖θ̂ − θ_pt‖²/2 (s = data_scale, None = 1; docs/fisher.md derives it)."""
    s = 1.0 if data_scale is None else float(data_scale)
    return float(gamma) / s / float(tau) ** 2


def prior_pull(deltas: Iterable[torch.Tensor], coefficient: float) -> torch.Tensor:
    """κ/2 · Σ ‖δ‖² over the given deltas θ̂ − θ_pt (a scalar that backpropagates into them)."""
    total = None
    for d in deltas:
        term = d.float().square().sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return 0.5 * coefficient * total
