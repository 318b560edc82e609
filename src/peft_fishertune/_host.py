"""Reading device values on the host, in one place.

On an accelerator every read of a tensor's value (`float(t)`, `int(t)`, `bool(t)`, `torch.nonzero`) waits for the
device's queue to drain, and the Python that prepares the next kernels waits with it. The per-step paths that must
know a value (the estimator's finite check and ε, the δ(t) update's counts) collect what they need on the device
and read it here once: `host_values`, or `host_values_of` for many tensors (one copy per device).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def host_values(t: torch.Tensor) -> list:
    """`t`'s values as Python numbers (nested lists for more than one dimension): one copy to the host."""
    return t.to("cpu", copy=True).tolist()


def host_values_of(tensors: Sequence[torch.Tensor]) -> list[list]:
    """Each tensor's values, flattened, as Python numbers, in the order given: the tensors of each device are
    concatenated (torch's type promotion) and copied to the host at once, one read per device."""
    by_device: dict[torch.device, list[int]] = {}
    for j, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(j)
    out: list[list] = [[] for _ in tensors]
    for js in by_device.values():
        flat = host_values(torch.cat([tensors[j].reshape(-1) for j in js]))
        start = 0
        for j in js:
            n = tensors[j].numel()
            out[j], start = flat[start:start + n], start + n
    return out
