"""Gradients of the targeted weights, streamed: batches and losses, per-sample splitting, the model guard.

Each pass hands every targeted weight's gradient to a callback `on_grad(i, g)` as soon as autograd
has produced it, then drops it, so no full-model gradient is ever held at once:

* `stream_grads` substitutes fresh leaf views of the weights (or given tensors) with
  `torch.func.functional_call`, runs `loss.backward(inputs=leaves)` and folds each leaf's gradient
  in its `register_post_accumulate_grad_hook` (which fires once the gradient is complete), then sets
  it to None. The model's own parameters are never written, their `requires_grad` is never toggled and
  their `.grad` is never touched; `backward(inputs=...)` leaves every other parameter's `.grad` (e.g.
  the decoder's, between two optimizer steps) as it was.
* `per_sample_sq_grads_vmap` computes per-sample gradients of one chunk of the batch with
  `torch.func` (grad + vmap) and folds Σ_chunk g_i² per weight: the extra memory is one chunk's
  per-sample gradients (`vmap_chunk_size` samples; the whole batch when None).

`model_guard` keeps every buffer of the model bit-identical across a pass: BatchNorm modules stop
tracking running statistics for the duration (train-mode outputs are unchanged: they use batch
statistics either way, and vmap then runs BN models), and any other buffer is restored afterwards.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

from .errors import FisherInputError

logger = logging.getLogger("peft_fishertune.fisher")

LossFn = Callable[[Any, Mapping[str, Any]], torch.Tensor]
OnGrad = Callable[[int, Optional[torch.Tensor]], None]


# --------------------------------------------------------------------------- parameters
def check_params(model: nn.Module, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`params` as a dict of the model's own floating-point parameters (checked)."""
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
    """Map each user-facing name to the parameter's attribute path inside `model` (matched by identity).

    FisherTune's names are those of the unwrapped model, while a PEFT model holds the same tensor at
    e.g. `base_model.model.<name minus .weight>.base_layer.weight`.
    """
    by_id: dict[int, str] = {}
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


