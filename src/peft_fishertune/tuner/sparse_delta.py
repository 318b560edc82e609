"""The sparse-delta autograd function of a FisherTune layer and its two backward kernels.

    y = op(x, W + Σ_a scatter(v_a at the active indices of adapter a))

Forward builds the merged weight under no_grad and saves only x (and the base weight / values by reference);
backward rebuilds it. For `nn.Linear` (layers whose `sddmm_backward` is True) the values' gradient is
`(gᵀ x)` sampled at the active entries with `torch.sparse.sampled_addmm` (SDDMM, no dense dW) in fp32/fp64 on
CPU; otherwise (other layer types, bf16/fp16, accelerators) the layer's dense dW is formed transiently and
gathered. Inactive candidates get exact zeros.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch


def _merged_weight(weight: torch.Tensor, layer, adapters, values) -> torch.Tensor:
    merged = weight.detach().reshape(-1).clone()
    for a, val in zip(adapters, values):
        _, pos = layer._active(a)
        v = val.detach() if pos is None else val.detach()[pos.long()]
        merged.index_add_(0, layer.active_indices(a), v.to(merged.dtype))
    return merged.view(weight.shape)


def _autocast_state(device_type: str):
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError):  # device types without autocast
        return False, None


class SparseDelta(torch.autograd.Function):
    """y = op(x, W + Σ_a scatter(v_a)); saves x only, rebuilds the merged weight in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, adapters, *values):
        with torch.no_grad():
            merged = _merged_weight(weight, layer, adapters, values)
            out = layer._op(x, merged, bias)
        ctx.layer, ctx.adapters = layer, adapters
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x, weight, bias, *values)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, *values = ctx.saved_tensors
        layer = ctx.layer
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_v = ctx.needs_input_grad[5:]
        merged = _merged_weight(weight, layer, ctx.adapters, values)
        backward = _linear_backward if layer.sddmm_backward else _generic_backward
        gx, gw, gb, sampled = backward(layer, ctx, x, merged, bias, grad_out, need_x, need_w, need_b, need_v)
        gv = []
        for a, val, g in zip(ctx.adapters, values, sampled):
            if g is None:
                gv.append(None)
                continue
            _, pos = layer._active(a)
            if pos is None:
                gv.append(g.to(val.dtype))
            else:  # inactive candidates: exact zeros
                full = torch.zeros_like(val)
                full[pos.long()] = g.to(val.dtype)
                gv.append(full)
        return (gx, gw, gb, None, None, *gv)


def _linear_backward(layer, ctx, x, merged, bias, grad_out, need_x, need_w, need_b, need_v):
    """Returns (grad x, grad W, grad bias, [gradient at each adapter's active entries, ascending index order])."""
    enabled, ac_dtype = ctx.autocast
    cdt = ac_dtype if enabled and ac_dtype is not None else x.dtype
    g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    gx = gw = gb = None
    if need_x:
        gx = (g.to(cdt) @ merged.to(cdt)).view(x.shape).to(x.dtype)
    if need_b:
        gb = g.sum(0).to(bias.dtype)
    if need_w:
        gw = (g.t().to(cdt) @ x2.to(cdt)).to(merged.dtype)
    sampled = []
    gt = None  # gᵀ, made contiguous once (SDDMM is ~4x faster on a contiguous operand)
    in_f = layer.weight_shape[1]
    for a, need in zip(ctx.adapters, need_v):
        if not need:
            sampled.append(None)
            continue
        idx = layer.active_indices(a)
        if (g.dtype in (torch.float32, torch.float64) and x2.dtype == g.dtype and x2.device.type == "cpu"
                and not torch.compiler.is_compiling()):  # torch.compile cannot create sparse tensors: dense path
            if gt is None:
                gt = g.t().contiguous()
            crow = layer._crow(a)
            col = (idx % in_f).to(crow.dtype)  # transient: ascending indices are already in CSR order
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(crow, col, torch.zeros(col.numel(), dtype=g.dtype, device=g.device),
                                                  size=tuple(layer.weight_shape))
            sampled.append(torch.sparse.sampled_addmm(pattern, gt, x2, beta=0.0).values())
        else:  # bf16/fp16, accelerator or torch.compile: dense dW of this layer only (transient), then gather
            dw = gw if gw is not None else (g.t().to(cdt) @ x2.to(cdt))
            sampled.append(dw.reshape(-1)[idx.long()])
    return gx, gw, gb, sampled


def _generic_backward(layer, ctx, x, merged, bias, grad_out, need_x, need_w, need_b, need_v):
    enabled, ac_dtype = ctx.autocast
    dev = x.device.type
    with torch.enable_grad(), torch.autocast(dev, dtype=ac_dtype, enabled=enabled) if ac_dtype is not None else nullcontext():
        xr = x.detach().requires_grad_(need_x and x.is_floating_point())
        wr = merged.detach().requires_grad_(True)
        br = bias.detach().requires_grad_(True) if (bias is not None and need_b) else bias
        out = layer._op(xr, wr, br)
        inputs = [t for t in (xr, wr, br) if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = torch.autograd.grad(out, inputs, grad_out)
    gmap = dict(zip([id(t) for t in inputs], grads))
    gx = gmap.get(id(xr)) if need_x else None
    gw_dense = gmap[id(wr)]
    gb = gmap.get(id(br)) if need_b else None
    sampled = [gw_dense.reshape(-1)[layer.active_indices(a).long()] if need else None
               for a, need in zip(ctx.adapters, need_v)]
    return gx, (gw_dense if need_w else None), gb, sampled


class ZeroGradLink(torch.autograd.Function):
    """out -> out, joined to `values` in the graph with exact zero gradients (a layer with no active element)."""

    @staticmethod
    def forward(ctx, out, *values):
        ctx.specs = [(v.shape, v.dtype, v.device) for v in values]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        return (grad_out, *[torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.specs])
