"""The sparse-delta autograd function of a FisherTune layer and its two backward kernels.

    y = op(x, W + Σ_a scatter(v_a at the active indices of adapter a))

No weight-sized tensor is built. Forward writes the active entries into the base weight's own storage
(`W[i] + v[i]`, the same float operation as a merged copy), runs the op, and writes the saved base values back, bit for
bit, before it returns; backward does the same around `gx = g @ W'`. So the base weight is the pretrained one whenever
control is outside this function (after a forward, a backward, an optimizer step, a checkpoint or a save), and the
cost is three k-sized index operations per layer and pass instead of a weight-sized copy (k = active elements).
Forward saves only x (and the base weight / values by reference).

`deltas_in_weights(model)` does the write once for a whole training step instead (FisherTuneTrainer wraps each
forward + backward in it): the weight holds W + v for the step, every forward and backward reads it as it is, and the
base values are written back on exit, bit for bit. One index_select + index_add at entry and one index_put at exit
per layer, against three per forward and three per backward.

Where the in-place write is not safe (torch.compile tracing, functorch-wrapped or non-contiguous weights, a weight
that is a non-leaf of an autograd graph, e.g. under `torch.func.functional_call`), the effective weight is built
out of place as before.

For `nn.Linear` (layers whose `sddmm_backward` is True) the values' gradient `(gᵀ x)` at the active entries comes
from whichever is cheaper at the layer's active density (`SDDMM_MAX_DENSITY`, per device type):
- below the threshold, SDDMM (`torch.sparse.sampled_addmm`, fp32/fp64): cost ∝ active entries;
- at or above it, the layer's dense dW in one GEMM (into a reused per-shape, per-thread workspace on CPU, so no
  weight-sized allocation per step) and a gather.
bf16/fp16 and torch.compile always take the dense path. Other layer types re-run the op in backward and gather the
dense weight gradient. Inactive candidates get exact zeros.

SDDMM reads both of its operands as (features, tokens) rows: gᵀ and xᵀ, contiguous. On the CPU an eager
`t().contiguous()` of a (tokens, features) activation is one serial blocked loop (514 x 3072 fp32: ~2 ms on 2 cores,
~70 ms of a DINOv2-B stage-3 step), so tensors of at least `TRANSPOSE_COMPILE_MIN_ELEMENTS` are transposed by one
inductor-compiled kernel (tiled, vectorized, OpenMP: ~0.3 ms), a copy with the same values. A compile that fails is
logged once, naming the error, and the eager copy runs from then on (same values, slower).

Inside `deltas_in_weights` (a training step) the two transposes are written into buffers reused by every layer of
the step, one per operand role and shape, freed when the step's context closes: a DINOv2-B backward otherwise makes
144 fresh activation-sized tensors (up to 6.3 MB each) whose pages the allocator hands back and faults in again:
0-36 ms of a 1.5 s stage-3 step on the CPU, depending on the allocator's state (`benchmarks/stage3_kernels_ab.py`,
`benchmarks/results/stage3_kernels_ab*_2026-12-05.md`). Same values bit for bit. The buffers are per thread; outside
the context, or when the buffered kernel cannot be compiled, each transpose is a new tensor as before.

Higher-order gradients (`create_graph=True`) are refused in backward, naming the layer: the weight with the deltas
written in is not a differentiable function of them there, so a second derivative would miss terms.
"""

from __future__ import annotations

import logging
import threading
import warnings
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import torch
from torch import nn

from .._compiled import CompiledKernels

