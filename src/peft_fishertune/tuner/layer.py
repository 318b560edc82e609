"""FisherTune layers: element-wise sparse deltas on a layer's own weight.

Per adapter, each wrapped layer holds

- ``ft_indices``    int32 (int64 past 2**31 elements) flat indices into ``weight``: the adapter's candidate
                    elements (its share of δ_max), in ascending order;
- ``ft_rank``       each candidate's rank (global, or within the tensor for ``scope="per_tensor"``);
                    -1 = a fixed selection loaded from a file, which cannot grow;
- ``ft_threshold``  the active set: candidates with ``rank < threshold``;
- ``ft_values``     the trainable deltas, one per candidate.

The effective weight is ``W' = W + scatter(values at the active indices)``. It exists only inside a custom
autograd function (sparse_delta.py): the active entries are written into the base weight in place for the op and
restored bit for bit before it returns, in forward and again in backward; no weight-sized copy is made or saved.
For ``nn.Linear`` the values' gradient is ``(gᵀ x)`` at the active entries, by SDDMM below a measured active
density and by the layer's dense ``dW`` + gather above it; since the candidates are stored in ascending index
order, that is already the CSR order, so no permutation is kept. Other layer types re-run the op in backward and
gather the dense weight gradient. Inactive candidates get an exact zero gradient, so
AdamW (moments and decoupled weight decay) leaves them at exactly zero until they are activated; activating
more only raises the threshold (the values tensor is never reallocated, so optimizer moments survive).

Memory per candidate: 4 (index) + 4 (rank) + 4 (value) + 4 (gradient) + 8 (AdamW moments) bytes, plus, while only
part of the candidates is active, 4 bytes per active element for its position and 4 for its flat index (cached per
threshold; under `deltas_in_weights`, the trainer's default, a step's write holds those indices anyway, so the step's
peak is unchanged; the per-call path held one layer's at a time).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .._host import host_values_of
from .sparse_delta import SparseDelta, ZeroGradLink, use_sddmm, warm_transpose
from .storage import index_dtype_for

logger = logging.getLogger("peft_fishertune.tuner")


@dataclass
class _ActiveSet:
    """A layer's active candidates at one threshold (cached until the threshold, the candidates or the device change)."""

    threshold: int
    count: int
    positions: Optional[torch.Tensor]  # positions in the candidate list, ascending; None when every candidate is active
    device: torch.device
    crow: Optional[torch.Tensor] = None  # CSR row pointers (Linear, SDDMM backward), made on first use
    indices: Optional[torch.Tensor] = None  # flat weight indices of the active elements, made on first use


