"""The estimator lifecycle shared by the empirical and variational estimates.

`step(batch)` / `result()` / `state_dict()` / `load_state_dict()` / `release()`, the targeted weights (passed in
explicitly), the process view, the perturbation, the accumulators and the per-step work buffers; the statistic of a
micro-batch and the per-micro-batch DR-FIM flow are the mixin `micro_batch.MicroBatchStatistics`.

Memory the estimator owns (in targeted elements E, fp32 unless `accumulator_dtype="bfloat16"`): F(x) accumulator
E, ΔF accumulator E (when the DR term is on), the micro-batch statistic E, plus E for x' in per-sample mode (summed
over samples before the ratio), plus E for F(x') with `keep_fisher_xp=True`; the variational estimate adds E for
the step statistic when a step has several micro-batches or processes. `memory_bound()` states it;
`owned_tensors()` lists it. During a step only, the work buffers add 3 float32 copies of the largest targeted
weight (one layer, not E).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

from ..tuner.config import PER_SAMPLE_METHODS
from .buffers import ACCUMULATOR_DTYPES, WorkBuffers, acc_add
from .errors import FisherInputError
from .gradients import check_batch, check_params, model_guard, module_paths
from .micro_batch import MicroBatchStatistics, check_finite
from .pass_context import no_transformers_checkpointing, note_per_sample_cost_on_tokens
from .perturbation import FeaturePerturbation
from .processes import Ranks
from .scores import DEFAULT_DR_EPS, DRFIMResult, global_mean, mix_report, scores_in_place

logger = logging.getLogger("peft_fishertune.fisher")

__all__ = ["ACCUMULATOR_DTYPES", "FisherEstimator", "cfg_value", "check_finite", "warn_uncalled"]


def cfg_value(config, name: str, default):
    value = None if config is None else getattr(config, name, None)
    return default if value is None else value


class FisherEstimator(MicroBatchStatistics):
    """Base of the estimators: holds the model, the targeted weights, the process view and the perturbation.

    Subclasses implement `_step(micro)`, `_result()`, `_state()`, `_load(state)`, `owned_tensors()`,
    and for the shared statistic flow `_grad_pass(batch, on_grad)` (one streamed forward/backward) and
    `_vmap_weights()` (the weights vmap differentiates at).
    """

    kind = "base"

    def __init__(
        self,
        model: nn.Module,
        config=None,
        params: Optional[Mapping[str, nn.Parameter]] = None,
        loss_fn=None,
        accelerator=None,
        *,
        mode: Optional[str] = None,
        perturb: bool = True,
        perturb_at: Optional[str] = None,
        input_key: str = "pixel_values",
        perturb_strength: float = 1.0,
        per_sample_method: Optional[str] = None,
        vmap_chunk_size: Optional[int] = None,
        dr_eps: float = DEFAULT_DR_EPS,
        lambda_dr: Optional[float] = None,
        seed: Optional[int] = None,
        accumulator_dtype: Optional[str] = None,
        accumulator_device: Optional[str] = None,
        keep_fisher_xp: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise FisherInputError(f"model is a {type(model).__name__}; expected an nn.Module")
        if params is None:
            raise FisherInputError(
                f"{type(self).__name__} needs params={{name: parameter}} (the targeted weights); for a FisherTune "
                "model use make_estimator / estimate_dr_fim, which default to its targeted weights"
            )
        self.model = model
        self.config = config
        self.params = check_params(model, params)
        self.names = list(self.params)
        self.paths = [p for p in module_paths(model, self.params).values()]
        self.loss_fn = loss_fn
        self.ranks = Ranks(accelerator)
        self.mode = mode if mode is not None else cfg_value(config, "fisher_mode", "per_sample")
        if self.mode not in ("per_sample", "batch"):
            raise FisherInputError(f"mode={self.mode!r}; expected 'per_sample' or 'batch'")
        if per_sample_method is None:
            per_sample_method = cfg_value(config, "per_sample_method", "auto")
        if vmap_chunk_size is None:
            vmap_chunk_size = cfg_value(config, "vmap_chunk_size", None)
        if per_sample_method not in PER_SAMPLE_METHODS:
            raise FisherInputError(f"per_sample_method={per_sample_method!r}; expected one of {list(PER_SAMPLE_METHODS)}")
        self.per_sample_method = per_sample_method
        self.method_reason = (
            "per_sample_method='auto': vectorized per-sample gradients (torch.func vmap), faster than the loop on "
            "the DINOv2-Base benchmark (docs/fisher.md); the loop where vmap cannot run the model or batch"
            if per_sample_method == "auto" else f"per_sample_method={per_sample_method!r} asked for")
        self.fallback_reason: Optional[str] = None
        self.vmap_chunk_size = vmap_chunk_size
        self.dr_eps = float(dr_eps)
        self.lambda_dr = float(lambda_dr if lambda_dr is not None else cfg_value(config, "lambda_dr", 0.5))
        if not 0.0 <= self.lambda_dr <= 1.0:
            raise FisherInputError(f"lambda_dr={self.lambda_dr!r}; expected a number in [0, 1]")
        self.seed = int(seed if seed is not None else cfg_value(config, "seed", 0))
        self.perturbation = FeaturePerturbation(
            self.seed,
            perturb_at if perturb_at is not None else cfg_value(config, "perturb_at", None),
            input_key=input_key,
            strength=perturb_strength if perturb else 0.0,
        )
        acc_dtype = accumulator_dtype if accumulator_dtype is not None else cfg_value(config, "accumulator_dtype",
                                                                                      "float32")
        if acc_dtype not in ACCUMULATOR_DTYPES:
            raise FisherInputError(f"accumulator_dtype={acc_dtype!r}; expected one of {list(ACCUMULATOR_DTYPES)}")
        self.accumulator_dtype = acc_dtype
        if acc_dtype == "bfloat16":
            logger.info("Fisher accumulators in bfloat16 (half the memory of float32): each update is rounded to 8 "
                        "mantissa bits, so late small contributions to long sums are lost; over 2,000 steps the "
                        "top-15 %% selection overlaps float32's at Jaccard 0.94 (accumulator_dtype='float32' for "
                        "an exact sum)")
        acc_device = accumulator_device if accumulator_device is not None else cfg_value(config, "accumulator_device",
                                                                                         None)
        if acc_device not in (None, "cpu"):
            raise FisherInputError(f"accumulator_device={acc_device!r}; expected None (the weights' device) or 'cpu'")
        self.accumulator_device = acc_device
        if not isinstance(keep_fisher_xp, bool):
            raise FisherInputError(f"keep_fisher_xp={keep_fisher_xp!r}; expected True or False")
        self.keep_fisher_xp = keep_fisher_xp
        self.steps = 0
        self.w_sum = 0.0
        self.w_count = 0
        self.released = False
        self.broken: Optional[str] = None
        self.uncalled: set[str] = set()
        self._logged_method = False
        self.numel = sum(p.numel() for p in self.params.values())
        self.work = WorkBuffers(max(p.numel() for p in self.params.values()))

    # ------------------------------------------------------------------ public API
    def describe(self) -> str:
        return f"{self.kind}, {self.mode}, DR term {'on' if self.dr_on else 'off'}"

    @property
    def perturbed(self) -> bool:
        return self.perturbation.enabled

    @property
    def dr_on(self) -> bool:
        """The x' pass runs: a perturbation is set and λ > 0 (the FIM-only baseline, λ = 0, skips it)."""
        return self.perturbation.enabled and self.lambda_dr > 0

    def step(self, batch) -> None:
        """One estimator step on this process: a batch (mapping) or a list of micro-batches.

        Collective under several processes (every rank must call it the same number of times).
        """
        if self.released:
            raise RuntimeError(f"{type(self).__name__} was released; create a new estimator")
        self._check_usable()
        micro = list(batch) if isinstance(batch, (list, tuple)) else [batch]
        if not micro:
            raise FisherInputError("step() got an empty list of micro-batches")
        micro = [check_batch(b, self.steps) for b in micro]
        if self.steps == 0 and self.mode == "per_sample":
            note_per_sample_cost_on_tokens(micro[0], self.perturbation.input_key)
        try:
            with model_guard(self.model), no_transformers_checkpointing(self.model):
                self._step(micro)
        finally:
            self.work.clear()  # nothing weight-sized stays between steps
        self.steps += 1

    def result(self, consume: bool = False):
        """The DRFIMResult so far (collective under several processes).

        `consume=False` keeps the estimate going. `consume=True` ends it: the scores are built in place from the
        accumulators (no second copy; the result's `fisher_x` / `delta_f` are None) and the estimator is released.
        """
        if self.released:
            raise RuntimeError(f"{type(self).__name__} was released; call result() before release()")
        self._check_usable()
        if self.steps == 0:
            raise FisherInputError("no data: step() was never called (empty batches?)")
        if not consume:
            return self._result()
        try:
            return self._consume()
        finally:
            self.release()

    def _check_usable(self) -> None:
        if self.broken:
            raise RuntimeError(f"{type(self).__name__} cannot continue after {self.broken}; create a new estimator")

    def _consume(self):
        """Subclasses with a lean path override this; the default is `_result()` (then released)."""
        return self._result()

    def _scores_from(self, fx_acc: list, df_acc: Optional[list], num_samples: int, meta_extra: dict):
        """The consumed result from accumulators ∝ F(x) and ∝ ΔF (constant factors cancel in the scores).

        `fx_acc` must already be the same on every process; `df_acc` holds this process's sums (summed here).
        """
        if df_acc is not None:
            self._sum_over_processes(df_acc)
        meta = self._metadata(dict(zip(self.names, fx_acc)), None if df_acc is None else dict(zip(self.names, df_acc)))
        meta.update(meta_extra)
        mean_f = global_mean(fx_acc)
        mean_df = global_mean(df_acc) if df_acc is not None else 0.0
        w = self._global_w()
        if df_acc is not None:
            self.sums_df = None
        scores = scores_in_place(fx_acc, df_acc, lambda_dr=self.lambda_dr, mean_f=mean_f, mean_df=mean_df)
        return DRFIMResult(dict(zip(self.names, scores)), None, None, None, w, self.kind, self.mode, num_samples,
                           self.steps, meta)

    def _sum_over_processes(self, tensors: list) -> None:
        """All-reduce each tensor in place (as float32: a bfloat16 accumulator is replaced by its fp32 sum)."""
        if self.ranks.world_size == 1:
            return
        for i, t in enumerate(tensors):
            t = t.float()
            self.ranks.sum_([t])
            tensors[i] = t

    def state_dict(self) -> dict[str, Any]:
        state = {
            "kind": self.kind,
            "mode": self.mode,
            "seed": self.seed,
            "names": list(self.names),
            "steps": self.steps,
            "w_sum": self.w_sum,
            "w_count": self.w_count,
            "dr_on": self.dr_on,
            "per_sample_method": self.per_sample_method,
            "fallback_reason": self.fallback_reason,
            "world_size": self.ranks.world_size,
        }
        state.update(self._state())
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, mine in (("kind", self.kind), ("mode", self.mode), ("seed", self.seed), ("dr_on", self.dr_on)):
            if state.get(key) != mine:
                raise FisherInputError(f"state_dict[{key!r}]={state.get(key)!r} does not match this estimator ({mine!r})")
        if list(state["names"]) != self.names:
            raise FisherInputError("state_dict['names'] does not match this estimator's targeted parameters")
        if state["world_size"] != self.ranks.world_size:
            raise FisherInputError(
                f"state_dict was saved with {state['world_size']} processes, this run has {self.ranks.world_size}"
            )
        self.steps = int(state["steps"])
        self.w_sum = float(state["w_sum"])
        self.w_count = int(state["w_count"])
        self.per_sample_method = state["per_sample_method"]
        self.fallback_reason = state["fallback_reason"]
        self._load(state)

    def release(self) -> None:
        """Free everything the estimator owns (accumulators, buffers); no hook of it stays on the model."""
        self.work.clear()
        self._release()
        self.released = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def owned_tensors(self) -> list[torch.Tensor]:
        """The tensors this estimator keeps between steps (for the memory bound)."""
        raise NotImplementedError

    def memory_bound(self) -> int:
        """The most elements `owned_tensors()` may hold between steps, as a multiple of the targeted elements."""
        raise NotImplementedError

    # ------------------------------------------------------------------ buffers
    def _zeros(self, *, compute: bool = False, stat: bool = False) -> list[torch.Tensor]:
        """One zero tensor per targeted weight: on the weights' device in fp32 (`compute`), on the weights' device
        in the accumulator dtype (`stat`: a micro-batch's statistic, summed over its samples), else an
        accumulator."""
        out = []
        for p in self.params.values():
            if compute or stat:
                dtype = ACCUMULATOR_DTYPES[self.accumulator_dtype] if stat else torch.float32
                out.append(torch.zeros(p.shape, dtype=dtype, device=p.device))
                continue
            device = p.device if self.accumulator_device is None else torch.device(self.accumulator_device)
            pin = device.type == "cpu" and p.device.type == "cuda"
            out.append(torch.zeros(p.shape, dtype=ACCUMULATOR_DTYPES[self.accumulator_dtype], device=device,
                                   pin_memory=pin))
        return out

    def _acc_add(self, acc: torch.Tensor, value: torch.Tensor, alpha: float = 1.0,
                 slot: Optional[int] = None) -> None:
        """acc += alpha·value (`buffers.acc_add`); `slot`: the work buffer that may hold acc in float32."""
        work = None if slot is None else self.work.get(slot, acc.shape, acc.device)
        acc_add(acc, value, alpha, work)

    def _work(self, slot: int, i: int, device=None) -> torch.Tensor:
        """Work buffer `slot` shaped like targeted weight i, on its device (or `device`)."""
        p = self.params[self.names[i]]
        return self.work.get(slot, p.shape, p.device if device is None else device)

    def _check_shape(self, state_tensors, key: str) -> None:
        for i, n in enumerate(self.names):
            t = state_tensors[i] if isinstance(state_tensors, (list, tuple)) else state_tensors[n]
            if tuple(t.shape) != tuple(self.params[n].shape):
                raise FisherInputError(f"state_dict[{key!r}][{n!r}] has shape {tuple(t.shape)}, "
                                       f"expected {tuple(self.params[n].shape)}")

    def _micro_index(self, j: int, k: int) -> int:
        """Global index of micro-batch j of this step: ranks interleave (rank r holds batch r, r+W, ...)."""
        return (self.steps * self.ranks.world_size + self.ranks.rank) * k + j

    # ------------------------------------------------------------------ metadata
    def _metadata(self, fisher_x, delta_f) -> dict[str, Any]:
        meta = {
            "per_sample_method": self.per_sample_method if self.mode == "per_sample" else None,
            "per_sample_fallback_reason": self.fallback_reason,
            "per_sample_method_reason": self.method_reason if self.mode == "per_sample" else None,
            "lambda_dr": self.lambda_dr,
            "dr_eps": self.dr_eps,
            "seed": self.seed,
            "perturbed": self.perturbed,
            "dr_term": self.dr_on,
            "per_draw_w": self.dr_on,
            "perturb_at": self.perturbation.perturb_at,
            "perturbed_where": self.perturbation.where,
            "world_size": self.ranks.world_size,
            "accumulator_dtype": self.accumulator_dtype,
            "accumulator_device": self.accumulator_device,
        }
        if self.uncalled:
            meta["uncalled_modules"] = sorted(self.uncalled)
        top = float(cfg_value(self.config, "delta_max", 0.15))
        meta.update(mix_report(fisher_x, delta_f, lambda_dr=self.lambda_dr, top_fraction=top, seed=self.seed))
        if self.ranks.is_main:
            logger.info("DR-FIM mix: λ = %.3g, effective share of the ΔF term %.3f of the score mass, %.3f in the "
                        "top %.0f %% (subsample estimate)", self.lambda_dr, meta["lambda_effective"],
                        meta["dr_share_top"], 100 * top)
        return meta

    def _global_w(self) -> float:
        w_sum, w_count = self.ranks.sum_scalars([self.w_sum, float(self.w_count)])
        return w_sum / w_count if w_count > 0 else 1.0

    # subclasses
    def _step(self, micro):  # pragma: no cover
        raise NotImplementedError

    def _result(self):  # pragma: no cover
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def _load(self, state) -> None:  # pragma: no cover
        raise NotImplementedError

    def _release(self) -> None:  # pragma: no cover
        raise NotImplementedError


def warn_uncalled(estimator: FisherEstimator, uncalled: list[str]) -> None:
    new = [u for u in uncalled if u not in estimator.uncalled]
    if new:
        estimator.uncalled.update(new)
        logger.warning("variational Fisher: the modules %s (or a PEFT layer wrapping them) own targeted weights but "
                       "were never called in the forward pass: a parent module reads the weight directly, or the "
                       "module is unused. Their weights were not sampled, so their variational Fisher is 0; "
                       "fisher_estimator='empirical' scores weights read directly", new[:5])

