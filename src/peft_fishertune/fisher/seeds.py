"""Counter-based random draws: a generator from a hash of integer keys (seed, step, layer, ...).

Draws depend only on these keys, never on a running generator state, so a resumed
estimator draws exactly what an uninterrupted one would, and a weight sample can be
regenerated in backward from its key instead of being kept.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch


def derived_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by a hash of integer keys."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, dtype=np.uint32)
    seed = (int(state[0]) << 31) ^ int(state[1])
    return torch.Generator().manual_seed(seed & ((1 << 63) - 1))


def derived_normal(shape, *keys: int, device=None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """N(0, 1) float32 of `shape` from the keys, drawn on `device` (CUDA: its Philox generator, fast; else CPU).

    Reproducible per device type: the same keys give the same numbers on every CPU, and on every GPU.
    On CPU a tensor of at least `PARALLEL_MIN` elements is drawn in two halves from the sub-keys (*keys, 0) and
    (*keys, 1), concurrently (torch's CPU normal sampler is single-threaded; the halves are fixed by the size, not
    by the thread count, so the numbers do not depend on the machine). `out` (contiguous float32 of `shape` on
    `device`) receives the numbers instead of a new tensor; they are the same either way.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    shape = tuple(shape)
    if out is not None and (tuple(out.shape) != shape or out.dtype != torch.float32 or out.device != device
                            or not out.is_contiguous()):
        raise ValueError(f"derived_normal: out must be a contiguous float32 tensor of shape {shape} on {device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if device.type == "cuda" and CUDA_DRAWS_ON_DEVICE:
        seed = derived_generator(*keys).initial_seed()
        g = torch.Generator(device=device).manual_seed(seed)
        if out is not None:
            return out.normal_(generator=g)
        return torch.randn(shape, generator=g, dtype=torch.float32, device=device)
    n = math.prod(shape)
    cpu_out = out if out is not None and device.type == "cpu" else torch.empty(shape, dtype=torch.float32)
    if n < PARALLEL_MIN:
        cpu_out.normal_(generator=derived_generator(*keys))
    else:
        flat, half = cpu_out.view(-1), (n + 1) // 2
        parts = [(flat[:half], derived_generator(*keys, 0)), (flat[half:], derived_generator(*keys, 1))]
        futures = [_pool().submit(_fill_normal, part, g) for part, g in parts]
        for f in futures:
            f.result()
    if device.type == "cpu":
        return cpu_out
    return cpu_out.to(device) if out is None else out.copy_(cpu_out)


PARALLEL_MIN = 1 << 20
# True: CUDA draws come from the device's Philox generator (fast; other numbers than the CPU's for the same keys).
# False: drawn on the CPU and copied, the same numbers on every device (tests compare the device arithmetic this way).
CUDA_DRAWS_ON_DEVICE = True
_POOL: Optional[ThreadPoolExecutor] = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="peft-fishertune-noise")
    return _POOL


def _fill_normal(t: torch.Tensor, g: torch.Generator) -> None:
    t.normal_(generator=g)
