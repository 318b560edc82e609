"""Fused elementwise kernels of the variational estimator's streamed step (CPU, `torch.compile`).

Per stage-2 step and targeted weight the default estimator (natural, batch mode, DR term on, block checkpointing)
makes four weight samples θ = θ̂ + σ⊙ξ, σ = (P + τ⁻²)^(-1/2), and folds two squared gradients into the precision P
and the ΔF accumulator. Written as tensor expressions that is about 5 operations per sample and 15 per fold, each a
pass over the weight in memory: on the 2-core CPU these passes cost more than the noise draws themselves
(benchmarks/results/profile_stage2_before.md: sampling 21 %, folding 21 % of a step). Compiled by inductor, each of
the functions below is one loop over the weight (C++, vectorized, OpenMP), reading each input once.

The formulas are those of the eager code, in float32 with one rounding into the accumulator dtype; inductor may round
differently in the last bit (fused multiply-add, its own rsqrt, log, cos), so a fused estimate equals the eager one to
float32 rounding, not bit for bit (tests/test_fisher_fused.py). The sample loop computes the noise ξ inline from its
keys (`sample_counter`, the counter-based formula of `seeds.py`), the draw the eager code makes with
`seeds.derived_normal`: no noise tensor is written or read, and no thread pool draws it while OpenMP's threads spin.

`FusedKernels.for_params(params, enabled)` decides: `enabled=None` (auto) uses them when every targeted weight is on the
CPU and there are at least `FUSED_MIN_ELEMENTS` targeted elements (small models: the compile, tens of seconds once
per process, costs more than it saves); True asks for them on the CPU; False never. A compile that fails is logged
once, naming the error, and the estimator goes on with the eager code.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Optional

import torch

from .._compiled import CompiledKernels
from .seeds import counter_normal_like

logger = logging.getLogger("peft_fishertune.fisher")

FUSED_MIN_ELEMENTS = 1 << 22


def sample(p: torch.Tensor, prec: torch.Tensor, xi: torch.Tensor, prior: torch.Tensor, sign: torch.Tensor):
    """θ = θ̂ + sign·(P + τ⁻²)^(-1/2)·ξ in float32, returned in θ̂'s dtype."""
    return (p.float() + sign * torch.rsqrt(prec.float() + prior) * xi).to(p.dtype)


def sample_counter(p: torch.Tensor, prec: torch.Tensor, prior: torch.Tensor, sign: torch.Tensor, k1: torch.Tensor,
                   k2: torch.Tensor, k3: torch.Tensor):
    """`sample` with ξ computed inline from its keys (`seeds.counter_normal_like`, at p's flat positions): one loop
    that reads θ̂ and P and writes θ, the noise never in memory. p contiguous."""
    return sample(p, prec, counter_normal_like(p, k1, k2, k3), prior, sign)


def square_keep(g: torch.Tensor):
    """(ĝ² rounded to bfloat16, Σĝ² in float32): the x pass's kept F(x) and its sum (for ε and the finite check)."""
    sq = g.float() * g.float()
    return sq.to(torch.bfloat16), sq.sum()


def sum_sq(g: torch.Tensor):
    """Σĝ² in float32 (the finite check before a fold)."""
    gf = g.float()
    return (gf * gf).sum()


def update(g: torch.Tensor, prec: torch.Tensor, keep_beta: torch.Tensor, scale: torch.Tensor) -> None:
    """P ← (1 − β)·P + scale·ĝ², in place (DR term off)."""
    gf = g.float()
    prec.copy_((prec.float() * keep_beta + gf * gf * scale).to(prec.dtype))


def update_dr(gp: torch.Tensor, keep: torch.Tensor, prec: torch.Tensor, acc: torch.Tensor, keep_beta: torch.Tensor,
              scale: torch.Tensor, eps: torch.Tensor, w: torch.Tensor) -> None:
    """The x' pass's fold, in place: P ← (1 − β)·P + scale·F(x) and acc += w·|F(x) − F(x')| / (min + ε), with F(x) the
    kept bfloat16 ĝ² and F(x') = ĝ'² (Eq. 14 per draw)."""
    gf = gp.float()
    sqp = gf * gf
    fx = keep.float()
    prec.copy_((prec.float() * keep_beta + fx * scale).to(prec.dtype))
    delta = (fx - sqp).abs() / (torch.minimum(fx, sqp) + eps)
    acc.copy_((acc.float() + delta * w).to(acc.dtype))


_EAGER = {"sample": sample, "sample_counter": sample_counter, "square_keep": square_keep, "sum_sq": sum_sq,
          "update": update, "update_dr": update_dr}
_KERNELS = CompiledKernels(_EAGER, where="Fisher estimator", what="the fused kernels",
                           instead="the eager code runs instead (same estimate, slower)", logger=logger)


def scalar(x: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim float32 tensor on `like`'s device (a kernel argument that does not recompile when it changes)."""
    return torch.tensor(float(x), dtype=torch.float32, device=like.device)


class FusedKernels:
    """The compiled kernels, or None where they are not used; `run(name, *args)` calls one (eager after a failure)."""

    def __init__(self, reason: str):
        self.reason = reason

    @classmethod
    def for_params(cls, params: Mapping[str, torch.Tensor], enabled: Optional[bool]) -> Optional["FusedKernels"]:
        if enabled is not None and not isinstance(enabled, bool):
            raise ValueError(f"fused_kernels={enabled!r}; expected None (auto), True or False")
        if enabled is False:
            return None
        on_cpu = all(p.device.type == "cpu" for p in params.values())
        numel = sum(p.numel() for p in params.values())
        if not on_cpu:
            if enabled:
                logger.warning("fused_kernels=True: the fused kernels are for CPU weights; the targeted weights are "
                               "on %s, so the eager code runs", next(iter(params.values())).device)
            return None
        if not _KERNELS.available:
            return None
        if enabled is None and numel < FUSED_MIN_ELEMENTS:
            return None
        why = "fused_kernels=True" if enabled else f"auto: {numel:,} targeted elements on the CPU"
        return cls(why)

    @property
    def usable(self) -> bool:
        return _KERNELS.available

    def run(self, name: str, *args):
        return _KERNELS(name, *args)
