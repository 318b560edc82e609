"""Counter-based random draws: a generator from a hash of integer keys (seed, step, layer, ...).

Draws depend only on these keys, never on a running generator state, so a resumed
estimator draws exactly what an uninterrupted one would, and a weight sample can be
regenerated in backward from its key instead of being kept.

The weight noise ξ of the variational estimator (`derived_normal`) is, on the CPU, a function of the element's
position and the keys: `counter_normal_at`. Element j of a tensor drawn with keys K is
    h1 = L(L(j ^ k1) ^ k2),  h2 = L(h1 ^ k3),  (k1, k2, k3) = `counter_keys(*K)` (numpy's SeedSequence of K),
    u1 = ((h1 >> 8) + 1/2) / 2^24,  u2 = (h2 >> 8) / 2^24,  ξ_j = sqrt(−2 ln u1) · cos(2π u2)   (Box-Muller)
with L the 32-bit integer hash "lowbias32" (xor-shift-multiply, a bijection of 32-bit words). Two rounds with two
keys make streams of different keys unrelated (one round would make them permutations of each other). Written in
torch operations on int32 words (products wrap modulo 2^32), it runs eagerly or inside a compiled kernel: the estimator's fused CPU sample loop computes ξ
inline (`fused.sample_counter`: no noise tensor is written or read, and no thread pool waits against OpenMP's), and
elsewhere a compiled fill makes it (`derived_normal`; eager for small tensors or after a failed compile). Eager and
compiled agree to float32 rounding of log / cos / sqrt; the integer part is exact (tested against Python integers).
Tails are cut at |ξ| ≤ 5.9 (u1 ≥ 2^-25), a probability of 4e-9.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from .._compiled import CompiledKernels

logger = logging.getLogger("peft_fishertune.fisher")


def derived_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by a hash of integer keys."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, dtype=np.uint32)
    seed = (int(state[0]) << 31) ^ int(state[1])
    return torch.Generator().manual_seed(seed & ((1 << 63) - 1))


def counter_keys(*keys: int) -> tuple[int, int, int]:
    """The three 32-bit keys of `counter_normal_at` for integer keys (numpy's SeedSequence of them)."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(3, dtype=np.uint32)
    return int(state[0]), int(state[1]), int(state[2])


_M32 = 0xFFFFFFFF


def _signed32(k: int) -> int:
    """The int32 with the bits of the 32-bit word `k`."""
    k &= _M32
    return k - (1 << 32) if k >= (1 << 31) else k


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int32 words (torch's >> is arithmetic: the sign bits are masked off)."""
    return (x >> s) & ((1 << (32 - s)) - 1)


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    """The hash on int32 tensors holding 32-bit words: int32 products wrap modulo 2^32, the word arithmetic the
    hash is defined in (8 lanes per AVX2 register, where int64 words gave 4 and needed split products)."""
    x = x ^ _shr(x, 16)
    x = x * 0x7FEB352D
    x = x ^ _shr(x, 15)
    x = x * _signed32(0x846CA68B)
    return x ^ _shr(x, 16)


def counter_key_tensors(*keys: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`counter_keys(*keys)` as 0-d int32 tensors (their bits), the form a compiled kernel takes them in."""
    return tuple(torch.tensor(_signed32(k), dtype=torch.int32) for k in counter_keys(*keys))


def counter_normal_at(index: torch.Tensor, k1, k2, k3) -> torch.Tensor:
    """N(0, 1) float32 at integer positions `index` (0 <= index < 2^32) for keys k1, k2, k3 (32-bit words as ints,
    or 0-d int32 tensors holding their bits, `counter_key_tensors`): the formula of the module docstring, in torch
    operations on int32 words (eager or traced by torch.compile)."""
    word = index.to(torch.int32)  # the position's 32-bit word (positions from 2^31 wrap to negative int32)
    k1, k2, k3 = (_signed32(k) if isinstance(k, int) else k for k in (k1, k2, k3))
    h1 = _lowbias32(_lowbias32(word ^ k1) ^ k2)
    h2 = _lowbias32(h1 ^ k3)
    u1 = (_shr(h1, 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)
    u2 = _shr(h2, 8).to(torch.float32) * (1.0 / 16777216.0)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)


def counter_normal_like(t: torch.Tensor, k1, k2, k3) -> torch.Tensor:
    """ξ shaped like t, at t's flat positions (t contiguous): what a fill of t with these keys holds."""
    index = torch.arange(t.numel(), dtype=torch.int64, device=t.device).view(t.shape)
    return counter_normal_at(index, k1, k2, k3)


def _counter_fill(out: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, k3: torch.Tensor) -> None:
    """out (contiguous float32) ← ξ at its flat positions."""
    out.copy_(counter_normal_like(out, k1, k2, k3))


COUNTER_MAX_ELEMENTS = 1 << 32  # positions are 32-bit words
COMPILE_MIN_ELEMENTS = 1 << 18  # below: eager (the compile costs seconds once per process)
EAGER_CHUNK = 1 << 18  # eager: int64 temporaries of at most this many elements at a time


def _eager_fill(out: torch.Tensor, k1: int, k2: int, k3: int) -> torch.Tensor:
    """counter_fill's eager formula, in chunks (no int64 position tensor the size of `out`)."""
    n = out.numel()
    flat = out.view(-1)
    for start in range(0, n, EAGER_CHUNK):
        stop = min(start + EAGER_CHUNK, n)
        flat[start:stop] = counter_normal_at(torch.arange(start, stop, dtype=torch.int64), k1, k2, k3)
    return out


_FILL = CompiledKernels({"fill": _counter_fill}, where="Fisher estimator", what="the noise kernel",
                        instead="the eager formula runs instead (the same numbers to float32 rounding, slower)",
                        logger=logger)


def counter_fill(out: torch.Tensor, *keys: int) -> torch.Tensor:
    """Fill a contiguous CPU float32 tensor with ξ for `keys` (compiled for large tensors, else eager in chunks)."""
    n = out.numel()
    if n > COUNTER_MAX_ELEMENTS:
        raise ValueError(f"counter_fill: {n:,} elements; the counter-based draw addresses at most 2**32")
    if out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError(f"counter_fill: out must be a contiguous float32 CPU tensor, got {out.dtype} on {out.device}"
                         f"{'' if out.is_contiguous() else ', not contiguous'}")
    k1, k2, k3 = counter_keys(*keys)
    if n >= COMPILE_MIN_ELEMENTS and _FILL.available:
        _FILL("fill", out, *counter_key_tensors(*keys), eager=lambda o, *_: _eager_fill(o, k1, k2, k3))
        return out
    return _eager_fill(out, k1, k2, k3)


def check_addressable(named: dict[str, torch.Tensor]) -> None:
    """Refuse, naming them, CPU weights too large for the counter-based draw (more than 2^32 elements): called when
    the variational estimator is built and by FisherTuneSchedule before the first step."""
    big = [(n, t.numel()) for n, t in named.items() if t.device.type != "cuda" and t.numel() > COUNTER_MAX_ELEMENTS]
    if big:
        listed = ", ".join(f"{n} ({k:,} elements)" for n, k in big[:3])
        raise ValueError(f"the variational Fisher estimator's CPU weight noise addresses at most 2**32 elements per "
                         f"tensor; too large: {listed}. Estimate on a GPU, or use fisher_estimator='empirical'")


def derived_normal(shape, *keys: int, device=None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """N(0, 1) float32 of `shape` from the keys, drawn on `device` (CUDA: its Philox generator, fast; else CPU).

    Reproducible per device type: the same keys give the same numbers on every CPU (to float32 rounding: the
    counter-based formula of the module docstring, `counter_fill`), and on every GPU. `out` (contiguous float32 of
    `shape` on `device`) receives the numbers instead of a new tensor; they are the same either way.
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
    cpu_out = out if out is not None and device.type == "cpu" else torch.empty(shape, dtype=torch.float32)
    counter_fill(cpu_out, *keys)
    if device.type == "cpu":
        return cpu_out
    return cpu_out.to(device) if out is None else out.copy_(cpu_out)


# True: CUDA draws come from the device's Philox generator (fast; other numbers than the CPU's for the same keys).
# False: drawn on the CPU and copied, the same numbers on every device (tests compare the device arithmetic this way).
CUDA_DRAWS_ON_DEVICE = True
