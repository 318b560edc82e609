"""Reading device values on the host, in one place.

On an accelerator every read of a tensor's value (`float(t)`, `int(t)`, `bool(t)`, `torch.nonzero`) waits for the
device's queue to drain, and the Python that prepares the next kernels waits with it. The per-step paths that must
know a value (the estimator's finite check and ε, the δ(t) update's counts) collect what they need on the device
and read it here once: `host_values`.
"""

from __future__ import annotations

import torch


def host_values(t: torch.Tensor) -> list:
    """`t`'s values as Python numbers (nested lists for more than one dimension): one copy to the host."""
    return t.to("cpu", copy=True).tolist()
