"""Weight-sized buffers of the estimators: accumulator dtypes, accumulation, and per-step work buffers.

A stage-2 step touches every targeted element several times per pass: σ = (P + τ⁻²)^(-1/2) and the noise ξ for
each weight sample (four per step with block checkpointing), ĝ², F(x) back from bfloat16, the precision and ΔF
updates. Written as plain tensor expressions each of these allocates a fresh tensor the size of a weight; on the
CPU an allocation of a few MiB is served by fresh pages (glibc hands large blocks back to the kernel on free), so
every one of them pays page faults on first touch, which cost about as much as the arithmetic (benchmarks/
results/profile_stage2_before.md: `aten::copy_` into fresh tensors is 15 % of a step's CPU time). `WorkBuffers`
keeps a few flat float32 buffers of the largest targeted weight's size per device for the length of one step and
hands out views shaped like a weight; the arithmetic is the same, in the same order, so the numbers are identical
(tested). The estimators free them at the end of every step, so nothing weight-sized is kept between steps.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

ACCUMULATOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class WorkBuffers:
    """`slots` flat float32 buffers of `capacity` elements per device, allocated on first use; `clear()` frees them.

    `get(slot, shape, device)` is a view of slot `slot` shaped `shape` (its previous content is garbage). A slot is
    free again as soon as its user returns: the users (a weight sample's `make`, a gradient's fold) run one at a
    time and never hold a view past their return.
    """

    def __init__(self, capacity: int, slots: int = 3):
        self.capacity = int(capacity)
        self.slots = int(slots)
        self._bufs: dict[tuple[int, torch.device], torch.Tensor] = {}

    def get(self, slot: int, shape, device) -> torch.Tensor:
        if not 0 <= slot < self.slots:
            raise IndexError(f"work buffer slot {slot}; this set has {self.slots}")
        n = math.prod(shape)
        if n > self.capacity:
            raise ValueError(f"a work buffer of {n} elements was asked for; the capacity is {self.capacity}")
        key = (slot, torch.device(device))
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = torch.empty(self.capacity, dtype=torch.float32, device=key[1])
        return buf[:n].view(tuple(shape))

    def clear(self) -> None:
        self._bufs = {}

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


def as_fp32(src: torch.Tensor, work: Optional[torch.Tensor]) -> torch.Tensor:
    """`src` in float32 on `work`'s device: `src.float()` written into `work` (or a new tensor when `work` is None)."""
    if work is None:
        return src.float()
    return work.copy_(src)


def square_into(g: torch.Tensor, work: Optional[torch.Tensor]) -> torch.Tensor:
    """g² in float32 (`g.float().square()`), written into `work` when given."""
    if work is None:
        return g.float().square()
    if g.dtype == torch.float32 and g.device == work.device:
        return torch.mul(g, g, out=work)
    return work.copy_(g).square_()


def acc_add(acc: torch.Tensor, value: torch.Tensor, alpha: float = 1.0, work: Optional[torch.Tensor] = None) -> None:
    """acc += alpha·value, computed in float32 and rounded once into acc's dtype; `value` may sit on another device.

    `work` (float32, acc's shape, on acc's device) holds acc in float32 when acc is not float32 (else a new tensor).
    """
    if acc.dtype == torch.float32 and acc.device == value.device:
        acc.add_(value, alpha=alpha)
        return
    v = value.to(acc.device)  # blocking: a non_blocking device-to-host copy may be read before it lands
    if acc.dtype == torch.float32:
        acc.add_(v, alpha=alpha)
        return
    tmp = as_fp32(acc, work if work is not None and work.device == acc.device else None)
    acc.copy_(tmp.add_(v if v.dtype == torch.float32 else v.float(), alpha=alpha))
