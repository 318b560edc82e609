"""Shared plumbing of the Fisher estimators: parameters, losses, gradients, ranks, seeds.

Every estimator differentiates the model *functionally*: the targeted weights are
swapped in with `torch.func.functional_call` as fresh leaf tensors (views of the
weights, or weight samples θ̂ + σ⊙ξ for the variational estimate). The model's own
parameters are never written, their `requires_grad` is never toggled and no `.grad`
is touched (`torch.autograd.grad` returns gradients instead of accumulating them).
So an exception mid-estimate cannot leave the model modified, and restoring weights
after a weight sample is exact by construction (nothing was changed).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

logger = logging.getLogger("peft_fishertune.fisher")

LossFn = Callable[[Any, Mapping[str, Any]], torch.Tensor]


class FisherInputError(ValueError):
    """Bad input to an estimator (empty data, no loss, non-finite gradients, ...)."""


# --------------------------------------------------------------------------- parameters
def resolve_params(model: nn.Module, params: Optional[Mapping[str, nn.Parameter]]) -> dict[str, nn.Parameter]:
    """`params` as a dict, or `dict(target_parameters(model))` when None."""
    if params is None:
        try:
            from ..tuner.selection import target_parameters  # lazy: selection depends on the tuner
        except ImportError as exc:  # pragma: no cover - only before selection.py exists
            raise FisherInputError(
                "params=None needs peft_fishertune.tuner.selection.target_parameters, which could not be imported "
                f"({exc}); pass params={{name: parameter}} explicitly"
            ) from exc
        params = dict(target_parameters(model))
    if not isinstance(params, Mapping):
        raise FisherInputError(f"params must be a mapping name -> nn.Parameter, got {type(params).__name__}")
    params = dict(params)
    if not params:
        raise FisherInputError("params is empty: there is no targeted weight to score")
    for name, p in params.items():
        if not isinstance(p, torch.Tensor):
            raise FisherInputError(f"params[{name!r}] is a {type(p).__name__}, expected a torch.Tensor / nn.Parameter")
        if not p.is_floating_point():
            raise FisherInputError(f"params[{name!r}] has dtype {p.dtype}; expected a floating-point weight")
    return params


def module_paths(model: nn.Module, params: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Map each user-facing name to the parameter's attribute path inside `model`.

    The names of `target_parameters` are those of the unwrapped model, while a PEFT
    model holds the same tensor at e.g. `base_model.model.<name minus .weight>.base_layer.weight`;
    `functional_call` needs the latter, so we match by identity.
    """
    by_id = {}
    for path, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), path)
    out = {}
    for name, p in params.items():
        if id(p) not in by_id:
            raise FisherInputError(
                f"params[{name!r}] is not a parameter of the model (matched by identity); "
                "pass the model's own nn.Parameter objects"
            )
        out[name] = by_id[id(p)]
    return out


