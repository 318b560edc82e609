"""The statistic of one micro-batch and the per-micro-batch DR-FIM flow (a mixin of `FisherEstimator`).

    for each micro-batch j (perturbation draw d = global index of j):
        F_j(x)   = the statistic of x   (streamed into `cur`, one value per targeted element)
        F_j(x')  = the statistic of x'  (the same weights / weight sample; skipped when λ = 0 or perturb=False)
        ΔF_j     = |F_j(x) − F_j(x')| / (min + ε_j),   acc_ΔF += w_j·ΔF_j,   Σw += w_j

so each draw's ΔF carries its own w (Eq. 14). The statistic is ĝ² of the micro-batch's mean gradient (batch mode)
or Σ over its samples of per-sample ĝ² (per-sample mode: torch.func vmap, or a loop over single-sample
micro-batches). Squares and ΔF are computed in the estimator's per-step work buffers (`buffers.WorkBuffers`).
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from .._compiled import error_line
from .._host import host_values_of
from .buffers import as_fp32, square_into
from .errors import FisherInputError
from .gradients import per_sample_sq_grads_vmap, sample_of, split_kinds
from .scores import delta_fisher_, global_mean, relative_eps

logger = logging.getLogger("peft_fishertune.fisher")


class MicroBatchStatistics:
    """The statistic flow shared by the estimators; `FisherEstimator` supplies the state it reads.

    Subclasses implement `_grad_pass(batch, on_grad)` (one streamed forward/backward) and `_vmap_weights()`
    (the weights vmap differentiates at).
    """

    def _grad_pass(self, batch, on_grad) -> None:  # pragma: no cover - subclasses
        raise NotImplementedError

    def _vmap_weights(self) -> list[torch.Tensor]:  # pragma: no cover - subclasses
        raise NotImplementedError

    def _method_for(self, batch) -> str:
        if self.per_sample_method != "auto":
            return self.per_sample_method
        kinds, _ = split_kinds(batch)
        lists = [k for k, kind in kinds.items() if kind == "list"]
        if lists:
            self.fallback_reason = f"list-valued batch entries {lists} cannot be vmapped"
            if not self._logged_method:
                logger.info("per-sample Fisher: loop over single-sample micro-batches (%s)", self.fallback_reason)
                self._logged_method = True
            return "loop"
        return "vmap"

    def _sq_stat(self, batch, fold) -> int:
        """Σ over the mode's units of squared gradients, streamed into `fold(i, tensor)`; returns the unit count.

        `fold` may be called several times per weight (per sample / per chunk). Raises after a partial fold only
        with `self._partial = True`, so the caller can reset and retry with the loop.
        """
        if self.mode == "batch":
            self._grad_pass(batch, lambda i, g: fold(i, None if g is None else square_into(g, self._work(0, i))))
            return 1
        kinds, b = split_kinds(batch)
        method = self._method_for(batch)
        if method == "vmap":
            try:
                n = per_sample_sq_grads_vmap(self.model, batch, self.paths, self._vmap_weights(), self.loss_fn, fold,
                                             self.vmap_chunk_size)
                if not self._logged_method:
                    logger.info("per-sample Fisher: vectorized per-sample gradients (torch.func vmap)")
                    self._logged_method = True
                self.per_sample_method = "vmap" if self.per_sample_method == "auto" else self.per_sample_method
                return n
            except FisherInputError:
                raise
            except Exception as exc:  # noqa: BLE001 - any vmap failure is reported, then the loop is used
                if self.per_sample_method == "vmap":  # asked for explicitly: no fallback
                    raise
                self.fallback_reason = error_line(exc)
                logger.info("per-sample Fisher: torch.func vmap failed on this model (%s); using a loop over "
                            "single-sample micro-batches", self.fallback_reason)
                self.per_sample_method = "loop"
                self._logged_method = True
                raise _RetryWithLoop from exc
        if self.per_sample_method == "auto":
            self.per_sample_method = "loop"
        if not self._logged_method:
            logger.info("per-sample Fisher: loop over single-sample micro-batches")
            self._logged_method = True
        for i in range(b):
            self._grad_pass(sample_of(batch, kinds, i),
                            lambda k, g: fold(k, None if g is None else square_into(g, self._work(0, k))))
        return b

    def _micro_stat(self, batch, cur: list[torch.Tensor], where: str) -> int:
        """The statistic of one micro-batch summed into `cur` (zeroed first); checked finite."""
        for c in cur:
            c.zero_()

        def fold(i, s):
            if s is not None:
                cur[i].add_(s)

        try:
            n = self._sq_stat(batch, fold)
        except _RetryWithLoop:
            for c in cur:
                c.zero_()
            n = self._sq_stat(batch, fold)
        check_finite(self.names, cur, where)
        return n

    def _checked_square(self, i: int, g: Optional[torch.Tensor], bad: list[str],
                        total: Optional[list[float]] = None) -> Optional[torch.Tensor]:
        """ĝ² of weight i in float32 (zeros when it got no gradient) in work buffer 0, or None after adding its name to
        `bad` when it is not finite. `total[0]` (optional) collects the sum of the squares."""
        if g is None:
            return self._work(0, i).zero_()
        sq = square_into(g, self._work(0, i))
        s = float(sq.sum())  # float32, pairwise; a NaN / inf anywhere makes it non-finite
        if not math.isfinite(s) and not bool(torch.isfinite(sq).all()):
            bad.append(self.names[i])
            return None
        if total is not None:
            total[0] += s
        return sq

    def _square_to_fold(self, i: int, g: Optional[torch.Tensor], bad: list[str], total: list[float],
                        checks: Optional["PassChecks"]) -> Optional[torch.Tensor]:
        """ĝ² of weight i (work buffer 0) for a streamed pass to fold now, or None: checked at once
        (`_checked_square`: None when it, or an earlier weight of the pass, is not finite), or kept in `checks` for
        the end of the pass (always folded; `checks.settle` decides)."""
        if checks is None:
            sq = self._checked_square(i, g, bad, total)
            return None if sq is None or bad else sq
        if g is None:
            return self._work(0, i).zero_()
        sq = square_into(g, self._work(0, i))
        checks.add(i, sq)
        return sq

    def _raise_bad(self, bad: list[str], where: str, touched: bool) -> None:
        """Raise for the first non-finite gradient in `bad`; `touched`: some statistics were already folded, so
        this estimate cannot continue (later steps refuse)."""
        if not bad:
            return
        if touched:
            self.broken = f"a non-finite gradient {where}"
        raise FisherInputError(f"non-finite gradient for {bad[0]!r} {where}; check the loss (e.g. all pixels "
                               "ignored) and the inputs")

    def _dr_micro(self, batch, j: int, k: int, cur: list[torch.Tensor], n: int, acc_df, acc_xp, xp_buf,
                  scale_n: bool = True) -> None:
        """The x' pass of micro-batch j after its x statistic `cur` (n units): folds w_j·ΔF_j into `acc_df`.

        Work buffers: 0 holds F_j(x'), 1 F_j(x) then ΔF_j, 2 the denominator and then an accumulator in float32."""
        inv = 1.0 / n if scale_n else 1.0
        eps = relative_eps(global_mean(cur) * inv, self.dr_eps)
        with self.perturbation.applied(self.model, batch, self._micro_index(j, k)) as (batch_p, d):
            w = d.weight
            where = f"in step {self.steps}, micro-batch {j} (perturbed x')"
            if xp_buf is None:  # one gradient per weight (batch mode): fold ΔF as each arrives
                bad: list[str] = []

                def fold(i, s):
                    s = self._work(0, i).zero_() if s is None else s
                    if not math.isfinite(float(s.sum())) and not bool(torch.isfinite(s).all()):
                        bad.append(self.names[i])
                        return
                    if acc_xp is not None:
                        self._acc_add(acc_xp[i], s, slot=2)
                    self._fold_delta(i, cur[i], s, inv, eps, acc_df, w)

                self._sq_stat(batch_p, fold)
                if bad:
                    raise FisherInputError(f"non-finite gradient for {bad[0]!r} {where}; check the loss (e.g. all "
                                           "pixels ignored) and the inputs")
            else:
                self._micro_stat(batch_p, xp_buf, where)
                for i in range(len(self.names)):
                    if acc_xp is not None:
                        self._acc_add(acc_xp[i], xp_buf[i], slot=2)
                    self._fold_delta(i, cur[i], as_fp32(xp_buf[i], self._work(0, i)), inv, eps, acc_df, w)
        self.w_sum += w
        self.w_count += 1

    def _fold_delta(self, i: int, fx: torch.Tensor, fxp: torch.Tensor, inv: float, eps: float, acc_df, w: float) -> None:
        """acc_df[i] += w·ΔF(inv·fx, inv·fxp) (Eq. 14), in work buffers 1 and 2; `fxp` is float32 and is scaled in
        place (it may be work buffer 0)."""
        fx = as_fp32(fx, self._work(1, i))
        if inv != 1.0:
            fx.mul_(inv)
            fxp.mul_(inv)
        self._acc_add(acc_df[i], delta_fisher_(fx, fxp, eps, work=self._work(2, i)), alpha=w, slot=2)


class PassChecks:
    """The finite check and Σĝ² of each weight of one streamed pass, kept on the device and read once, at its end.

    Read weight by weight (`_checked_square`: `float(sq.sum())`), they are one host read per weight: on a GPU each
    drains the queue while Python prepares the next layer, 288 a stage-2 step at DINOv2-L's 144 targeted weights.
    Here `add` keeps two device scalars per weight (its float32 Σĝ², the same pairwise sum, and whether every ĝ² is
    finite), and `settle` reads them all at once (one read per device) and applies `_checked_square`'s rule in the
    same order: a weight is bad when its sum is not finite and neither are all its squares (finite squares whose
    float32 sum overflowed are kept); `total[0]` gains the sums of the others, in arrival order, in float64. So ε and
    the refusals are the immediate check's exactly. What differs: the weights after a bad one are folded too, so the
    pass that finds one must count as having touched the statistics (the caller's `touched`)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self._kept: list[tuple[int, torch.Tensor]] = []  # (weight, [Σĝ², all finite as 0/1]) on the device

    def add(self, i: int, sq: torch.Tensor) -> None:
        self._kept.append((i, torch.stack([sq.sum(), torch.isfinite(sq).all().to(sq.dtype)])))

    def settle(self, bad: list[str], total: Optional[list[float]] = None) -> None:
        for (i, _), (s, all_finite) in zip(self._kept, host_values_of([t for _, t in self._kept])):
            if not math.isfinite(s) and not all_finite:
                bad.append(self.names[i])
            elif total is not None:
                total[0] += s
        self._kept.clear()


class _RetryWithLoop(Exception):
    """vmap failed under per_sample_method='auto': reset the partial statistic and use the loop."""


def check_finite(names: list[str], tensors: list[torch.Tensor], where: str) -> None:
    for name, t in zip(names, tensors):
        if math.isfinite(float(t.sum())):  # fast: a NaN / inf anywhere makes the float32 sum non-finite
            continue
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise FisherInputError(
                f"non-finite gradient for {name!r} ({bad} of {t.numel()} elements are NaN/inf) {where}; "
                "check the loss (e.g. all pixels ignored) and the inputs"
            )