# --------------------------------------------------------------------------- batches
def batch_size_of(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            return int(value.shape[0])
    raise FisherInputError(
        f"batch has no tensor with a batch dimension (keys: {sorted(batch)}); expected e.g. pixel_values of shape "
        "(B, C, H, W)"
    )


def check_batch(batch: Any, index: int) -> Mapping[str, Any]:
    if not isinstance(batch, Mapping):
        raise FisherInputError(
            f"batch {index} is a {type(batch).__name__}; expected a mapping of model keyword arguments "
            "(the model is called as model(**batch))"
        )
    if batch_size_of(batch) == 0:
        raise FisherInputError(f"batch {index} is empty (batch size 0)")
    return batch


def _kind(key: str, value: Any, b: int) -> str:
    """'tensor' (split on dim 0), 'list' (split by index) or 'shared' (the same for every sample)."""
    if isinstance(value, torch.Tensor):
        return "tensor" if value.ndim >= 1 and value.shape[0] == b else "shared"
    if isinstance(value, (list, tuple)):
        if len(value) == b:
            return "list"
        raise FisherInputError(
            f"batch[{key!r}] is a {type(value).__name__} of length {len(value)} but the batch has {b} samples: "
            "per-sample Fisher cannot split it (one entry per sample expected); use fisher_mode='batch' or fix the "
            "collate function"
        )
    if isinstance(value, Mapping):
        raise FisherInputError(
            f"batch[{key!r}] is a nested mapping: per-sample Fisher cannot split it per sample; flatten it into "
            "top-level tensors / lists, or use fisher_mode='batch'"
        )
    return "shared"  # None, numbers, strings, flags


def split_kinds(batch: Mapping[str, Any]) -> tuple[dict[str, str], int]:
    b = batch_size_of(batch)
    return {k: _kind(k, v, b) for k, v in batch.items()}, b


def sample_of(batch: Mapping[str, Any], kinds: Mapping[str, str], i: int) -> dict[str, Any]:
    """Sample i as a batch of one: tensors sliced on dim 0, lists/tuples reduced to their i-th entry."""
    out = {}
    for k, v in batch.items():
        kind = kinds[k]
        if kind == "tensor":
            out[k] = v[i : i + 1]
        elif kind == "list":
            out[k] = type(v)([v[i]]) if isinstance(v, tuple) else [v[i]]
        else:
            out[k] = v
    return out


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


def check_loss_has_grad(loss: torch.Tensor) -> None:
    if not loss.requires_grad:
        raise FisherInputError(
            "the loss does not depend on any targeted weight (it has no gradient); check params / target_modules"
        )


# --------------------------------------------------------------------------- the model guard
@contextlib.contextmanager
def model_guard(model: nn.Module):
    """Every buffer of `model` is bit-identical after the block (exception-safe); see the module docstring."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    bn_buffers = {id(b) for m in bns for b in m.buffers(recurse=False)}
    others = [(b, b.detach().clone()) for b in model.buffers() if id(b) not in bn_buffers]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True
        with torch.no_grad():
            for b, saved in others:
                if not torch.equal(b, saved):
                    b.copy_(saved)


# --------------------------------------------------------------------------- streamed gradients
def stream_grads(
    model: nn.Module,
    batch: Mapping[str, Any],
    paths: Sequence[str],
    weights: Sequence[torch.Tensor],
    loss_fn: Optional[LossFn],
    on_grad: OnGrad,
) -> torch.Tensor:
    """One forward/backward of `batch` with `weights[i]` substituted at `paths[i]`; `on_grad(i, g)` per weight.

    g is None for a weight the loss does not reach. Returns the detached loss.
    """
    leaves = [w.detach().requires_grad_(True) for w in weights]
    fired = [False] * len(leaves)

    def hook_for(i: int):
        def hook(leaf: torch.Tensor) -> None:
            g = leaf.grad
            leaf.grad = None
            fired[i] = True
            on_grad(i, g)

        return hook

    handles = [leaf.register_post_accumulate_grad_hook(hook_for(i)) for i, leaf in enumerate(leaves)]
    try:
        outputs = torch.func.functional_call(model, dict(zip(paths, leaves)), args=(), kwargs=dict(batch),
                                             strict=False)
        loss = get_loss(outputs, batch, loss_fn)
        check_loss_has_grad(loss)
        loss.backward(inputs=leaves)
        del outputs
    finally:
        for h in handles:
            h.remove()
    for i, done in enumerate(fired):
        if not done:
            on_grad(i, None)
    return loss.detach()


def per_sample_sq_grads_vmap(
    model: nn.Module,
    batch: Mapping[str, Any],
    paths: Sequence[str],
    weights: Sequence[torch.Tensor],
    loss_fn: Optional[LossFn],
    on_sq: OnGrad,
    chunk_size: Optional[int] = None,
) -> int:
    """Σ_i g_i² per weight by vectorized per-sample gradients, one chunk of samples at a time.

    `on_sq(i, Σ_chunk g²)` is called once per weight and chunk. Refuses list-valued entries (vmap cannot
    batch them; the caller uses the loop). Returns the number of samples.
    """
    kinds, b = split_kinds(batch)
    lists = [k for k, kind in kinds.items() if kind == "list"]
    if lists:
        raise FisherInputError(f"vmap cannot batch list-valued entries {lists}; use per_sample_method='loop'")
    batched = {k: v for k, v in batch.items() if kinds[k] == "tensor"}
    shared = {k: v for k, v in batch.items() if kinds[k] != "tensor"}
    detached = {p: w.detach() for p, w in zip(paths, weights)}

    def loss_of(w: dict, sample: dict) -> torch.Tensor:
        kwargs = dict(shared)
        kwargs.update({k: v.unsqueeze(0) for k, v in sample.items()})
        outputs = torch.func.functional_call(model, w, args=(), kwargs=kwargs, strict=False)
        return get_loss(outputs, kwargs, loss_fn)

    step = b if chunk_size is None else max(1, int(chunk_size))
    per_sample_grad = torch.func.vmap(torch.func.grad(loss_of), in_dims=(None, 0), randomness="different")
    for start in range(0, b, step):
        chunk = {k: v[start : start + step] for k, v in batched.items()}
        with torch.no_grad():  # the transform still differentiates; no outer graph through untargeted weights
            grads = per_sample_grad(detached, chunk)
        for i, p in enumerate(paths):
            g = grads.pop(p)
            on_sq(i, g.float().square_().sum(0))
            del g
        del grads
    return b