class FisherTuneLayer(BaseTunerLayer):
    sddmm_backward = False  # True: the layer is a matmul whose weight gradient SDDMM can sample
    adapter_layer_names = ("ft_values",)
    other_param_names = ("ft_indices", "ft_rank", "ft_threshold")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.ft_values = nn.ParameterDict({})
        self.ft_indices = BufferDict({}, persistent=True)
        self.ft_rank = BufferDict({}, persistent=True)
        self.ft_threshold = BufferDict({}, persistent=True)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # name of the module in the original model; set by FisherTuneModel (used for public names)
        self.ft_key: str = kwargs.pop("current_key", "")
        self._active_cache: dict[str, _ActiveSet] = {}  # adapter -> its active set at the current threshold
        self._thresholds: dict[str, int] = {}  # ft_threshold as Python ints (no Tensor.item() in forward)
        # set by every forward of this layer; FisherTuneModel checks it after the model's forward to find layers
        # whose weight the parent reads directly (the adapter would have no effect)
        self._ft_called = False
        self._ft_not_applied = False
        self._resident = None  # set inside sparse_delta.deltas_in_weights(): (adapters, value versions)
        self._keep_base = False  # inside sparse_delta.kept_base_values(): keep _base_kept between steps
        self._base_kept = None  # sparse_delta._KeptBase: base values at the active entries, from the last step
        # adapter -> True where every inactive candidate's value is known to be exactly zero (`_check_inactive_zero`)
        self._inactive_zero: dict[str, bool] = {}
        self.kwargs = kwargs

    # ------------------------------------------------------ PEFT attributes
    @property
    def in_features(self) -> int:
        return _in_out_features(self.get_base_layer())[0]

    @property
    def out_features(self) -> int:
        return _in_out_features(self.get_base_layer())[1]

    # ------------------------------------------------------------------ state
    @property
    def weight_shape(self) -> torch.Size:
        return self.get_base_layer().weight.shape

    @property
    def weight_numel(self) -> int:
        return math.prod(self.weight_shape)

    def update_layer(self, adapter_name: str, config, inference_mode: bool = False, **kwargs) -> None:
        """Create an empty candidate list for `adapter_name` (selection comes later or from a file)."""
        weight = self.get_base_layer().weight
        empty = torch.empty(0, dtype=torch.int64)
        self._set_state(adapter_name, empty, empty, 0,
                        torch.empty(0, dtype=weight.dtype if weight.is_floating_point() else torch.float32),
                        device=weight.device)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _set_state(self, adapter_name, indices, ranks, threshold, values, *, device=None) -> None:
        """indices must be ascending and unique; ranks/values aligned with them."""
        n = indices.numel()
        if ranks.numel() != n or values.numel() != n:
            raise ValueError(f"{self.ft_key}: indices ({n}), ranks ({ranks.numel()}) and values ({values.numel()}) differ in size")
        device = device if device is not None else self.get_base_layer().weight.device
        numel = self.weight_numel
        self._base_kept = None  # base values kept at the old active entries (sparse_delta.kept_base_values)
        requires_grad = adapter_name in self.active_adapters and not getattr(self, "_inference_mode", False)
        old = self.ft_values[adapter_name] if adapter_name in self.ft_values else None
        if old is not None:
            requires_grad = old.requires_grad
        self.ft_indices[adapter_name] = indices.to(device=device, dtype=index_dtype_for(numel))
        max_rank = int(ranks.max()) + 1 if n else 0
        self.ft_rank[adapter_name] = ranks.to(device=device, dtype=index_dtype_for(max(numel, max_rank)))
        self.ft_threshold[adapter_name] = torch.tensor(int(threshold), dtype=torch.int64, device=device)
        self.ft_values[adapter_name] = nn.Parameter(values.to(device=device).contiguous(), requires_grad=requires_grad)
        self._thresholds[adapter_name] = int(threshold)
        self._active_cache.pop(adapter_name, None)
        self._prepare_active(adapter_name)
        self._check_inactive_zero(adapter_name)

    def _prepare_active(self, adapter_name: str) -> None:
        """Compute the active positions, their flat indices (and CSR rows) now, eagerly, so a compiled forward finds
        them cached instead of tracing nonzero (data-dependent shapes: graph breaks)."""
        if self.ft_rank[adapter_name].device.type == "meta":
            return
        self.active_indices(adapter_name)
        weight = self.get_base_layer().weight
        # the CSR rows only where backward will take SDDMM (below SDDMM_MAX_DENSITY); otherwise _crow computes them
        # on first use (eager only: under torch.compile the dense path is taken)
        if self.sddmm_backward and self.num_active(adapter_name) and use_sddmm(
                self, adapter_name, weight.device.type, weight.dtype):
            self._crow(adapter_name)

    def _threshold(self, adapter_name: str) -> int:
        thr = self._thresholds.get(adapter_name)
        if thr is None:  # set by a load that bypassed _set_state
            thr = self._thresholds[adapter_name] = int(self.ft_threshold[adapter_name])
        return thr

    def num_candidates(self, adapter_name: str) -> int:
        return self.ft_indices[adapter_name].numel() if adapter_name in self.ft_indices else 0

    def _active(self, adapter_name: str) -> tuple[int, Optional[torch.Tensor]]:
        """(number of active candidates, their positions in the candidate list or None when all are active)."""
        cached = self._active_set(adapter_name)
        return cached.count, cached.positions

    def _active_set(self, adapter_name: str) -> "_ActiveSet":
        thr = self._threshold(adapter_name)
        cached = self._active_cache.get(adapter_name)
        rank = self.ft_rank[adapter_name]
        # keyed by the device too: `model.to(device)` (or accelerate's dispatch) moves the buffers, not this cache
        # (the check of `_active_set_stale`, inline: this runs several times per layer and step)
        if cached is not None and cached.threshold == thr and cached.device == rank.device:
            return cached
        k, pos = _below(rank, thr)
        cached = self._active_cache[adapter_name] = _ActiveSet(thr, k, pos, rank.device)
        return cached

    def num_active(self, adapter_name: str) -> int:
        return self._active(adapter_name)[0] if adapter_name in self.ft_threshold else 0

    def set_candidates(self, adapter_name: str, indices: torch.Tensor, ranks: torch.Tensor, threshold: int) -> int:
        """Replace the candidate list (any order; stored sorted by index). Candidates with rank < threshold are
        active. Deltas already learned for elements that stay candidates are kept.

        Returns the number of previously non-zero deltas that were dropped.
        """
        if adapter_name not in self.ft_values:
            raise ValueError(f"{self.ft_key}: no FisherTune adapter named {adapter_name!r}; have {list(self.ft_values)}")
        order = torch.argsort(indices.long())
        indices, ranks = indices.long()[order], ranks[order]
        values = torch.zeros(indices.numel(), dtype=self.ft_values[adapter_name].dtype)
        return self.install_candidates(adapter_name, indices, ranks, threshold, values)

    def install_candidates(self, adapter_name: str, indices: torch.Tensor, ranks: torch.Tensor, threshold: int,
                           values: torch.Tensor) -> int:
        """Take over candidate buffers: `indices` ascending and unique, `ranks` aligned, `values` a buffer of the same
        length whose contents are overwritten (zeros, or the deltas already learned for elements that stay
        candidates). No weight-sized tensor is made. Returns the number of non-zero deltas dropped."""
        if adapter_name not in self.ft_values:
            raise ValueError(f"{self.ft_key}: no FisherTune adapter named {adapter_name!r}; have {list(self.ft_values)}")
        old_vals = self.ft_values[adapter_name].detach()
        old_idx = self.ft_indices[adapter_name]
        device = old_vals.device if old_vals.device.type != "meta" else self.get_base_layer().weight.device
        indices = indices.to(device)
        values = values.to(device=device, dtype=old_vals.dtype if old_vals.device.type != "meta" else values.dtype)
        values.zero_()
        dropped = 0
        if old_idx.numel():
            old_idx = old_idx.to(device)
            pos = torch.searchsorted(old_idx, indices.to(old_idx.dtype)).clamp_(max=old_idx.numel() - 1)
            kept = old_idx[pos] == indices.to(old_idx.dtype)
            values[kept] = old_vals[pos[kept]]
            dropped = int(torch.count_nonzero(old_vals)) - int(torch.count_nonzero(values))
            del pos, kept
        self._set_state(adapter_name, indices, ranks, threshold, values, device=device)
        return dropped

    def set_threshold(self, adapter_name: str, threshold: int, *, prepare: bool = True) -> None:
        """Activate the candidates whose rank is below `threshold`. `prepare=False` leaves the active set to be made
        later (`prepare_active_sets` over many layers, or on first use)."""
        old = self._threshold(adapter_name)
        if old != int(threshold):
            self.ft_threshold[adapter_name].fill_(int(threshold))
            self._thresholds[adapter_name] = int(threshold)
            if int(threshold) < old:  # elements leave the active set, with whatever value they learned
                self._check_inactive_zero(adapter_name)
            if prepare:
                self._prepare_active(adapter_name)

    def _check_inactive_zero(self, adapter_name: str) -> None:
        """Note whether every inactive candidate of `adapter_name` has a value of exactly zero (one pass over the
        values, when candidates are installed or loaded or the active set shrinks). Growth keeps it so: a value starts
        at zero, an inactive one gets an exact zero gradient, and an optimizer moves a zero with zero gradient and
        zero state nowhere (AdamW, SGD, Adam, Lion, ...). `pulled_values` reads it."""
        values = self.ft_values[adapter_name] if adapter_name in self.ft_values else None
        if values is None or values.device.type == "meta" or self.ft_rank[adapter_name].device.type == "meta":
            self._inactive_zero[adapter_name] = False
            return
        _, pos = self._active(adapter_name)
        v = values.detach()
        nonzero = int(torch.count_nonzero(v)) if pos is not None else 0
        self._inactive_zero[adapter_name] = pos is None or nonzero == 0 or (
            nonzero == int(torch.count_nonzero(v.index_select(0, pos))))

    def pulled_values(self, adapter_name: str) -> torch.Tensor:
        """The values whose squares Eq. 7's prior pull sums: the active ones. Where every inactive value is known to
        be zero (`_check_inactive_zero`), the whole values tensor, which has the same squares to sum and the same
        gradient element by element, without gathering the active ones forward and scattering their gradient back
        into a zero tensor (30 ms of operator time in a DINOv2-B stage-3 step at 5 % active of 15 % candidates)."""
        if self._inactive_zero.get(adapter_name, False):
            return self.ft_values[adapter_name]
        return self.active_values(adapter_name)

    def _active_set_stale(self, adapter_name: str) -> bool:
        """Whether the cached active set is not this threshold's (or the buffers moved to another device)."""
        cached = self._active_cache.get(adapter_name)
        rank = self.ft_rank[adapter_name]
        return cached is None or cached.threshold != self._threshold(adapter_name) or cached.device != rank.device

    def active_indices(self, adapter_name: str) -> torch.Tensor:
        """Flat indices of the active elements, ascending (gathered once per threshold: a training step's write,
        restore and backward all read them)."""
        cached = self._active_set(adapter_name)
        if cached.positions is None:
            return self.ft_indices[adapter_name]
        if cached.indices is None:
            cached.indices = self.ft_indices[adapter_name].index_select(0, cached.positions)
        return cached.indices

    def active_values(self, adapter_name: str) -> torch.Tensor:
        return self.active_of(adapter_name, self.ft_values[adapter_name])

    def active_of(self, adapter_name: str, per_candidate: torch.Tensor) -> torch.Tensor:
        """The entries of a per-candidate tensor (indices, values, gradients) at the active candidates."""
        _, pos = self._active(adapter_name)
        return per_candidate if pos is None else per_candidate.index_select(0, pos)

    def resize_adapter(self, adapter_name: str, n: int, *, device=None, value_dtype=None) -> None:
        """Give `adapter_name` buffers of `n` candidates (contents overwritten by a following load)."""
        if adapter_name not in self.ft_values:
            raise ValueError(f"{self.ft_key}: no FisherTune adapter named {adapter_name!r}")
        cur = self.ft_values[adapter_name]
        device = device if device is not None else self.get_base_layer().weight.device
        if device == torch.device("meta"):
            device = cur.device if cur.device != torch.device("meta") else torch.device("cpu")
        dtype = value_dtype or cur.dtype
        zeros = torch.zeros(n, dtype=torch.int64)
        self._set_state(adapter_name, zeros, zeros, 0, torch.zeros(n, dtype=dtype), device=device)

    def _resize_for_state_dict(self, state_dict, prefix: str) -> None:
        """A checkpoint's candidate lists have their own sizes: size our tensors from it before loading."""
        for adapter_name in list(self.ft_values.keys()):
            key = f"{prefix}ft_values.{adapter_name}"
            if key in state_dict and state_dict[key].shape != self.ft_values[adapter_name].shape:
                self.resize_adapter(adapter_name, state_dict[key].numel(), value_dtype=state_dict[key].dtype)
            self._active_cache.pop(adapter_name, None)
            self._thresholds.pop(adapter_name, None)  # re-read from the loaded buffer

    # ------------------------------------------------------------- merging
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight = self.get_base_layer().weight
        delta = torch.zeros(self.weight_numel, dtype=self.ft_values[adapter_name].dtype, device=weight.device)
        delta.index_add_(0, self.active_indices(adapter_name), self.active_values(adapter_name).detach())
        return delta.view(self.weight_shape)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        self._base_kept = None  # the weight changes (through .data: its version counter does not move)
        if self._ft_not_applied and any(n in self.ft_values and self.num_active(n) for n in adapter_names):
            raise ValueError(
                f"FisherTune layer {self.ft_key!r} was not called in the model's forward (its parent reads the weight "
                "directly), so its delta never acted on the output; merging it would change the model. Exclude it "
                "with exclude_modules."
            )
        weight = self.get_base_layer().weight
        for name in adapter_names:
            if name not in self.ft_values:
                continue
            delta = self.get_delta_weight(name).to(weight.dtype)
            if safe_merge:
                merged = weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs or infs detected in the merged weights of {self.ft_key!r}; adapter {name!r} is broken")
                weight.data = merged
            else:
                weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        weight = self.get_base_layer().weight
        self._base_kept = None  # W + d - d need not be W bit for bit: read the base values anew
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.ft_values:
                weight.data -= self.get_delta_weight(name).to(weight.dtype)

    # ------------------------------------------------------------- forward
    def _active_with_elements(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.ft_values and self.num_active(a) > 0]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self._ft_called:  # written once per check, not per call (Module.__setattr__ costs microseconds)
            self._ft_called = True
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        adapters = self._active_with_elements()
        if not adapters:
            out = self.base_layer(x, *args, **kwargs)
            # no active element: the output does not depend on the deltas, but they still get (zero) gradients, so a
            # model with nothing active yet trains without torch's "does not require grad" error
            train = [self.ft_values[a] for a in self.active_adapters if a in self.ft_values and self.ft_values[a].requires_grad]
            if train and torch.is_grad_enabled():
                out = ZeroGradLink.apply(out, *train)
            return out
        if args or kwargs:
            raise TypeError(f"{type(self).__name__} ({self.ft_key}) takes one input tensor; got extra arguments")
        base = self.get_base_layer()
        values = [self.ft_values[a] for a in adapters]
        warm_transpose(self, x, adapters, values)
        return SparseDelta.apply(x, base.weight, getattr(base, "bias", None), self, adapters, *values)

    # subclasses: the layer's op with an explicit weight
    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _crow(self, adapter_name: str) -> torch.Tensor:
        """CSR row pointers of the active entries (Linear; cached per threshold, out_features + 1 integers)."""
        cached = self._active_set(adapter_name)
        if cached.crow is None:
            # crow[r] = active entries before row r: out_features + 1 binary searches in the active indices
            out_f, in_f = self.weight_shape
            indices = self.active_indices(adapter_name)  # ascending, cached per threshold
            starts = torch.arange(out_f + 1, dtype=torch.int64, device=indices.device).mul_(in_f).to(indices.dtype)
            cached.crow = torch.searchsorted(indices, starts).to(index_dtype_for(max(self.weight_numel, 1)))
        return cached.crow

    def __repr__(self) -> str:
        return "fishertune." + super().__repr__()