# Active density (active elements / weight elements of one layer) at or above which a Linear layer's values' gradient
# is taken from its dense dW (GEMM + gather) instead of SDDMM. Keys are device types.
# - "cpu": measured by benchmarks/sddmm_crossover.py on this project's shared 2-core CPU machine (DINOv2-B shapes,
#   514 tokens), SDDMM's two operands transposed by the compiled kernel (`contiguous_t`;
#   benchmarks/results/sddmm_crossover_2026-12-04_compiled_transpose.md): on the quiet machine 0.14-0.17 for 768x768
#   and 0.18-0.20 for 3072x768 / 768x3072; 0.15 is the smallest of them. (With eager transposes it was 0.158 quiet and
#   0.06 at load 5-14, when the threshold was 0.10.) An oversubscribed CPU (more busy threads than cores) moves it
#   far down (0.02-0.04 at load 6): SDDMM's many small parallel tasks suffer most from it.
# - "cuda": measured on an H200 (benchmarks/gpu_check.sh, 2026-12-04, torch 2.11 + CUDA 13, DINOv2-L shapes
#   1024x1024 / 4096x1024 / 1024x4096, 5188 tokens, fp32; benchmarks/results/gpu_2026-12-04/): SDDMM is slower than
#   one cuBLAS GEMM + gather at every density tried (0.01: 0.6 / 1.4 / 1.5 ms against 0.3 / 0.9 / 0.9 ms), so the
#   crossover is 0: the dense path always.
SDDMM_MAX_DENSITY_CPU = 0.15
SDDMM_MAX_DENSITY_CUDA = 0.0
SDDMM_MAX_DENSITY: dict[str, float] = {"cpu": SDDMM_MAX_DENSITY_CPU, "cuda": SDDMM_MAX_DENSITY_CUDA}

# CPU: one reused dense-dW buffer per (shape, dtype) and thread (.buffers). Per thread because a dW is written into
# it and then gathered: two threads training same-shaped layers at once must not overwrite each other's dW.
_WORKSPACE = threading.local()

logger = logging.getLogger("peft_fishertune.tuner")

# Below this many elements a transpose is copied eagerly: the compile costs seconds and, when it is the process's
# first, ~240 MiB of resident inductor code; at DINOv2-B size (514 tokens) every activation is above it.
TRANSPOSE_COMPILE_MIN_ELEMENTS = 1 << 18


