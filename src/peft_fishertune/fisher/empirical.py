"""Empirical diagonal Fisher: F = E[(∇_θ log p(y|x; θ))²] per element.

* ``per_sample`` (the true empirical Fisher): mean over samples of per-sample squared
  gradients. Per-sample gradients come from `torch.func` (functional_call + grad +
  vmap) when the model allows it; otherwise (e.g. BatchNorm in train mode, data-dependent
  Python control flow) from a loop over single-sample micro-batches. The choice is
  logged at INFO and recorded in the result's metadata (`per_sample_method`,
  `per_sample_fallback_reason`). See docs/fisher.md for the measured speeds.
* ``batch`` (the cheap, biased proxy): mean over mini-batches of the squared mean
  gradient of the mini-batch (each process's micro-batch is one mini-batch).

The gradient is that of the model's loss (`outputs.loss` or `loss_fn(outputs, batch)`),
i.e. of −log p averaged as the loss averages it (e.g. over pixels).

Accumulators are fp32, one per targeted weight, summed locally and reduced across
processes (sums and counts) in `result()`, so 2 processes on halves of the data give
what 1 process gives on all of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
from torch import nn

from ._base import EstimatorBase
from ._common import FisherInputError, batch_size_of, check_finite
from .drfim import DRFIMResult, combine_dr_fim, delta_fisher


class EmpiricalFisherEstimator(EstimatorBase):
    """Streaming empirical Fisher of x (and of x' when `perturb=True`, for DR-FIM).

    `EmpiricalFisherEstimator(model, config=None, params=None, loss_fn=None, accelerator=None,
    *, mode=None, perturb=True, per_sample_method="auto", input_key="pixel_values", ...)`;
    `mode` defaults to `config.fisher_mode` ("per_sample").
    """

    kind = "empirical"

    def __init__(self, model, config=None, params=None, loss_fn=None, accelerator=None, **kwargs):
        super().__init__(model, config, params, loss_fn, accelerator, **kwargs)
        self.sums_x = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in self.params.items()}
        self.sums_xp = (
            {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in self.params.items()}
            if self.perturbed
            else None
        )
        self.count = 0  # units (samples or batches) per pass, this process
        self.num_samples = 0  # samples per pass, this process

    def _accumulate(self, sums, batch, weights, where: str) -> int:
        sq, n = self._sq_grads(batch, weights)
        check_finite(self.names, sq, where)
        for name, s in zip(self.names, sq):
            sums[name].add_(s)
        return n

    def _step(self, micro) -> None:
        weights = self._weights_at()
        k = len(micro)
        for j, batch in enumerate(micro):
            where = f"in step {self.steps}, micro-batch {j}"
            n = self._accumulate(self.sums_x, batch, weights, where)
            if self.perturbed:
                with self.perturbation.applied(self.model, batch, self._micro_index(j, k)) as (batch_p, d):
                    self._accumulate(self.sums_xp, batch_p, weights, where + " (perturbed x')")
                self.w_sum += d.weight
                self.w_count += 1
            self.count += n
            self.num_samples += batch_size_of(batch)

    def _reduced(self, sums):
        out = {n: t.clone() for n, t in sums.items()}
        self.ranks.sum_(out.values())
        return out

    def _result(self) -> DRFIMResult:
        count, num_samples = self.ranks.sum_scalars([float(self.count), float(self.num_samples)])
        fx = {n: t.div_(count) for n, t in self._reduced(self.sums_x).items()}
        if self.perturbed:
            fxp = {n: t.div_(count) for n, t in self._reduced(self.sums_xp).items()}
            delta = delta_fisher(fx, fxp, dr_eps=self.dr_eps)
        else:
            fxp, delta = None, {n: torch.zeros_like(t) for n, t in fx.items()}
        w = self._global_w()
        scores = combine_dr_fim(fx, delta, lambda_dr=self.lambda_dr, w=w)
        meta = self._metadata()
        meta["units"] = int(count)
        return DRFIMResult(scores, fx, fxp, delta, w, self.kind, self.mode, int(num_samples), self.steps, meta)

    def _state(self) -> dict[str, Any]:
        return {
            "sums_x": {n: t.clone() for n, t in self.sums_x.items()},
            "sums_xp": None if self.sums_xp is None else {n: t.clone() for n, t in self.sums_xp.items()},
            "count": self.count,
            "num_samples": self.num_samples,
        }

    def _load(self, state) -> None:
        if (state["sums_xp"] is None) != (self.sums_xp is None):
            raise FisherInputError("state_dict['sums_xp'] does not match perturb=%s" % self.perturbed)
        self._check_shape(state["sums_x"], "sums_x")
        for n in self.names:
            self.sums_x[n].copy_(state["sums_x"][n])
            if self.sums_xp is not None:
                self.sums_xp[n].copy_(state["sums_xp"][n])
        self.count = int(state["count"])
        self.num_samples = int(state["num_samples"])

    def _release(self) -> None:
        self.sums_x = None
        self.sums_xp = None


def estimate_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    loss_fn=None,
    mode: str = "per_sample",
    max_batches: Optional[int] = None,
    params: Optional[Mapping[str, nn.Parameter]] = None,
    accelerator=None,
    per_sample_method: str = "auto",
    vmap_chunk_size: Optional[int] = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher {name: fp32 tensor like the weight}, keyed like `target_parameters(model)`.

    The model is called as `model(**batch)`; the loss is `loss_fn(outputs, batch)` if given,
    else `outputs.loss`. `mode="per_sample"`: mean of per-sample squared gradients;
    `mode="batch"`: mean of squared mini-batch gradients. Under several processes each
    process passes its own shard; the result (identical on all ranks) covers all of them.
    Use `EmpiricalFisherEstimator` to get metadata (which per-sample method was used).
    """
    from tqdm.auto import tqdm

    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise FisherInputError(f"max_batches={max_batches!r}; expected None or an integer >= 1")
    est = EmpiricalFisherEstimator(
        model, None, params, loss_fn, accelerator, mode=mode, perturb=False,
        per_sample_method=per_sample_method, vmap_chunk_size=vmap_chunk_size,
    )
    try:
        total = max_batches if max_batches is not None else (len(batches) if hasattr(batches, "__len__") else None)
        for i, batch in enumerate(tqdm(batches, total=total, desc=f"Fisher ({mode})",
                                       disable=not (progress and est.ranks.is_main))):
            if max_batches is not None and i >= max_batches:
                break
            est.step(batch)
        if est.steps == 0:
            raise FisherInputError("batches is empty: no data to estimate the Fisher information from")
        return est.result().fisher_x
    finally:
        est.release()
