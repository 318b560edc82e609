"""Variational Fisher estimate (supplementary Eq. 7 -> 12 -> 13), combined by Eq. 14/15.

Posterior q(θ) = N(θ̂, diag σ²), prior p(θ) = N(θ_pt, τ²I), objective
    s·E_q[L(θ)] + γ·KL(q ‖ p)        (Eq. 7; s = data_scale, 1 = the literal paper)
whose stationary point in the precision Λ = σ⁻² is
    γΛ = s·F + γτ⁻²                    (Eq. 12)  =>  F̂ = γ(Λ − τ⁻²)/s, clamped at 0 (Eq. 13).

Two ways to reach the optimum (`variational_method`):

* ``"natural"`` (default; Khan et al. 2018, VOGN/Vadam): draw θ = θ̂ + σ⊙ξ, ξ ~ N(0, I), σ = Λ^{-1/2},
  take the squared-gradient statistic ĝ² at θ and update
      Λ ← (1 − β_t)Λ + β_t(s·ĝ²/γ + τ⁻²)
  with β_t = 1/(t + 1) (`fisher_average="mean"`, default: Λ − τ⁻² is the running mean of s·ĝ²/γ over all of
  stage 2) or β_t = max(β, 1/(t + 1)) (`"ema"`, β = `variational_lr`). We store P = Λ − τ⁻² (the precision the
  data added): Λ ≈ τ⁻² = 10⁴ at the paper's τ, and fp32 would round most of F away in Λ − τ⁻².
  γ and s cancel in F̂ = (γ/s)·P; they act through σ (the weight jitter, σ² = 1/(s·F/γ + τ⁻²)) and, in stage 3,
  through the prior pull (`prior_pull_loss`); docs/fisher.md derives both.
  x and x' use the same weight sample θ (common random numbers, one sample per step, σ from Λ_x); the x' pass
  feeds the per-draw ΔF exactly as in the empirical estimate, so Λ_x' is never stored.
* ``"reparam"``: Adam on u = log(σ/τ) with the reparameterization-trick gradient
      ∂/∂u = s·g⊙ξ⊙σ + γ(σ²/τ² − 1),  g = ∇L(θ̂ + σ⊙ξ) (mean over the mini-batch),
  whose expectation vanishes at Eq. 12. Three weight-sized buffers per estimate (x and x'); ΔF is taken
  between the two final estimates, weighted by the mean w (its draws are not separable). Slow and noisy.

Weight samples are made per layer inside the forward and regenerated in backward (`weight_sampling.py`):
no full-model copy of θ exists in batch mode and in the per-sample loop; per-sample vmap differentiates at a
materialized θ (one model copy, beside the vmap chunk's per-sample gradients). ξ comes from a counter-based
key (seed, step, weight index), the same on every process. Under several processes the step statistic is
reduced across processes before the update, so W processes with one micro-batch each equal 1 process with W
micro-batches per step.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch
from torch.profiler import record_function

from .buffers import as_fp32
from .errors import FisherInputError, finite_float
from .estimator import FisherEstimator, cfg_value, check_finite, warn_uncalled
from .fused import FusedKernels, scalar
from .gradients import batch_size_of
from .micro_batch import PassChecks
from .scores import DRFIMResult, combine_dr_fim, delta_fisher, delta_fisher_, relative_eps
from .seeds import check_addressable, counter_key_tensors, derived_normal
from .weight_sampling import checkpoint_blocks, stream_sampled_grads

logger = logging.getLogger("peft_fishertune.fisher")

_XI_STREAM = 0xE1

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
AVERAGES = ("mean", "ema")


def _labelled(fold):
    """`fold` inside the profiler region `fishertune::fold` (benchmarks/fisher_cost.py --profile)."""

    def run(i, g):
        with record_function("fishertune::fold"):
            fold(i, g)

    return run


class VariationalFisherEstimator(FisherEstimator):
    """Variational (Eq. 13) Fisher of x, and the w-weighted ΔF of x' (natural) or Eq. 15 on Λ_x, Λ_x' (reparam).

    `VariationalFisherEstimator(model, config=None, params={name: parameter}, loss_fn=None, accelerator=None, *,
    method=None, gamma=None, tau=None, data_scale=None, lr=None, average=None, mode=None, perturb=True, ...)`;
    unset values come from `config` (variational_method, gamma, tau, data_scale, variational_lr, fisher_average,
    fisher_mode).
    """

    kind = "variational"

    def __init__(self, model, config=None, params=None, loss_fn=None, accelerator=None, *, method=None,
                 gamma=None, tau=None, data_scale=None, lr=None, average=None, antithetic: bool = False,
                 regenerate_samples: Optional[bool] = None, checkpointing: Optional[bool] = None,
                 fused_kernels: Optional[bool] = None, **kwargs):
        super().__init__(model, config, params, loss_fn, accelerator, **kwargs)
        checkpointing = checkpointing if checkpointing is not None else cfg_value(config, "estimator_checkpointing",
                                                                                  True)
        if not isinstance(checkpointing, bool):
            raise FisherInputError(f"checkpointing={checkpointing!r}; expected None, True or False")
        self.checkpointing = checkpointing
        self.blocks = checkpoint_blocks(model, self.paths) if checkpointing else []
        if regenerate_samples is None:  # default: regenerate (no transient copy of the targeted weights)
            regenerate_samples = True
        if not isinstance(regenerate_samples, bool):
            raise FisherInputError(f"regenerate_samples={regenerate_samples!r}; expected None, True or False")
        self.regenerate_samples = regenerate_samples
        self.method = method if method is not None else cfg_value(config, "variational_method", "natural")
        if self.method not in ("natural", "reparam"):
            raise FisherInputError(f"method={self.method!r}; expected 'natural' or 'reparam'")
        self.gamma = finite_float("gamma", gamma if gamma is not None else cfg_value(config, "gamma", 0.01),
                                  positive=True)
        self.tau = finite_float("tau", tau if tau is not None else cfg_value(config, "tau", 0.01), positive=True)
        ds = data_scale if data_scale is not None else cfg_value(config, "data_scale", None)
        self.data_scale = finite_float("data_scale", 1.0 if ds is None else ds, positive=True)
        self.lr = finite_float("lr", lr if lr is not None else cfg_value(config, "variational_lr", 0.05),
                               positive=True)
        self.average = average if average is not None else cfg_value(config, "fisher_average", "mean")
        if self.average not in AVERAGES:
            raise FisherInputError(f"average={self.average!r}; expected one of {list(AVERAGES)}")
        if self.method == "natural" and self.lr > 1:
            raise FisherInputError(f"variational_lr={self.lr} is the natural method's β; expected 0 < β <= 1")
        if self.method == "reparam" and self.average == "ema":
            raise FisherInputError("fisher_average='ema' applies to the natural method's precision; the reparam "
                                   "method is an Adam optimisation (no average to choose): use fisher_average='mean'")
        if not isinstance(antithetic, bool):
            raise FisherInputError(f"antithetic={antithetic!r}; expected True or False")
        self.antithetic = antithetic
        self.signs = (1.0, -1.0) if antithetic else (1.0,)
        self._sign = 1.0
        if self.method == "reparam":
            self.mode = "gradient"  # reparam uses the mini-batch gradient, not a squared statistic
        try:
            check_addressable(self.params)
        except ValueError as exc:
            raise FisherInputError(str(exc)) from None
        self.buffers: dict[str, dict[str, list[torch.Tensor]]] = {}
        if self.method == "natural":
            self.buffers["x"] = {"prec": self._zeros()}
            self.sums_df = self._zeros() if self.dr_on else None
            self.sums_xp = self._zeros() if self.dr_on and self.keep_fisher_xp else None
        else:
            for tag in (["x", "xp"] if self.dr_on else ["x"]):
                self.buffers[tag] = {b: self._zeros() for b in ("u", "m", "v")}
            self.sums_df = self.sums_xp = None
        self.units = 0
        # the streamed natural step's finite checks (and ε's total): read once per pass (micro_batch.PassChecks) or
        # weight by weight; None: once per pass where a targeted weight is off the CPU (a read is a device sync
        # there, and costs nothing on the CPU)
        self.defer_checks: Optional[bool] = None
        self.num_samples = 0
        try:
            self.kernels = FusedKernels.for_params(self.params, fused_kernels) if self.method == "natural" else None
        except ValueError as exc:
            raise FisherInputError(str(exc)) from None
        if self.kernels is not None:
            logger.info("variational Fisher: fused CPU kernels for sampling and folding (%s; compiled once per "
                        "process)", self.kernels.reason)

    def describe(self) -> str:
        return f"variational/{self.method}, {self.mode}, DR term {'on' if self.dr_on else 'off'}"

    def owned_tensors(self) -> list[torch.Tensor]:
        out = [t for bufs in self.buffers.values() for group in bufs.values() for t in group]
        return out + [t for group in (self.sums_df, self.sums_xp) if group for t in group]

    def memory_bound(self) -> int:
        if self.method == "natural":
            return self.numel * (1 + int(self.dr_on) + int(self.sums_xp is not None))
        return self.numel * 3 * (1 + int(self.dr_on))

    # ------------------------------------------------------------------ math
    @property
    def prior_precision(self) -> float:
        return self.tau**-2

    def _sigma(self, tag: str, i: int, device, work: Optional[torch.Tensor] = None) -> torch.Tensor:
        """σ of weight i in float32 on `device`, written into `work` when given (else a new tensor)."""
        b = self.buffers[tag]
        if self.method == "natural":
            return as_fp32(b["prec"][i], work).to(device).add_(self.prior_precision).rsqrt_()
        return as_fp32(b["u"][i], work).to(device).exp_().mul_(self.tau)

    def data_precision(self, tag: str = "x") -> dict[str, torch.Tensor]:
        """Λ − τ⁻² per element (fp32), without forming the large Λ."""
        b = self.buffers[tag]
        if self.method == "natural":
            return {n: t.float().clone() for n, t in zip(self.names, b["prec"])}
        return {n: self.prior_precision * torch.expm1(-2.0 * u.float()) for n, u in zip(self.names, b["u"])}

    def precision(self, tag: str = "x") -> dict[str, torch.Tensor]:
        """Λ = σ⁻² per element, in float64 (so Eq. 12 can be checked without fp32 cancellation)."""
        return {n: t.double() + self.prior_precision for n, t in self.data_precision(tag).items()}

    def fisher(self, tag: str = "x") -> dict[str, torch.Tensor]:
        """F̂ = γ(Λ − τ⁻²)/data_scale, clamped at 0 (Eq. 13)."""
        k = self.gamma / self.data_scale
        return {n: (t * k).clamp_min_(0.0) for n, t in self.data_precision(tag).items()}

    def _xi_keys(self, i: int) -> tuple[int, ...]:
        """The keys of weight i's noise this step: the same ξ in every pass of the step (x and x', forward and
        recompute), another one each step."""
        return _XI_STREAM, self.seed, self.steps, i

    def _xi(self, i: int, device, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        return derived_normal(self.params[self.names[i]].shape, *self._xi_keys(i), device=device, out=out)

    def _maker(self, tag: str, i: int, sign: float):
        p = self.params[self.names[i]]

        def make() -> torch.Tensor:
            """θ = θ̂ + sign·σ⊙ξ: σ and ξ in work buffers 0 and 1 (nothing allocated but θ itself)."""
            with torch.no_grad(), record_function("fishertune::weight_sample"):
                if self.kernels is not None and self.kernels.usable:  # one fused loop, ξ computed inside (as _xi)
                    prior, sgn = scalar(self.prior_precision, p), scalar(sign, p)
                    if p.is_contiguous():
                        keys = counter_key_tensors(*self._xi_keys(i))
                        return self.kernels.run("sample_counter", p.detach(), self.buffers[tag]["prec"][i], prior,
                                                sgn, *keys)
                    xi = self._xi(i, p.device, out=self._work(1, i))
                    return self.kernels.run("sample", p.detach(), self.buffers[tag]["prec"][i], xi, prior, sgn)
                sigma = self._sigma(tag, i, p.device, self._work(0, i))
                xi = self._xi(i, p.device, out=self._work(1, i))
                theta = torch.addcmul(p.detach(), sigma, xi, value=sign)  # float32 (p.float() + sign·σ·ξ)
            return theta.to(p.dtype)

        return make

    # ------------------------------------------------------------------ passes
    def _grad_pass(self, batch, on_grad, tag: str = "x") -> None:
        makers = [self._maker(tag, i, self._sign) for i in range(len(self.names))]
        _, uncalled = stream_sampled_grads(self.model, batch, self.paths, makers, self.loss_fn, on_grad,
                                           regenerate=self.regenerate_samples, blocks=self.blocks)
        if uncalled:
            warn_uncalled(self, uncalled)

    def _vmap_weights(self) -> list[torch.Tensor]:
        return [self._maker("x", i, self._sign)() for i in range(len(self.names))]

    def _sq_stat(self, batch, fold) -> int:
        n = 0
        for sign in self.signs:
            self._sign = sign
            n = super()._sq_stat(batch, fold)
        self._sign = 1.0
        return n * len(self.signs)

    def _step(self, micro) -> None:
        if self.method == "natural":
            self._step_natural(micro)
        else:
            self._step_reparam(micro)
        self.num_samples += sum(batch_size_of(b) for b in micro)

    def _step_natural(self, micro) -> None:
        if (len(micro) == 1 and self.ranks.world_size == 1 and self.mode == "batch" and not self.antithetic
                and callable(self._step_natural_streamed)):
            self._step_natural_streamed(micro[0])
        else:
            self._step_natural_general(micro)

    def _step_natural_general(self, micro) -> None:
        t, k = self.steps, len(micro)
        cur = self._zeros(stat=True)
        xp_buf = self._zeros(stat=True) if self.dr_on and self.mode == "per_sample" else None
        single = k == 1 and self.ranks.world_size == 1
        step_acc = cur if single else self._zeros(compute=True)
        units = 0
        for j, batch in enumerate(micro):
            n = self._micro_stat(batch, cur, f"in variational step {t}, micro-batch {j}")
            if not single:
                for a, c in zip(step_acc, cur):
                    a.add_(c)
            if self.dr_on:
                self._dr_micro(batch, j, k, cur, n, self.sums_df, self.sums_xp, xp_buf)
            units += n
        count = torch.tensor([float(units)], dtype=torch.float32, device=step_acc[0].device)
        self.ranks.sum_(step_acc + [count])
        beta = 1.0 / (t + 1) if self.average == "mean" else max(self.lr, 1.0 / (t + 1))
        scale = beta * self.data_scale / self.gamma / float(count)
        for prec, s in zip(self.buffers["x"]["prec"], step_acc):
            if prec.dtype == torch.float32 and prec.device == s.device:
                prec.mul_(1.0 - beta).add_(s, alpha=scale)
            else:
                prec.copy_(prec.float().mul_(1.0 - beta).add_(s.to(prec.device), alpha=scale))
        self.units += int(units)

    def _deferred_checks(self) -> Optional[PassChecks]:
        """A `PassChecks` for one streamed pass when its checks are read once per pass, else None."""
        defer = self.defer_checks
        if defer is None:
            defer = any(p.device.type != "cpu" for p in self.params.values())
        return PassChecks(self.names) if defer else None

    def _step_natural_streamed(self, batch) -> None:
        """One process, one micro-batch, batch mode: the statistic goes straight into Λ, nothing weight-sized kept.

        x pass: each weight's ĝ² is checked and, with the DR term off, folded into P at once; with it on, kept
        in bfloat16 until the x' pass (half a copy of the targeted weights; F_j(x) enters ΔF_j and P rounded to
        8 mantissa bits). x' pass: as each weight's ĝ'² arrives, P and the ΔF accumulator are updated and the
        stored ĝ² is freed. Both passes sample θ with σ from P before this step's update (a weight's update
        comes after its own sample was last made), as in the general path.
        """
        t = self.steps
        beta = 1.0 / (t + 1) if self.average == "mean" else max(self.lr, 1.0 / (t + 1))
        scale = beta * self.data_scale / self.gamma
        prec = self.buffers["x"]["prec"]
        keep: Optional[list] = [None] * len(self.names) if self.dr_on else None
        total = [0.0]
        bad: list[str] = []
        kernels = self.kernels if self.kernels is not None and self.sums_xp is None else None
        checks = self._deferred_checks() if kernels is None else None
        if kernels is not None:
            ref = prec[0]
            k_beta, k_scale = scalar(1.0 - beta, ref), scalar(scale, ref)

        def fused_sum(i, g) -> Optional[float]:
            """Σĝ² of a gradient by a fused kernel, or None (name in `bad`) when ĝ² is not finite."""
            s = float(kernels.run("sum_sq", g))
            # a non-finite sum: an element is not finite (bad), or finite squares overflowed the sum (the eager check)
            return s if math.isfinite(s) or self._checked_square(i, g, bad) is not None else None

        def update(i, sq) -> None:  # P ← (1 − β)P + scale·ĝ², in float32, rounded once (work buffer 2)
            p = prec[i]
            if p.dtype == torch.float32 and p.device == sq.device:
                p.mul_(1.0 - beta).add_(sq, alpha=scale)
            else:
                p.copy_(as_fp32(p, self._work(2, i, p.device)).mul_(1.0 - beta).add_(sq.to(p.device), alpha=scale))

        @_labelled
        def fold_x(i, g) -> None:
            if kernels is not None and g is not None and not bad:
                if keep is None:
                    s = fused_sum(i, g)
                    if s is not None and not bad:
                        kernels.run("update", g, prec[i], k_beta, k_scale)
                else:
                    kept, s = kernels.run("square_keep", g)
                    s = float(s)
                    if math.isfinite(s) or self._checked_square(i, g, bad) is not None:
                        keep[i] = kept
                    else:
                        s = None
                if s is not None:
                    total[0] += s
                return
            sq = self._square_to_fold(i, g, bad, total, checks)
            if sq is None:
                return
            if keep is None:
                update(i, sq)
            else:
                keep[i] = sq.to(torch.bfloat16, copy=True)  # sq is work buffer 0

        self._grad_pass(batch, fold_x)
        if checks is not None:
            checks.settle(bad, total)
        self._raise_bad(bad, f"in variational step {t}", touched=keep is None)
        if keep is not None:
            eps = relative_eps(total[0] / self.numel, self.dr_eps)
            with self.perturbation.applied(self.model, batch, self._micro_index(0, 1)) as (batch_p, d):
                w = d.weight  # a float, read once (the draw lives on the CPU)
                if kernels is not None:
                    k_eps, k_w = scalar(eps, ref), scalar(w, ref)

                @_labelled
                def fold_xp(i, g) -> None:
                    if kernels is not None and g is not None and not bad:
                        if fused_sum(i, g) is not None and not bad:
                            kernels.run("update_dr", g, keep[i], prec[i], self.sums_df[i], k_beta, k_scale, k_eps,
                                        k_w)
                            keep[i] = None
                        return
                    sqp = self._square_to_fold(i, g, bad, total, checks)
                    if sqp is None:
                        return
                    fx = as_fp32(keep[i], self._work(1, i))  # sqp is work buffer 0; 2 is update's and ΔF's
                    keep[i] = None
                    update(i, fx)
                    if self.sums_xp is not None:
                        self._acc_add(self.sums_xp[i], sqp, slot=2)
                    self._acc_add(self.sums_df[i], delta_fisher_(fx, sqp, eps, work=self._work(2, i)),
                                  alpha=w, slot=2)

                self._grad_pass(batch_p, fold_xp)
                if checks is not None:
                    checks.settle(bad)
                self._raise_bad(bad, f"in variational step {t} (perturbed x')", touched=True)
            self.w_sum += w
            self.w_count += 1
        self.units += 1

    def _step_reparam(self, micro) -> None:
        t, k = self.steps, len(micro)
        for tag in self.buffers:
            acc = self._zeros(compute=True)
            units = 0
            for j, batch in enumerate(micro):

                def fold(i, g, _acc=acc):
                    if g is not None:
                        _acc[i].add_(g.float(), alpha=self._sign / len(self.signs))

                if tag == "x":
                    for sign in self.signs:
                        self._sign = sign
                        self._grad_pass(batch, fold, tag)
                else:
                    with self.perturbation.applied(self.model, batch, self._micro_index(j, k)) as (batch_p, d):
                        for sign in self.signs:
                            self._sign = sign
                            self._grad_pass(batch_p, fold, tag)
                    self.w_sum += d.weight
                    self.w_count += 1
                self._sign = 1.0
                units += 1
            count = torch.tensor([float(units)], dtype=torch.float32, device=acc[0].device)
            self.ranks.sum_(acc + [count])
            mean = [a.div_(count) for a in acc]
            check_finite(self.names, mean, f"in variational step {t} ({'perturbed x' if tag == 'xp' else 'x'})")
            b = self.buffers[tag]
            b1, b2 = ADAM_BETAS
            c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
            for i, g in enumerate(mean):
                u = b["u"][i]
                e = self._xi(i, g.device)
                sigma = self.tau * u.exp()
                grad_u = self.data_scale * g * e * sigma + self.gamma * torch.expm1(2.0 * u)
                b["m"][i].mul_(b1).add_(grad_u, alpha=1 - b1)
                b["v"][i].mul_(b2).addcmul_(grad_u, grad_u, value=1 - b2)
                u.addcdiv_(b["m"][i] / c1, (b["v"][i] / c2).sqrt_().add_(ADAM_EPS), value=-self.lr)
            if tag == "x":
                self.units += units

    # ------------------------------------------------------------------ results and state
    def _result(self) -> DRFIMResult:
        fx = self.fisher("x")
        fxp = None
        if not self.dr_on:
            delta = {n: torch.zeros_like(t) for n, t in fx.items()}
        elif self.method == "natural":
            (w_sum,) = self.ranks.sum_scalars([self.w_sum])
            delta = {}
            for n, t in zip(self.names, self.sums_df):
                delta[n] = t.float().clone()
            self.ranks.sum_(delta.values())
            delta = {n: t.div_(w_sum) for n, t in delta.items()}
            if self.sums_xp is not None:
                (units,) = self.ranks.sum_scalars([float(self.units)])
                fxp = {n: t.float().clone() for n, t in zip(self.names, self.sums_xp)}
                self.ranks.sum_(fxp.values())
                fxp = {n: t.div_(units) for n, t in fxp.items()}
        else:
            fxp = self.fisher("xp")
            delta = delta_fisher(fx, fxp, dr_eps=self.dr_eps)
        (num_samples,) = self.ranks.sum_scalars([float(self.num_samples)])
        scores = combine_dr_fim(fx, delta, lambda_dr=self.lambda_dr)
        meta = self._metadata(fx, delta)
        meta.update(method=self.method, gamma=self.gamma, tau=self.tau, data_scale=self.data_scale,
                    lr=self.lr if (self.method == "reparam" or self.average == "ema") else None,
                    average=self.average if self.method == "natural" else None,
                    prior_precision=self.prior_precision, regenerate_samples=self.regenerate_samples,
                    checkpointed_blocks=len(self.blocks))
        if self.method == "reparam":
            meta["per_sample_method"] = None
            meta["per_draw_w"] = False
        return DRFIMResult(scores, fx, fxp, delta, self._global_w(), self.kind, self.mode, int(num_samples),
                           self.steps, meta)

    def _consume(self) -> DRFIMResult:
        if self.method != "natural":
            return self._result()
        prec = self.buffers["x"]["prec"]
        meta_extra = dict(method=self.method, gamma=self.gamma, tau=self.tau, data_scale=self.data_scale,
                          lr=self.lr if self.average == "ema" else None, average=self.average,
                          prior_precision=self.prior_precision, regenerate_samples=self.regenerate_samples,
                          checkpointed_blocks=len(self.blocks))
        (num_samples,) = self.ranks.sum_scalars([float(self.num_samples)])
        self.buffers = {}  # the lists below are consumed in place
        return self._scores_from(prec, self.sums_df if self.dr_on else None, int(num_samples), meta_extra)

    def _state(self) -> dict[str, Any]:
        def copy(group):
            return None if group is None else [t.clone() for t in group]

        return {
            "method": self.method,
            "hyper": [self.gamma, self.tau, self.data_scale, self.lr],
            "average": self.average,
            "buffers": {tag: {b: copy(g) for b, g in bufs.items()} for tag, bufs in self.buffers.items()},
            "sums_df": copy(self.sums_df),
            "sums_xp": copy(self.sums_xp),
            "units": self.units,
            "num_samples": self.num_samples,
        }

    def _load(self, state) -> None:
        if state["method"] != self.method:
            raise FisherInputError(f"state_dict['method']={state['method']!r}, this estimator uses {self.method!r}")
        mine = [self.gamma, self.tau, self.data_scale, self.lr]
        if not all(math.isclose(a, b) for a, b in zip(state["hyper"], mine)):
            raise FisherInputError(f"state_dict['hyper'] (gamma, tau, data_scale, lr)={state['hyper']} differs from "
                                   f"this estimator's {mine}")
        if state["average"] != self.average:
            raise FisherInputError(f"state_dict['average']={state['average']!r}, this estimator uses {self.average!r}")
        if set(state["buffers"]) != set(self.buffers):
            raise FisherInputError(f"state_dict['buffers'] does not match this estimator (DR term "
                                   f"{'on' if self.dr_on else 'off'})")
        for tag, bufs in self.buffers.items():
            for b, group in bufs.items():
                self._check_shape(state["buffers"][tag][b], f"buffers.{tag}.{b}")
                for a, s in zip(group, state["buffers"][tag][b]):
                    a.copy_(s)
        for key in ("sums_df", "sums_xp"):
            group, theirs = getattr(self, key), state[key]
            if (group is None) != (theirs is None):
                raise FisherInputError(f"state_dict[{key!r}] does not match this estimator")
            if group is not None:
                for a, s in zip(group, theirs):
                    a.copy_(s)
        self.units = int(state["units"])
        self.num_samples = int(state["num_samples"])

    def _release(self) -> None:
        self.buffers = {}
        self.sums_df = self.sums_xp = None