def _transpose_eager(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous()


def _transpose_into(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return out.copy_(t.t())


# the transpose as a new tensor, and into a step buffer: two groups, so that one failing leaves the other in use
_TRANSPOSE = CompiledKernels({"copy": _transpose_eager}, where="FisherTune layers", what="the transpose kernel",
                             instead="the eager copy runs instead (same gradients, slower SDDMM backward)",
                             logger=logger, announce="the SDDMM operand transpose")
_TRANSPOSE_INTO = CompiledKernels({"into": _transpose_into}, where="FisherTune layers", what="the buffered transpose",
                                  instead="each transpose makes a new tensor instead (same gradients, more allocation)",
                                  logger=logger, announce="the buffered SDDMM operand transpose")


def _compiles(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.numel() >= TRANSPOSE_COMPILE_MIN_ELEMENTS and _TRANSPOSE.available


def contiguous_t(t: torch.Tensor) -> torch.Tensor:
    """tᵀ of a 2-D tensor, contiguous: compiled on the CPU for large tensors (see the module docstring), eager
    otherwise. The values are t's, copied."""
    return _TRANSPOSE("copy", t) if _compiles(t) else _transpose_eager(t)


TRANSPOSE_BUFFERS_IN_STEP = True  # False: every SDDMM operand transpose is a new tensor (benchmarks, tests)
_STEP = threading.local()  # .buffers: this thread's transpose buffers while a deltas_in_weights() step is open


def step_transpose(t: torch.Tensor, role: str) -> torch.Tensor:
    """`contiguous_t(t)`, written into this step's buffer for (`role`, shape, dtype) when a `deltas_in_weights()`
    step is open on this thread and the compiled kernel applies. The result is valid until the next call with the
    same role and shape (the next layer's backward): use it at once, do not keep it."""
    buffers = getattr(_STEP, "buffers", None)
    if (buffers is None or not TRANSPOSE_BUFFERS_IN_STEP or not _compiles(t) or not _TRANSPOSE_INTO.available
            or torch.is_grad_enabled() or t.dim() != 2):
        return contiguous_t(t)
    key = (role, t.shape[1], t.shape[0], t.dtype)
    buf = buffers.get(key)
    if buf is None:
        buf = buffers[key] = torch.empty((t.shape[1], t.shape[0]), dtype=t.dtype, device=t.device)
    out = _TRANSPOSE_INTO("into", t, buf, eager=_no_buffer)
    if out is None:  # the compile failed (logged): a new tensor from now on
        buffers.clear()
        return contiguous_t(t)
    return out


def _no_buffer(t: torch.Tensor, out: torch.Tensor) -> None:
    return None


@contextmanager
def _step_buffers():
    """This thread's transpose buffers for the duration of one step (nested steps share the outer one's)."""
    outer = getattr(_STEP, "buffers", None)
    if outer is None:
        _STEP.buffers = {}
    try:
        yield
    finally:
        if outer is None:
            _STEP.buffers = None


def warm_transpose(layer, x: torch.Tensor, adapters, values) -> None:
    """Compile the transpose now, on a small tensor of x's dtype (one dynamic-shape graph serves every contiguous 2-D
    shape), if this layer's backward over x will use it (a grad-enabled forward of a Linear layer with trained
    values, an adapter below the SDDMM threshold) and it is not compiled yet. Called from the layer's forward before
    SparseDelta, so the first compile's transient memory comes before the step's activations pile up, not on top of
    their peak inside backward."""
    buffered = (getattr(_STEP, "buffers", None) is not None and TRANSPOSE_BUFFERS_IN_STEP
                and _TRANSPOSE_INTO.available)  # inside a step, backward will use the buffered kernel
    if (not (_TRANSPOSE_INTO.is_compiled("into") if buffered else _TRANSPOSE.is_compiled("copy"))
            and x.device.type == "cpu" and layer.sddmm_backward
            and torch.is_grad_enabled() and any(v.requires_grad for v in values) and _compiles(x)
            and any(use_sddmm(layer, a, x.device.type, x.dtype) for a in adapters)):
        small = torch.zeros(TRANSPOSE_COMPILE_MIN_ELEMENTS // 64, 64, dtype=x.dtype)
        if buffered:  # (the helper runs it without grad mode, as backward will)
            _TRANSPOSE_INTO("into", small, torch.empty(64, small.shape[0], dtype=x.dtype), eager=_no_buffer)
        else:
            contiguous_t(small)


def sddmm_values(gt: torch.Tensor, xt: torch.Tensor, crow: torch.Tensor, idx: torch.Tensor,
                 shape: tuple[int, int]) -> torch.Tensor:
    """(gᵀ x) at the active flat indices `idx` (ascending) of an (out, in) weight, by SDDMM. `gt` = gᵀ (out, tokens)
    and `xt` = xᵀ (in, tokens), both contiguous (`contiguous_t`); `crow` the CSR row pointers of `idx`."""
    col = (idx % shape[1]).to(crow.dtype)  # transient: ascending indices are already in CSR order
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, col, _zeros(col.numel(), gt.dtype, gt.device), size=tuple(shape))
    # xt.t() is x with column-major strides: sampled_addmm reads mat2's columns as rows without its own copy
    return torch.sparse.sampled_addmm(pattern, gt, xt.t(), beta=0.0).values()


_ZEROS: dict[tuple, torch.Tensor] = {}  # zeros for the SDDMM pattern's values (read: NaN * 0 is NaN), per dtype/device


def _zeros(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """n zeros, sliced from a cached buffer (sampled_addmm is out of place: it never writes its input's values)."""
    key = (dtype, device)
    buf = _ZEROS.get(key)
    if buf is None or buf.numel() < n:
        buf = _ZEROS[key] = torch.zeros(max(n, 1), dtype=dtype, device=device)
    return buf[:n]


def use_sddmm(layer, adapter_name: str, device_type: str, dtype: torch.dtype) -> bool:
    """True where the values' gradient of this Linear layer is cheaper by SDDMM than by dense dW + gather."""
    if dtype not in (torch.float32, torch.float64) or torch.compiler.is_compiling():
        return False  # sampled_addmm has no bf16/fp16 CPU kernel; torch.compile cannot create sparse tensors
    if device_type not in ("cpu", "cuda"):
        return False
    density = layer.num_active(adapter_name) / max(layer.weight_numel, 1)
    return density < SDDMM_MAX_DENSITY.get(device_type, 0.0)


def _in_place_ok(weight: torch.Tensor) -> bool:
    return (
        type(weight) in (torch.Tensor, nn.Parameter)
        and weight.layout == torch.strided
        and weight.grad_fn is None
        and weight.is_contiguous()
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(weight)
    )


def _merged_copy(weight: torch.Tensor, layer, adapters, values) -> torch.Tensor:
    merged = weight.detach().reshape(-1).clone()
    for a, val in zip(adapters, values):
        merged.index_add_(0, layer.active_indices(a), layer.active_of(a, val.detach()).to(merged.dtype))
    return merged.view(weight.shape)


@contextmanager
def effective_weight(weight: torch.Tensor, layer, adapters, values):
    """Yields W' = W + Σ_a scatter(v_a at a's active indices), without autograd.

    In place where safe: each adapter's active entries of the weight's storage are saved (k values), the deltas are
    added with the same `index_add_` a merged copy would use, and on exit the saved values are written back, in
    reverse order, so the weight is bit-identical to what it was. Otherwise an out-of-place copy.
    """
    resident = getattr(layer, "_resident", None)
    if resident is not None:  # deltas_in_weights(): the weight already holds these adapters' deltas
        if resident.adapters != tuple(adapters) or any(v._version != ver for v, ver in zip(values, resident.versions)):
            raise RuntimeError(f"{layer.ft_key}: the active deltas changed inside deltas_in_weights() (an optimizer "
                               "step or a selection inside the context?); its weight holds the old ones")
        yield weight.data
        return
    if not _in_place_ok(weight):
        yield _merged_copy(weight, layer, adapters, values)
        return
    data = weight.data  # shares the storage; its own version counter, so autograd's saved-tensor checks are untouched
    saved = []
    try:
        _write_deltas(data.view(-1), layer, adapters, values, saved)
        yield data
    finally:
        _restore(data.view(-1), saved)


def _write_deltas(flat: torch.Tensor, layer, adapters, values, saved: list) -> None:
    """flat[idx_a] += v_a at each adapter's active entries, in place; the base values go into `saved` first (each
    as soon as it is taken, so a restore after an error writes back exactly what was changed)."""
    for a, val in zip(adapters, values):
        idx = layer.active_indices(a)
        saved.append((idx, flat.index_select(0, idx)))
        flat.index_add_(0, idx, layer.active_of(a, val.detach()).to(flat.dtype))


def _restore(flat: torch.Tensor, saved: list) -> None:
    """Write the saved base values back, in reverse order: the weight is bit-identical to before `_write_deltas`."""
    for idx, base in reversed(saved):
        flat.index_put_((idx,), base)


class _KeptBase(NamedTuple):
    """A layer's base-weight values at one adapter's active entries, kept from one training step to the next
    (`kept_base_values`), and what they are valid for."""

    adapter: str
    indices: torch.Tensor  # the layer's active-index tensor they were read at (a new tensor for each active set)
    indices_version: int  # its version counter then (a load copies new indices into the same buffer)
    base: torch.Tensor  # the weight's values there, read while it held the base weights
    weight_key: tuple  # the weight's storage, version counter, dtype and shape when they were read
    spot: torch.Tensor  # the first and last few active indices,
    spot_base: torch.Tensor  # and the base values there (compared with the weight before each use)


def _weight_key(weight: torch.Tensor) -> tuple:
    return weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape)


# entries compared between the weight and the kept values before they are used (the first and last few): a cheap
# check that catches a weight replaced wholesale behind the version counter (`weight.data.copy_(...)`)
_SPOT = 4


def _kept_still_valid(kept: _KeptBase, flat: torch.Tensor, adapter: str, idx: torch.Tensor, key: tuple) -> bool:
    if (kept.adapter != adapter or kept.indices is not idx or kept.indices_version != idx._version
            or kept.weight_key != key):
        return False
    return torch.equal(flat.index_select(0, kept.spot), kept.spot_base)


def _keep(adapter: str, idx: torch.Tensor, base: torch.Tensor, key: tuple) -> _KeptBase:
    n = idx.numel()
    ends = torch.cat([torch.arange(min(_SPOT, n)), torch.arange(max(n - _SPOT, min(_SPOT, n)), n)]).to(idx.device)
    return _KeptBase(adapter, idx, idx._version, base, key, idx.index_select(0, ends), base.index_select(0, ends))


def _write_kept(flat: torch.Tensor, weight: torch.Tensor, layer, adapter: str, val: torch.Tensor, saved: list) -> None:
    """`_write_deltas` for one adapter, reusing the base values kept from the previous step where they are still
    valid (same active set, same weight): then the step writes flat[idx] = base + v, the same float addition as
    `index_add_` on the base values, with no read of the weight at the active entries (one pass over the weight
    instead of two: 46 -> 24 ms a DINOv2-B step at 3.9 % active on the CPU). Otherwise the values are read anew
    and kept for the next step."""
    idx = layer.active_indices(adapter)
    key = _weight_key(weight)
    kept = layer._base_kept
    if kept is not None and not _kept_still_valid(kept, flat, adapter, idx, key):
        layer._base_kept = kept = None  # freed before the new read: the step holds one set of base values
    if kept is None:
        _write_deltas(flat, layer, [adapter], [val], saved)
        layer._base_kept = _keep(adapter, idx, saved[0][1], key)
        return
    saved.append((idx, kept.base))
    delta = layer.active_of(adapter, val.detach()).to(flat.dtype)
    # base + v (IEEE addition commutes: the same bits as index_add_'s base + v); in place where delta is a new tensor
    new = delta.add_(kept.base) if delta.data_ptr() != val.data_ptr() else kept.base + delta
    flat.index_put_((idx,), new)


@contextmanager
def kept_base_values(model: nn.Module):
    """Inside, `deltas_in_weights` keeps each layer's base values at its active entries from one step to the next
    instead of reading them from the weight at every step; on exit they are dropped. FisherTuneTrainer.train runs
    in it. The weights themselves are restored at the end of every step as without it, bit for bit.

    CPU weights only: there, reading the base values at the active entries is a pass over about half of the weights'
    cache lines (20 ms of a 1.5 s DINOv2-B step at 3.9 % active); on a GPU the same read takes a millisecond or two,
    less than keeping 4 bytes per active element is worth in memory there.

    Kept values are used only while they are still valid: the same adapter (a single active one), the same active
    set (a δ(t) update makes a new one; a load or a new selection drops them), the same weight storage and version
    counter (`load_state_dict`, `.to()`, an in-place change under `no_grad`), the first and last few entries equal,
    and no merge or unmerge since. Memory: 4 bytes per active element (fp32) from one step to the next, also at a
    step's end, where the values' gradients are alive; without it they exist only inside the step."""
    layers = [m for m in model.modules() if "_resident" in m.__dict__]
    outer = {id(m): m._keep_base for m in layers}
    for m in layers:
        m._keep_base = True
    try:
        yield
    finally:
        for m in layers:
            m._keep_base = outer[id(m)]
            if not m._keep_base:
                m._base_kept = None


@contextmanager
def deltas_in_weights(model: nn.Module, enabled: bool = True):
    """Inside: every FisherTune layer's active deltas are written into its base weight once, so forward and
    backward (and any recomputation) read the weight as it is, instead of writing and restoring the k active entries
    in every call. On exit, also on an error, the saved base values are written back: the base weights are
    bit-identical to the pretrained ones again. The arithmetic is the per-call path's (the same `index_add_`), so
    outputs and gradients are bit-identical too.

    For one training step (forward and backward), not across an optimizer step: a value tensor changed inside raises.
    Layers where the in-place write is not safe (see `_in_place_ok`), merged or disabled layers, and layers whose
    parent reads the weight directly (found by the model's forward check) keep the per-call path. Tied weights never
    reach here: the tuner refuses a target whose weight another module shares. Not under torch.compile (the trainer
    does not enter it when compiling).

    The context is also the step's scope for the SDDMM operand transposes' buffers (`step_transpose`): they are made
    at the first backward that needs them and freed on exit, also with `enabled=False`.
    """
    done = []
    with _step_buffers() if not torch.compiler.is_compiling() else nullcontext():
        try:
            if enabled and not torch.compiler.is_compiling():
                for m in model.modules():
                    # FisherTune layers (they carry `_resident`; layer.py imports this module, not the other way
                    # round). Looked up in the instance dict: hasattr on any other module goes through
                    # Module.__getattr__'s AttributeError, microseconds per module and step
                    if "_resident" not in m.__dict__ or m.merged or m.disable_adapters or m._ft_not_applied:
                        continue
                    adapters = m._active_with_elements()
                    weight = m.get_base_layer().weight
                    if not adapters or not _in_place_ok(weight):
                        continue
                    saved = []
                    flat = weight.data.view(-1)
                    done.append((m, flat, saved))
                    values = [m.ft_values[a] for a in adapters]
                    if m._keep_base and KEEP_BASE_VALUES and len(adapters) == 1 and flat.device.type == "cpu":
                        _write_kept(flat, weight, m, adapters[0], values[0], saved)
                    else:
                        _write_deltas(flat, m, adapters, values, saved)
                    m._resident = _Resident(tuple(adapters), [v._version for v in values])
            yield
        finally:
            for m, flat, saved in reversed(done):
                _restore(flat, saved)
                m._resident = None


class _Resident(NamedTuple):
    """A layer's state inside `deltas_in_weights`: which deltas its weight holds."""

    adapters: tuple
    versions: list  # the values' version counters when written


# True: inside `kept_base_values`, steps reuse the base values read by the step before. False: read at every step,
# and the kept ones left as they are (benchmarks interleave the two).
KEEP_BASE_VALUES = True


def _autocast_state(device_type: str):
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError):  # device types without autocast
        return False, None


class SparseDelta(torch.autograd.Function):
    """y = op(x, W + Σ_a scatter(v_a)); saves x only; the effective weight exists only inside forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, adapters, *values):
        with torch.no_grad(), effective_weight(weight, layer, adapters, values) as merged:
            out = layer._op(x, merged, bias)
        ctx.layer, ctx.adapters = layer, adapters
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x, weight, bias, *values)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():  # autograd records this backward: create_graph=True
            raise RuntimeError(
                f"FisherTune layer {ctx.layer.ft_key!r}: higher-order gradients (a backward with create_graph=True) "
                "are not supported through FisherTune layers: their backward reads the weight with the deltas "
                "written in, not as a differentiable function of them, so a second derivative would miss terms "
                "(inside deltas_in_weights, silently). Take first-order gradients, or differentiate the merged "
                "dense model (merge_and_unload) instead.")
        x, weight, bias, *values = ctx.saved_tensors
        layer = ctx.layer
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_v = ctx.needs_input_grad[5:]
        backward = _linear_backward if layer.sddmm_backward else _generic_backward
        gx, gw, gb, sampled = backward(layer, ctx, x, weight, values, bias, grad_out, need_x, need_w, need_b, need_v)
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
                full.index_put_((pos,), g.to(val.dtype))
                gv.append(full)
        return (gx, gw, gb, None, None, *gv)


def _dense_dw(g2: torch.Tensor, x2: torch.Tensor, shape, cdt) -> torch.Tensor:
    """gᵀ x of one Linear layer; on CPU into a reused workspace of this thread (no weight-sized allocation per
    step). The result is valid until this thread's next call for the same shape: gather from it at once."""
    a, b = g2.t().to(cdt), x2.to(cdt)
    if a.device.type != "cpu" or torch.compiler.is_compiling():
        return a @ b
    buffers = getattr(_WORKSPACE, "buffers", None)
    if buffers is None:
        buffers = _WORKSPACE.buffers = {}
    key = (tuple(shape), cdt)
    buf = buffers.get(key)
    if buf is None:
        buf = buffers[key] = torch.empty(tuple(shape), dtype=cdt)
    return torch.mm(a, b, out=buf)


def _linear_backward(layer, ctx, x, weight, values, bias, grad_out, need_x, need_w, need_b, need_v):
    """Returns (grad x, grad W, grad bias, [gradient at each adapter's active entries, ascending index order])."""
    enabled, ac_dtype = ctx.autocast
    cdt = ac_dtype if enabled and ac_dtype is not None else x.dtype
    g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    gx = gw = gb = None
    if need_x:
        with effective_weight(weight, layer, ctx.adapters, values) as merged:
            gx = (g.to(cdt) @ merged.to(cdt)).view(x.shape).to(x.dtype)
    if need_b:
        gb = g.sum(0).to(bias.dtype)
    if need_w:
        gw = (g.t().to(cdt) @ x2.to(cdt)).to(weight.dtype)
    sampled = []
    gt = xt = None  # gᵀ and xᵀ, contiguous, made once for all adapters (SDDMM reads both as rows)
    dw = gw
    for a, need in zip(ctx.adapters, need_v):
        if not need:
            sampled.append(None)
            continue
        idx = layer.active_indices(a)
        if x2.dtype == g.dtype and use_sddmm(layer, a, g.device.type, g.dtype):
            if gt is None:
                gt, xt = step_transpose(g, "g"), step_transpose(x2, "x")
            sampled.append(sddmm_values(gt, xt, layer._crow(a), idx, layer.weight_shape))
        else:  # dense: this layer's dW (transient, or the CPU workspace), then a gather
            if dw is None:
                dw = _dense_dw(g, x2, layer.weight_shape, cdt)
            sampled.append(dw.reshape(-1).index_select(0, idx))
    return gx, gw, gb, sampled


def _generic_backward(layer, ctx, x, weight, values, bias, grad_out, need_x, need_w, need_b, need_v):
    enabled, ac_dtype = ctx.autocast
    dev = x.device.type
    with effective_weight(weight, layer, ctx.adapters, values) as merged, torch.enable_grad(), \
            torch.autocast(dev, dtype=ac_dtype, enabled=enabled) if ac_dtype is not None else nullcontext():
        xr = x.detach().requires_grad_(need_x and x.is_floating_point())
        wr = merged.detach().requires_grad_(True)
        br = bias.detach().requires_grad_(True) if (bias is not None and need_b) else bias
        out = layer._op(xr, wr, br)
        inputs = [t for t in (xr, wr, br) if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = torch.autograd.grad(out, inputs, grad_out)
        del out
    gmap = dict(zip([id(t) for t in inputs], grads))
    gx = gmap.get(id(xr)) if need_x else None
    gw_dense = gmap[id(wr)]
    gb = gmap.get(id(br)) if need_b else None
    sampled = [gw_dense.reshape(-1).index_select(0, layer.active_indices(a)) if need else None
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