# --------------------------------------------------------------------------- batches and losses
def batch_size_of(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            return int(value.shape[0])
    raise FisherInputError(
        f"batch has no tensor with a batch dimension (keys: {sorted(batch)}); expected e.g. pixel_values of shape (B, C, H, W)"
    )


def split_batched(batch: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """Split a batch into per-sample tensors (first dim == B) and everything else (shared)."""
    b = batch_size_of(batch)
    batched, shared = {}, {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == b:
            batched[key] = value
        else:
            shared[key] = value
    return batched, shared, b


def check_batch(batch: Any, index: int) -> Mapping[str, Any]:
    if not isinstance(batch, Mapping):
        raise FisherInputError(
            f"batch {index} is a {type(batch).__name__}; expected a mapping of model keyword arguments "
            "(the model is called as model(**batch))"
        )
    if batch_size_of(batch) == 0:
        raise FisherInputError(f"batch {index} is empty (batch size 0)")
    return batch


def get_loss(outputs: Any, batch: Mapping[str, Any], loss_fn: Optional[LossFn]) -> torch.Tensor:
    if loss_fn is not None:
        loss = loss_fn(outputs, batch)
        source = "loss_fn(outputs, batch)"
    else:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
        source = "outputs.loss"
    if loss is None:
        raise FisherInputError(
            f"{source} is None: the batch (keys {sorted(batch)}) produced no loss; include the labels in the "
            "batch or pass loss_fn=lambda outputs, batch: ..."
        )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise FisherInputError(f"{source} must be a scalar tensor, got {shape}")
    return loss.reshape(())


# --------------------------------------------------------------------------- gradients
def _grads_of(loss: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    if not loss.requires_grad:
        raise FisherInputError(
            "the loss does not depend on any targeted weight (it has no gradient); check params / target_modules"
        )
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def batch_gradient(
    model: nn.Module,
    batch: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor],
    loss_fn: Optional[LossFn],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Gradient of the batch loss w.r.t. `weights` (path -> tensor) substituted into the model."""
    leaves = {p: w.detach().requires_grad_(True) for p, w in weights.items()}
    outputs = torch.func.functional_call(model, leaves, args=(), kwargs=dict(batch), strict=False)
    loss = get_loss(outputs, batch, loss_fn)
    return _grads_of(loss, list(leaves.values())), loss.detach()


def per_sample_sq_grads_loop(model, batch, weights, loss_fn) -> tuple[list[torch.Tensor], int]:
    """Σ_i g_i² by one forward/backward per sample (micro-batches of 1)."""
    batched, shared, b = split_batched(batch)
    acc = None
    for i in range(b):
        sample = dict(shared)
        sample.update({k: v[i : i + 1] for k, v in batched.items()})
        grads, _ = batch_gradient(model, sample, weights, loss_fn)
        sq = [g.float().square() for g in grads]
        acc = sq if acc is None else [a.add_(s) for a, s in zip(acc, sq)]
    return acc, b


def per_sample_sq_grads_vmap(model, batch, weights, loss_fn, chunk_size=None) -> tuple[list[torch.Tensor], int]:
    """Σ_i g_i² with vectorized per-sample gradients (torch.func: functional_call + grad + vmap)."""
    batched, shared, b = split_batched(batch)
    paths = list(weights)
    detached = {p: w.detach() for p, w in weights.items()}

    def loss_of(w: dict, sample: dict) -> torch.Tensor:
        kwargs = dict(shared)
        kwargs.update({k: v.unsqueeze(0) for k, v in sample.items()})
        outputs = torch.func.functional_call(model, w, args=(), kwargs=kwargs, strict=False)
        return get_loss(outputs, kwargs, loss_fn)

    per_sample = torch.func.vmap(
        torch.func.grad(loss_of), in_dims=(None, 0), randomness="different", chunk_size=chunk_size
    )(detached, batched)
    return [per_sample[p].detach().float().square().sum(0) for p in paths], b


def check_finite(names: list[str], tensors: list[torch.Tensor], where: str) -> None:
    for name, t in zip(names, tensors):
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise FisherInputError(
                f"non-finite gradient for {name!r} ({bad} of {t.numel()} elements are NaN/inf) {where}; "
                "check the loss (e.g. all pixels ignored) and the inputs"
            )


# --------------------------------------------------------------------------- processes
class Ranks:
    """Rank/world size and sum-reduction, from an `accelerate.Accelerator` or torch.distributed."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        if accelerator is not None:
            self.world_size = int(accelerator.num_processes)
            self.rank = int(accelerator.process_index)
            self.is_main = bool(accelerator.is_main_process)
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            self.world_size = torch.distributed.get_world_size()
            self.rank = torch.distributed.get_rank()
            self.is_main = self.rank == 0
        else:
            self.world_size, self.rank, self.is_main = 1, 0, True

    def sum_(self, tensors: Iterable[torch.Tensor]) -> None:
        """In-place all-reduce (sum) of each tensor across processes; no-op on one process."""
        if self.world_size == 1:
            return
        for t in tensors:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)

    def sum_scalars(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t.tolist()

    @property
    def device(self) -> torch.device:
        if self.accelerator is not None:
            return self.accelerator.device
        if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


# --------------------------------------------------------------------------- seeds
def derived_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by a hash of integer keys (seed, step, rank, ...).

    Draws depend only on these keys, never on a running generator state, so a
    resumed estimator draws exactly what an uninterrupted one would.
    """
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, dtype=np.uint32)
    seed = (int(state[0]) << 31) ^ int(state[1])
    return torch.Generator().manual_seed(seed & ((1 << 63) - 1))


def finite_float(name: str, value, *, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise FisherInputError(f"{name}={value!r}; expected a finite{' positive' if positive else ''} number")
    return float(value)
