"""Counter-based random draws: a generator from a hash of integer keys (seed, step, layer, ...).

Draws depend only on these keys, never on a running generator state, so a resumed
estimator draws exactly what an uninterrupted one would, and a weight sample can be
regenerated in backward from its key instead of being kept.
"""

from __future__ import annotations

import numpy as np
import torch


def derived_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by a hash of integer keys."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, dtype=np.uint32)
    seed = (int(state[0]) << 31) ^ int(state[1])
    return torch.Generator().manual_seed(seed & ((1 << 63) - 1))


def derived_normal(shape, *keys: int, device=None) -> torch.Tensor:
    """N(0, 1) float32 of `shape` from the keys, drawn on `device` (CUDA: its Philox generator, fast; else CPU).

    Reproducible per device type: the same keys give the same numbers on every CPU, and on every GPU.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda":
        seed = derived_generator(*keys).initial_seed()
        g = torch.Generator(device=device).manual_seed(seed)
        return torch.randn(tuple(shape), generator=g, dtype=torch.float32, device=device)
    out = torch.randn(tuple(shape), generator=derived_generator(*keys), dtype=torch.float32)
    return out if device.type == "cpu" else out.to(device)
