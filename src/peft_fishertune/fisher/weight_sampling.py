"""Weight samples θ = θ̂ + σ⊙ξ made per layer inside the forward, regenerated in backward, never held whole.

While a pass runs, the module that owns each targeted weight gets an instance `forward` that
(1) makes that layer's sample from its counter-based key (`make()`: same key, same sample),
(2) shows it to the module's own forward as the weight (the parameter itself is never written), and
(3) with `regenerate=True` (the default), does not keep the sample for backward: an `nn.Linear` whose weight
    is the only targeted tensor runs `_SampledLinear` (forward F.linear(x, θ, b) saving only x; backward makes
    θ again from the key for ∂x = g·θ, and hands ∂θ = gᵀx to the callback: one extra noise draw per layer, no
    recomputed matmul); any other owner runs under non-reentrant activation checkpointing, so backward re-runs
    the layer, which regenerates the sample. With False the consuming op keeps its sample until backward: a
    transient copy of the targeted weights, and half the noise draws.
The gradient with respect to the sample reaches `on_grad(i, g)` through a small autograd function whose
backward is that callback; the sample tensor lives only while its layer computes. Afterwards every
instance `forward` is removed (exception-safe).

The sample is shown for the whole forward of the weight's *host*: the owner itself, or a PEFT tuner layer that
wraps it and reads its weight directly (`...q_proj` for `...q_proj.base_layer.weight`). A FisherTune layer with
active elements reads `base_layer.weight` itself and applies its sparse delta (it never calls the base layer),
so the sample must be visible while the wrapper computes: the layer then computes with θ + δ, exactly what the merged model
(W + δ, nothing active) computes with its own sample. Such hosts run under activation checkpointing (their
forward is re-run in backward, regenerating the sample). A weight whose host is never called (a parent module
reads it directly, or it is unused) is not sampled: its host is reported in `SampledPass.uncalled` and the
estimator warns (a weight whose host was called but that got no gradient has Fisher 0 legitimately: its
output does not reach the loss).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .gradients import LossFn, OnGrad, check_loss_has_grad, get_loss


class _Sample(torch.autograd.Function):
    """anchor (0-d, requires grad) -> make(); backward hands the sample's gradient to on_grad."""

    @staticmethod
    def forward(ctx, anchor, make, on_grad):
        ctx.on_grad = on_grad
        return make()

    @staticmethod
    def backward(ctx, grad):
        ctx.on_grad(grad)
        return grad.new_zeros(()), None, None


class _SampledLinear(torch.autograd.Function):
    """F.linear(x, make(), bias) keeping only x; backward regenerates the weight sample from its key."""

    @staticmethod
    def forward(ctx, x, anchor, bias, make, on_grad):
        ctx.make, ctx.on_grad = make, on_grad
        ctx.save_for_backward(x)
        return torch.nn.functional.linear(x, make(), bias)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        theta = ctx.make()
        grad_x = grad.matmul(theta) if ctx.needs_input_grad[0] else None
        del theta
        g2 = grad.reshape(-1, grad.shape[-1])
        ctx.on_grad(g2.t().matmul(x.reshape(-1, x.shape[-1])))
        # the bias's gradient is never asked for: passes run backward(inputs=anchors)
        return grad_x, grad.new_zeros(()), None, None, None


def _linear_fast_path(host: nn.Module, items) -> bool:
    return type(host) is nn.Linear and [(owner is host, attr) for _, owner, attr in items] == [(True, "weight")]


def _reads_base_weight(module: nn.Module) -> bool:
    """True for a PEFT tuner layer that computes with `base_layer.weight` itself instead of calling its base layer:
    a FisherTune layer with active elements (not merged, adapters enabled) runs its sparse-delta op on the weight.
    Other tuner layers (LoRA, ...) and a FisherTune layer with nothing active call the base layer."""
    from ..tuner.layer import FisherTuneLayer  # the one wrapper known to read its base weight directly

    if not isinstance(module, FisherTuneLayer) or module.disable_adapters or module.merged:
        return False
    return any(a in module.ft_values and module.num_active(a) > 0 for a in module.active_adapters)


