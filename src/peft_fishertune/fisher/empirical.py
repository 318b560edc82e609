"""Empirical diagonal Fisher: F = E[(∇_θ log p(y|x; θ))²] per element, a running mean over all steps.

* ``per_sample`` (the true empirical Fisher): mean over samples of per-sample squared gradients,
  from `torch.func` (grad + vmap, one chunk at a time) when the model allows it, otherwise (data-dependent
  Python control flow, list-valued batch entries such as Mask2Former's labels) from a loop over
  single-sample micro-batches. The choice is logged and recorded in the result's metadata.
* ``batch`` (the cheap, biased proxy): mean over mini-batches of the squared mean gradient. Streamed: each
  squared gradient goes into the accumulator as it arrives, and F(x) is kept (in the accumulator dtype) only
  until the x' pass has folded ΔF, so no float32 weight-sized buffer exists.

The gradient is that of the model's loss (`outputs.loss` or `loss_fn(outputs, batch)`), i.e. of −log p
averaged as the loss averages it (e.g. over pixels). Squared gradients are folded into the accumulators
weight by weight as autograd produces them (see `gradients.py`). Accumulators are summed locally and
reduced across processes (sums and counts) in `result()`, so 2 processes on halves of the data give what
1 process gives on all of it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .buffers import as_fp32
from .errors import FisherInputError
from .estimator import FisherEstimator
from .gradients import batch_size_of, stream_grads
from .scores import DRFIMResult, combine_dr_fim, delta_fisher_, global_mean, relative_eps


class EmpiricalFisherEstimator(FisherEstimator):
    """Streaming empirical Fisher of x, and the w-weighted ΔF of the perturbed x' (DR-FIM).

    `EmpiricalFisherEstimator(model, config=None, params={name: parameter}, loss_fn=None, accelerator=None,
    *, mode=None, perturb=True, per_sample_method="auto", input_key="pixel_values", keep_fisher_xp=False, ...)`;
    unset values come from `config` (fisher_mode, lambda_dr, seed, perturb_at, accumulator_dtype/device).
    """

    kind = "empirical"

    def __init__(self, model, config=None, params=None, loss_fn=None, accelerator=None, **kwargs):
        super().__init__(model, config, params, loss_fn, accelerator, **kwargs)
        self.sums_x = self._zeros()
        self.sums_df = self._zeros() if self.dr_on else None
        self.sums_xp = self._zeros() if self.dr_on and self.keep_fisher_xp else None
        self.count = 0  # units (samples or batches) per pass, this process
        self.num_samples = 0  # samples per pass, this process

    def owned_tensors(self) -> list[torch.Tensor]:
        return [t for group in (self.sums_x, self.sums_df, self.sums_xp) if group for t in group]

    def memory_bound(self) -> int:
        """Between steps: F(x) and ΔF accumulators (+ F(x') when kept). A step adds 1-2 transient E (see module)."""
        return self.numel * (1 + int(self.dr_on) + int(self.sums_xp is not None))

    def _grad_pass(self, batch, on_grad) -> None:
        stream_grads(self.model, batch, self.paths, list(self.params.values()), self.loss_fn, on_grad)

    def _vmap_weights(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def _step(self, micro) -> None:
        if self.mode == "batch":
            for j, batch in enumerate(micro):
                self._micro_streamed(batch, j, len(micro))
                self.count += 1
                self.num_samples += batch_size_of(batch)
        else:
            self._step_general(micro)

    def _step_general(self, micro) -> None:
        """Per-sample mode (and the reference for batch mode): a statistic buffer per micro-batch (F(x), and F(x')
        in per-sample mode: their samples' squared gradients summed), in the accumulator dtype."""
        k = len(micro)
        cur = self._zeros(stat=True)
        xp_buf = self._zeros(stat=True) if self.dr_on and self.mode == "per_sample" else None
        for j, batch in enumerate(micro):
            n = self._micro_stat(batch, cur, f"in step {self.steps}, micro-batch {j}")
            for acc, c in zip(self.sums_x, cur):
                self._acc_add(acc, c)
            if self.dr_on:
                self._dr_micro(batch, j, k, cur, n, self.sums_df, self.sums_xp, xp_buf)
            self.count += n
            self.num_samples += batch_size_of(batch)

    def _micro_streamed(self, batch, j: int, k: int) -> None:
        """Batch mode, one micro-batch: each ĝ² goes into F(x)'s accumulator as autograd produces it.

        With the DR term on, ĝ² is also kept, in the accumulator dtype (bfloat16 by default: half a copy of the
        targeted weights), until the x' pass folds w·ΔF weight by weight and frees it. No micro-batch statistic
        buffer is held (the general path's); with float32 accumulators the result is the general path's exactly.
        A non-finite gradient after some weights were folded ends the estimate.
        """
        where = f"in step {self.steps}, micro-batch {j}"
        keep: Optional[list] = [None] * len(self.names) if self.dr_on else None
        bad: list[str] = []
        touched = [False]

        def fold_x(i, g) -> None:
            sq = None if bad else self._checked_square(i, g, bad)
            if sq is None:
                return
            if g is not None:
                self._acc_add(self.sums_x[i], sq, slot=2)
                touched[0] = True
            if keep is not None:
                keep[i] = sq.to(self.sums_x[i].dtype, copy=True)  # sq is work buffer 0

        self._grad_pass(batch, fold_x)
        self._raise_bad(bad, where, touched=touched[0])
        if keep is None:
            return
        eps = relative_eps(global_mean(keep), self.dr_eps)
        with self.perturbation.applied(self.model, batch, self._micro_index(j, k)) as (batch_p, d):
            w = d.weight

            def fold_xp(i, g) -> None:
                sqp = None if bad else self._checked_square(i, g, bad)
                if sqp is None:
                    return
                fx = as_fp32(keep[i], self._work(1, i))  # sqp is work buffer 0
                keep[i] = None
                if self.sums_xp is not None:
                    self._acc_add(self.sums_xp[i], sqp, slot=2)
                self._acc_add(self.sums_df[i], delta_fisher_(fx, sqp, eps, work=self._work(2, i)), alpha=w, slot=2)

            self._grad_pass(batch_p, fold_xp)
            self._raise_bad(bad, f"{where} (perturbed x')", touched=True)
        self.w_sum += w
        self.w_count += 1

    def _reduced(self, sums) -> dict[str, torch.Tensor]:
        out = {n: t.float().clone() for n, t in zip(self.names, sums)}
        self.ranks.sum_(out.values())
        return out

    def _result(self) -> DRFIMResult:
        count, num_samples = self.ranks.sum_scalars([float(self.count), float(self.num_samples)])
        fx = {n: t.div_(count) for n, t in self._reduced(self.sums_x).items()}
        fxp = None
        if self.dr_on:
            (w_sum,) = self.ranks.sum_scalars([self.w_sum])
            delta = {n: t.div_(w_sum) for n, t in self._reduced(self.sums_df).items()}
            if self.sums_xp is not None:
                fxp = {n: t.div_(count) for n, t in self._reduced(self.sums_xp).items()}
        else:
            delta = {n: torch.zeros_like(t) for n, t in fx.items()}
        scores = combine_dr_fim(fx, delta, lambda_dr=self.lambda_dr)
        meta = self._metadata(fx, delta)
        meta["units"] = int(count)
        return DRFIMResult(scores, fx, fxp, delta, self._global_w(), self.kind, self.mode, int(num_samples),
                           self.steps, meta)

    def _consume(self) -> DRFIMResult:
        count, num_samples = self.ranks.sum_scalars([float(self.count), float(self.num_samples)])
        sums_x, self.sums_x = self.sums_x, None
        self._sum_over_processes(sums_x)
        return self._scores_from(sums_x, self.sums_df if self.dr_on else None, int(num_samples), {"units": int(count)})

    def _state(self) -> dict[str, Any]:
        def copy(group):
            return None if group is None else [t.clone() for t in group]

        return {"sums_x": copy(self.sums_x), "sums_df": copy(self.sums_df), "sums_xp": copy(self.sums_xp),
                "count": self.count, "num_samples": self.num_samples}

    def _load(self, state) -> None:
        for key in ("sums_x", "sums_df", "sums_xp"):
            mine, theirs = getattr(self, key), state[key]
            if (mine is None) != (theirs is None):
                raise FisherInputError(f"state_dict[{key!r}] does not match this estimator (DR term "
                                       f"{'on' if self.dr_on else 'off'}, keep_fisher_xp={self.keep_fisher_xp})")
            if mine is not None:
                self._check_shape(theirs, key)
                for a, b in zip(mine, theirs):
                    a.copy_(b)
        self.count = int(state["count"])
        self.num_samples = int(state["num_samples"])

    def _release(self) -> None:
        self.sums_x = self.sums_df = self.sums_xp = None
