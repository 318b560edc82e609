"""Variational Fisher estimate (supplementary Eq. 7 -> 12 -> 13, combined by Eq. 14/15).

Posterior q(θ) = N(θ̂, diag σ²), prior p(θ) = N(θ_pt, τ²I), objective
    s·E_q[L(θ)] + γ·KL(q ‖ p)        (Eq. 7; s = data_scale, 1 = the literal paper)
whose stationary point in the precision Λ = σ⁻² is
    γΛ = s·F + γτ⁻²                    (Eq. 12)  =>  F̂ = γ(Λ − τ⁻²)/s, clamped at 0 (Eq. 13).
We divide by s so F̂ is in the units of the empirical Fisher for every s (with s = 1
this is Eq. 13 literally).

Two ways to reach the optimum (`variational_method`):

* ``"natural"`` (default; Khan et al. 2018, VOGN/Vadam): draw θ = θ̂ + σ⊙ξ, ξ ~ N(0, I),
  σ = Λ^{-1/2}, take the squared gradient statistic ĝ² at θ (mean of per-sample squared
  gradients in ``per_sample`` mode = VOGN; squared mini-batch gradient in ``batch`` mode
  = Vadam) and update
      Λ ← (1 − β_t)Λ + β_t(s·ĝ²/γ + τ⁻²),   β_t = max(β, 1/(t + 1))
  whose fixed point is Eq. 12. β = `variational_lr`; the 1/(t+1) floor makes the first
  1/β steps an exact running mean instead of an EMA biased toward the prior start.
  We store P = Λ − τ⁻² (the precision the data added), not Λ: Λ ≈ τ⁻² = 10⁴ at the
  paper's τ, and fp32 would round most of F away in Λ − τ⁻² (ulp(10⁴) ≈ 10⁻³).
  One weight-sized buffer per estimate (x and x'), no optimizer state.
* ``"reparam"``: Adam on u = log(σ/τ) (log σ shifted by the constant log τ, which keeps
  fp32 resolution near u = 0) with the reparameterization-trick gradient
      ∂/∂u = s·g⊙ξ⊙σ + γ(σ²/τ² − 1),  g = ∇L(θ̂ + σ⊙ξ) (mean over the mini-batch),
  whose expectation vanishes at Eq. 12 (with F the Hessian diagonal). Three weight-sized
  buffers per estimate (u and Adam's two moments). Slow and noisy; see docs/fisher.md.

Weight samples are substituted with `torch.func.functional_call`: the model's weights
are never written, so "restoring" them is exact and exception-safe, at the cost of one
temporary weight-sized tensor per forward (the same as saving θ̂ for an in-place restore).

ξ is the same for the x and x' estimates of a step (common random numbers) and on every
process (drawn from (seed, step)). Under several processes the gradient statistic of each
step is reduced across processes before the update, so W processes with one micro-batch
each equal 1 process with W micro-batches per step.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from ._base import EstimatorBase, _cfg
from ._common import FisherInputError, batch_gradient, batch_size_of, check_finite, derived_generator, finite_float
from .drfim import DRFIMResult, combine_dr_fim, delta_fisher

_XI_STREAM = 0xE1

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class VariationalFisherEstimator(EstimatorBase):
    """Variational (Eq. 13) Fisher of x and x'.

    `VariationalFisherEstimator(model, config=None, params=None, loss_fn=None, accelerator=None, *,
    method=None, gamma=None, tau=None, data_scale=None, lr=None, mode=None, perturb=True, ...)`;
    unset values come from `config` (variational_method, gamma, tau, data_scale, variational_lr,
    fisher_mode).
    """

    kind = "variational"

    def __init__(self, model, config=None, params=None, loss_fn=None, accelerator=None, *, method=None,
                 gamma=None, tau=None, data_scale=None, lr=None, antithetic: bool = False, **kwargs):
        super().__init__(model, config, params, loss_fn, accelerator, **kwargs)
        self.method = method if method is not None else _cfg(config, "variational_method", "natural")
        if self.method not in ("natural", "reparam"):
            raise FisherInputError(f"method={self.method!r}; expected 'natural' or 'reparam'")
        self.gamma = finite_float("gamma", gamma if gamma is not None else _cfg(config, "gamma", 0.01), positive=True)
        self.tau = finite_float("tau", tau if tau is not None else _cfg(config, "tau", 0.01), positive=True)
        ds = data_scale if data_scale is not None else _cfg(config, "data_scale", None)
        self.data_scale = finite_float("data_scale", 1.0 if ds is None else ds, positive=True)
        self.lr = finite_float("lr", lr if lr is not None else _cfg(config, "variational_lr", 0.05), positive=True)
        if self.method == "natural" and self.lr > 1:
            raise FisherInputError(f"variational_lr={self.lr} is the natural method's β; expected 0 < β <= 1")
        if not isinstance(antithetic, bool):
            raise FisherInputError(f"antithetic={antithetic!r}; expected True or False")
        self.antithetic = antithetic
        if self.method == "reparam":
            self.mode = "gradient"  # reparam uses the mini-batch gradient, not a squared statistic
        self.tags = ["x", "xp"] if self.perturbed else ["x"]
        self.buffers: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for tag in self.tags:
            names = ["prec"] if self.method == "natural" else ["u", "m", "v"]
            self.buffers[tag] = {
                b: {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in self.params.items()}
                for b in names
            }
        self.num_samples = 0

    def describe(self) -> str:
        return f"variational/{self.method}, {self.mode}"

    # ------------------------------------------------------------------ math
    @property
    def prior_precision(self) -> float:
        return self.tau**-2

    def _sigma(self, tag: str, name: str) -> torch.Tensor:
        b = self.buffers[tag]
        if self.method == "natural":
            return (b["prec"][name] + self.prior_precision).rsqrt()
        return self.tau * b["u"][name].exp()

    def data_precision(self, tag: str = "x") -> dict[str, torch.Tensor]:
        """Λ − τ⁻² per element (fp32), without forming the large Λ."""
        b = self.buffers[tag]
        if self.method == "natural":
            return {n: t.clone() for n, t in b["prec"].items()}
        return {n: self.prior_precision * torch.expm1(-2.0 * u) for n, u in b["u"].items()}

    def precision(self, tag: str = "x") -> dict[str, torch.Tensor]:
        """Λ = σ⁻² per element, in float64 (so Eq. 12 can be checked without fp32 cancellation)."""
        return {n: t.double() + self.prior_precision for n, t in self.data_precision(tag).items()}

    def fisher(self, tag: str = "x") -> dict[str, torch.Tensor]:
        """F̂ = γ(Λ − τ⁻²)/data_scale, clamped at 0 (Eq. 13)."""
        k = self.gamma / self.data_scale
        return {n: (t * k).clamp_min_(0.0) for n, t in self.data_precision(tag).items()}

    def _draw_xi(self) -> list[torch.Tensor]:
        g = derived_generator(_XI_STREAM, self.seed, self.steps)
        return [torch.randn(self.params[n].shape, generator=g, dtype=torch.float32).to(self.params[n].device)
                for n in self.names]

    def _sample_weights(self, tag: str, xi: list[torch.Tensor], sign: float = 1.0) -> dict[str, torch.Tensor]:
        out = {}
        for n, e in zip(self.names, xi):
            p = self.params[n]
            out[self.paths[n]] = (p.detach().float() + sign * self._sigma(tag, n) * e).to(p.dtype)
        return out

    def _micro(self, tag: str, micro, j: int, batch):
        if tag == "x":
            return contextlib.nullcontext((batch, None))
        return self.perturbation.applied(self.model, batch, self._micro_index(j, len(micro)))

    def _step(self, micro) -> None:
        xi = self._draw_xi()
        t = self.steps
        # antithetic pairs (θ̂ ± σ⊙ξ): the reparam gradient uses ½(g₊ − g₋), which cancels the
        # zero-mean g(θ̂)⊙ξ term that dominates its variance; natural averages ĝ² over the pair.
        signs = (1.0, -1.0) if self.antithetic else (1.0,)
        for tag in self.tags:
            acc = [torch.zeros(self.params[n].shape, dtype=torch.float32, device=self.params[n].device)
                   for n in self.names]
            units = 0
            for j, batch in enumerate(micro):
                with self._micro(tag, micro, j, batch) as (batch_used, d):
                    for sign in signs:
                        weights = self._sample_weights(tag, xi, sign)
                        if self.method == "natural":
                            stat, n_units = self._sq_grads(batch_used, weights)
                            coef = 1.0
                        else:
                            grads, _ = batch_gradient(self.model, batch_used, weights, self.loss_fn)
                            stat, n_units = grads, 1
                            coef = sign
                        for a, s in zip(acc, stat):
                            a.add_(s.float(), alpha=coef / len(signs) if self.method == "reparam" else 1.0)
                        if self.method == "natural" or sign == 1.0:
                            units += n_units
                if d is not None:
                    self.w_sum += d.weight
                    self.w_count += 1
            count = torch.tensor([float(units)], dtype=torch.float32, device=acc[0].device)
            self.ranks.sum_(acc + [count])
            mean = [a.div_(count) for a in acc]
            check_finite(self.names, mean, f"in variational step {t} ({'perturbed x' if tag == 'xp' else 'x'})")
            b = self.buffers[tag]
            if self.method == "natural":
                beta = max(self.lr, 1.0 / (t + 1))
                for n, g2 in zip(self.names, mean):
                    b["prec"][n].mul_(1.0 - beta).add_(g2, alpha=beta * self.data_scale / self.gamma)
            else:
                b1, b2 = ADAM_BETAS
                c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
                for n, g, e in zip(self.names, mean, xi):
                    u = b["u"][n]
                    sigma = self.tau * u.exp()
                    grad_u = self.data_scale * g * e * sigma + self.gamma * torch.expm1(2.0 * u)
                    b["m"][n].mul_(b1).add_(grad_u, alpha=1 - b1)
                    b["v"][n].mul_(b2).addcmul_(grad_u, grad_u, value=1 - b2)
                    u.addcdiv_(b["m"][n] / c1, (b["v"][n] / c2).sqrt_().add_(ADAM_EPS), value=-self.lr)
        self.num_samples += sum(batch_size_of(b) for b in micro)

    # ------------------------------------------------------------------ results and state
    def _result(self) -> DRFIMResult:
        fx = self.fisher("x")
        if self.perturbed:
            fxp = self.fisher("xp")
            delta = delta_fisher(fx, fxp, dr_eps=self.dr_eps)
        else:
            fxp, delta = None, {n: torch.zeros_like(t) for n, t in fx.items()}
        w = self._global_w()
        (num_samples,) = self.ranks.sum_scalars([float(self.num_samples)])
        scores = combine_dr_fim(fx, delta, lambda_dr=self.lambda_dr, w=w)
        meta = self._metadata()
        meta.update(method=self.method, gamma=self.gamma, tau=self.tau, data_scale=self.data_scale,
                    lr=self.lr, prior_precision=self.prior_precision)
        if self.method == "reparam":
            meta["per_sample_method"] = None
        return DRFIMResult(scores, fx, fxp, delta, w, self.kind, self.mode, int(num_samples), self.steps, meta)

    def _state(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "hyper": [self.gamma, self.tau, self.data_scale, self.lr],
            "buffers": {tag: {b: {n: t.clone() for n, t in d.items()} for b, d in bufs.items()}
                        for tag, bufs in self.buffers.items()},
            "num_samples": self.num_samples,
        }

    def _load(self, state) -> None:
        if state["method"] != self.method:
            raise FisherInputError(f"state_dict['method']={state['method']!r}, this estimator uses {self.method!r}")
        if not all(math.isclose(a, b) for a, b in zip(state["hyper"], [self.gamma, self.tau, self.data_scale, self.lr])):
            raise FisherInputError(f"state_dict['hyper'] (gamma, tau, data_scale, lr)={state['hyper']} differs from "
                                   f"this estimator's {[self.gamma, self.tau, self.data_scale, self.lr]}")
        if set(state["buffers"]) != set(self.buffers):
            raise FisherInputError("state_dict['buffers'] does not match perturb=%s" % self.perturbed)
        for tag, bufs in self.buffers.items():
            for b, d in bufs.items():
                self._check_shape(state["buffers"][tag][b], f"buffers.{tag}.{b}")
                for n in self.names:
                    d[n].copy_(state["buffers"][tag][b][n])
        self.num_samples = int(state["num_samples"])

    def _release(self) -> None:
        self.buffers = {}