def _host_path(model: nn.Module, owner_path: str) -> str:
    """Where the sample of a weight owned by `owner_path` must be in place: the outermost PEFT tuner layer around
    the owner (through `base_layer`) that reads the base weight directly, else the owner itself."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return owner_path
    host, path = owner_path, owner_path
    while True:
        parent, _, leaf = path.rpartition(".")
        if leaf != "base_layer":
            return host
        module = model.get_submodule(parent)
        if not isinstance(module, BaseTunerLayer):
            return host
        if _reads_base_weight(module):
            host = parent
        path = parent


def _owns(model: nn.Module, block: nn.Module, path: str) -> bool:
    owner = model.get_submodule(path.rpartition(".")[0])
    return any(m is owner for m in block.modules())


class SampledPass:
    def __init__(self) -> None:
        self.uncalled: list[str] = []  # hosts never called in the forward (their weights were not sampled)


@contextlib.contextmanager
def _owner_forwards(model: nn.Module, paths: Sequence[str], makers: Sequence[Callable[[], torch.Tensor]],
                    anchors: Sequence[torch.Tensor], callbacks: Sequence[Callable], state: SampledPass,
                    regenerate: Sequence[bool]):
    groups: dict[str, list[tuple[int, nn.Module, str]]] = {}
    for i, path in enumerate(paths):
        owner_path, _, attr = path.rpartition(".")
        groups.setdefault(_host_path(model, owner_path), []).append((i, model.get_submodule(owner_path), attr))
    installed: list[tuple[nn.Module, Optional[Any]]] = []
    called: dict[str, bool] = {}
    try:
        for host_path, items in groups.items():
            host = model.get_submodule(host_path)
            previous = host.__dict__.get("forward")
            inner = previous if previous is not None else types.MethodType(type(host).forward, host)
            called[host_path] = False

            def run(*args, _items=items, _inner=inner, **kwargs):
                for i, owner, attr in _items:
                    owner.__dict__[attr] = _Sample.apply(anchors[i], makers[i], callbacks[i])
                try:
                    return _inner(*args, **kwargs)
                finally:
                    for _, owner, attr in _items:
                        owner.__dict__.pop(attr, None)

            def forward(*args, _path=host_path, _run=run, _host=host, _items=items,
                        _linear=_linear_fast_path(host, items), _regen=all(regenerate[i] for i, _, _ in items),
                        **kwargs):
                called[_path] = True
                if not _regen or not torch.is_grad_enabled():
                    return _run(*args, **kwargs)
                if _linear and len(args) == 1 and not kwargs and not torch.is_autocast_enabled(args[0].device.type):
                    i = _items[0][0]
                    return _SampledLinear.apply(args[0], anchors[i], _host.bias, makers[i], callbacks[i])
                return checkpoint(_run, *args, use_reentrant=False, **kwargs)

            host.__dict__["forward"] = forward
            installed.append((host, previous))
        yield
    finally:
        for owner, previous in installed:
            if previous is None:
                owner.__dict__.pop("forward", None)
            else:
                owner.__dict__["forward"] = previous
        state.uncalled = [p for p, c in called.items() if not c]


def checkpoint_blocks(model: nn.Module, paths: Sequence[str]) -> list[nn.Module]:
    """The transformer blocks that own targeted weights: transformers' `GradientCheckpointingLayer` modules, or
    the children of an `nn.ModuleList` named `blocks` (timm); outermost only. Empty when there are none."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers
        GradientCheckpointingLayer = ()
    found: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        is_block = isinstance(mod, GradientCheckpointingLayer) if GradientCheckpointingLayer else False
        parent, _, leaf = name.rpartition(".")
        if not is_block and leaf.isdigit() and parent.rpartition(".")[2] == "blocks":
            is_block = isinstance(model.get_submodule(parent), nn.ModuleList)
        if is_block and not any(name.startswith(f + ".") for f, _ in found):
            found.append((name, mod))
    return [m for n, m in found if any(p.startswith(n + ".") for p in paths)]


@contextlib.contextmanager
def _checkpointed(blocks: Sequence[nn.Module]):
    installed = []
    try:
        for block in blocks:
            previous = block.__dict__.get("forward")
            inner = previous if previous is not None else types.MethodType(type(block).forward, block)

            def forward(*args, _inner=inner, **kwargs):
                if not torch.is_grad_enabled():
                    return _inner(*args, **kwargs)
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            block.__dict__["forward"] = forward
            installed.append((block, previous))
        yield
    finally:
        for block, previous in installed:
            if previous is None:
                block.__dict__.pop("forward", None)
            else:
                block.__dict__["forward"] = previous


def stream_sampled_grads(
    model: nn.Module,
    batch: Mapping[str, Any],
    paths: Sequence[str],
    makers: Sequence[Callable[[], torch.Tensor]],
    loss_fn: Optional[LossFn],
    on_grad: OnGrad,
    regenerate: bool = True,
    blocks: Sequence[nn.Module] = (),
) -> tuple[torch.Tensor, list[str]]:
    """One forward/backward with per-layer samples `makers[i]()` at `paths[i]`; `on_grad(i, g)` per weight.

    `regenerate=False` skips the checkpointing: each sample is made once and kept by the op that consumes it
    until its backward (one transient copy of the targeted weights at the end of the forward, half the draws).
    `blocks` (see `checkpoint_blocks`) run under activation checkpointing: only one block's activations and
    samples exist at a time; backward re-runs each block's forward, which makes its samples again from their keys
    (so inside a block the samples are kept for the block's own backward instead of regenerated a third time).
    Returns (detached loss, owner modules that were never called). g is None for a weight that got none.
    """
    ref = model.get_parameter(paths[0])
    anchors = [torch.zeros((), device=ref.device, requires_grad=True) for _ in paths]
    fired = [False] * len(paths)

    def cb(i: int):
        def f(g: torch.Tensor) -> None:
            fired[i] = True
            on_grad(i, g)

        return f

    state = SampledPass()
    inner = {i for i, p in enumerate(paths) for b in blocks if _owns(model, b, p)}
    regen = [regenerate and i not in inner for i in range(len(paths))]
    with _checkpointed(blocks), _owner_forwards(model, paths, makers, anchors, [cb(i) for i in range(len(paths))],
                                                state, regen):
        outputs = model(**batch)
        loss = get_loss(outputs, batch, loss_fn)
        check_loss_has_grad(loss)
        loss.backward(inputs=list(anchors))
        del outputs
    for i, done in enumerate(fired):
        if not done:
            on_grad(i, None)
    return loss.detach(), state.uncalled