# ----------------------------------------------------------------- layer types
class _FisherTuneModule(nn.Module, FisherTuneLayer):
    """nn.Module first (PEFT's convention), with FisherTuneLayer's forward."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        super().__init__()
        FisherTuneLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)
        self.register_load_state_dict_post_hook(_FisherTuneModule._refresh_after_load)

    # nn.Module comes first in the MRO (PEFT's convention), so FisherTuneLayer's versions are named here
    forward = FisherTuneLayer.forward
    __repr__ = FisherTuneLayer.__repr__

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._resize_for_state_dict(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _refresh_after_load(self, *_) -> None:
        """After a load_state_dict (a post hook: the ft_* BufferDicts are child modules, loaded after this module's
        own _load_from_state_dict), read the thresholds into Python ints and prepare the active positions now,
        eagerly: a compiled forward must find them cached (int(tensor) and nonzero in forward are graph breaks)."""
        self._base_kept = None
        for adapter_name in list(self.ft_threshold.keys()):
            thr = self.ft_threshold[adapter_name]
            if thr.device.type == "meta" or adapter_name not in self.ft_rank:
                continue
            self._thresholds[adapter_name] = int(thr)
            self._active_cache.pop(adapter_name, None)
            self._prepare_active(adapter_name)
            self._check_inactive_zero(adapter_name)


class Linear(_FisherTuneModule):
    sddmm_backward = True  # values' gradient by SDDMM (see sparse_delta.py)

    def _op(self, x, weight, bias):
        return F.linear(x, weight, bias)


class Conv2d(_FisherTuneModule):
    def _op(self, x, weight, bias):
        return self.get_base_layer()._conv_forward(x, weight, bias)


class LayerNorm(_FisherTuneModule):
    def __init__(self, base_layer: nn.LayerNorm, adapter_name: str, config, **kwargs) -> None:
        if not base_layer.elementwise_affine or base_layer.weight is None:
            raise ValueError("FisherTune can only wrap a LayerNorm with elementwise_affine=True (it has no weight to tune)")
        super().__init__(base_layer, adapter_name, config, **kwargs)

    def _op(self, x, weight, bias):
        base = self.get_base_layer()
        return F.layer_norm(x, base.normalized_shape, weight, bias, base.eps)


class Embedding(_FisherTuneModule):
    def _op(self, x, weight, bias):
        base = self.get_base_layer()
        return F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)


def _below(rank: torch.Tensor, threshold: int) -> tuple[int, Optional[torch.Tensor]]:
    """(number of candidates with rank < threshold, their positions ascending, or None when that is all of them).

    Run at every δ(t) update of stage 3 (every step by default) for every layer. On the CPU through numpy: its
    `flatnonzero` of the comparison is about 3x faster than `torch.nonzero` (`benchmarks/selection_update.py`); the
    positions are the same."""
    if rank.device.type != "cpu" or rank.layout != torch.strided or torch.compiler.is_compiling():
        return _below_torch(rank, threshold)
    n = rank.numel()
    pos = np.flatnonzero(rank.detach().numpy() < threshold)
    if pos.size == n:  # all active: no position list the size of the candidates
        return n, None
    return int(pos.size), torch.from_numpy(pos.astype(np.int32 if index_dtype_for(max(n, 1)) == torch.int32 else np.int64))


def prepare_active_sets(layers, adapter_name: str) -> None:
    """Make the active sets of `layers` at their thresholds (after `set_threshold(..., prepare=False)`), and their
    flat indices and CSR rows as `_prepare_active` does.

    On the CPU each layer scans its ranks with numpy (`_below`). On an accelerator `_below_torch` reads the device
    twice per layer (the count, then `torch.nonzero`): 288 reads a δ(t) update at DINOv2-L's 144 layers, each
    draining the queue. Here the counts of every stale layer on a device are read at once (`count_below`), so an
    update reads each device once."""
    stale = [m for m in layers if adapter_name in m.ft_rank and m.ft_rank[adapter_name].device.type != "meta"
             and m._active_set_stale(adapter_name)]
    off_cpu = [m for m in stale if m.ft_rank[adapter_name].device.type != "cpu" or not NUMPY_SCAN_ON_CPU]
    if off_cpu:
        sets = count_below([m.ft_rank[adapter_name] for m in off_cpu], [m._threshold(adapter_name) for m in off_cpu])
        for m, (k, pos) in zip(off_cpu, sets):
            rank = m.ft_rank[adapter_name]
            m._active_cache[adapter_name] = _ActiveSet(m._threshold(adapter_name), k, pos, rank.device)
    for m in stale:
        m._prepare_active(adapter_name)


NUMPY_SCAN_ON_CPU = True  # False: CPU layers count as the device path does (tests, benchmarks)
_STATIC_NONZERO = {"ok": True}  # False after nonzero_static failed on some device (logged once)


def count_below(ranks: list[torch.Tensor], thresholds: list[int]) -> list[tuple[int, Optional[torch.Tensor]]]:
    """`_below_torch` for many rank tensors with one host read per device: every count is summed on the device and
    read at once, then the positions come from `torch.nonzero_static` at the known count (no read)."""
    counts = host_values_of([(r < thr).sum() for r, thr in zip(ranks, thresholds)])
    out = []
    for (k,), r, thr in zip(counts, ranks, thresholds):
        n = r.numel()
        if k == n:
            out.append((k, None))
            continue
        mask = r < thr
        pos = None
        if _STATIC_NONZERO["ok"]:
            try:
                pos = torch.nonzero_static(mask, size=k).view(-1)
            except (NotImplementedError, RuntimeError) as exc:  # a backend without it: correct, but one read more
                _STATIC_NONZERO["ok"] = False
                logger.warning("torch.nonzero_static failed on %s (%s: %s); the δ(t) update reads the device once "
                               "per layer instead (torch.nonzero)", r.device, type(exc).__name__, exc)
        if pos is None:
            pos = torch.nonzero(mask).view(-1)
        out.append((k, pos.to(index_dtype_for(max(n, 1)))))
    return out


def _below_torch(rank: torch.Tensor, threshold: int) -> tuple[int, Optional[torch.Tensor]]:
    """`_below` in torch operations (any device)."""
    mask = rank < threshold
    k = int(mask.sum())  # counted first: when all are active, no int64 position list the size of the candidates
    if k == mask.numel():
        return k, None
    return k, torch.nonzero(mask).view(-1).to(index_dtype_for(max(mask.numel(), 1)))


def _in_out_features(base: nn.Module) -> tuple[int, int]:
    """PEFT's in_features / out_features of a wrapped layer (as peft.tuners.tuners_utils._get_in_out_features)."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, nn.Conv2d):
        return base.in_channels, base.out_channels
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    if isinstance(base, nn.LayerNorm):
        n = math.prod(base.normalized_shape)
        return n, n
    raise TypeError(f"FisherTune does not wrap {type(base).__name__}")


LAYER_TYPES: dict[type, type] = {
    nn.Linear: Linear,
    nn.Conv2d: Conv2d,
    nn.LayerNorm: LayerNorm,
    nn.Embedding: Embedding,
}
