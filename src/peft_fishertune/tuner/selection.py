"""The public selection API: which weight elements a FisherTune adapter trains.

- `target_parameters(model)` names every targeted base weight;
- `select_parameters(model, scores)` ranks their elements by score, keeps the
  top δ_max as the ordered candidate list and activates the top δ_min;
- `set_active_fraction(model, f)` activates the top f of that list (growing
  keeps everything already learned: values, and optimizer moments, since the
  values tensor is never reallocated; only the rank threshold moves).

Names are the weight's name in the original, unwrapped model, e.g.
``"encoder.layer.0.attention.attention.query.weight"`` -- the same key as in
that model's own ``state_dict()``.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .._checks import finite_number
from .._host import host_values_of
from .checks import check_fractions, check_scope
from .layer import FisherTuneLayer, prepare_active_sets
from .storage import index_dtype_for

_FRACTION_TOL = 1e-9


def _layers(model: nn.Module, adapter_name: str | None) -> tuple[str, list[FisherTuneLayer]]:
    layers = [m for m in model.modules() if isinstance(m, FisherTuneLayer)]
    if not layers:
        raise ValueError("the model has no FisherTune layers: wrap it with get_peft_model(model, FisherTuneConfig(...)) first")
    names = []
    for m in layers:
        for a in m.ft_values.keys():
            if a not in names:
                names.append(a)
    if adapter_name is None:
        active = [a for a in layers[0].active_adapters if a in names]
        if len(active) != 1:
            raise ValueError(f"adapter_name is required: the model has FisherTune adapters {names} with active {active}")
        adapter_name = active[0]
    elif adapter_name not in names:
        raise ValueError(f"adapter_name={adapter_name!r} is not a FisherTune adapter of this model; have {names}")
    return adapter_name, [m for m in layers if adapter_name in m.ft_values]


def _config(model: nn.Module, adapter_name: str):
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, Mapping) and adapter_name in configs:
        return configs[adapter_name]
    return None


def target_parameters(model: nn.Module, adapter_name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
    """Yield `(name, weight)` for every base weight targeted by the FisherTune adapter, in module order."""
    adapter_name, layers = _layers(model, adapter_name)
    for layer in layers:
        yield f"{layer.ft_key}.weight", layer.get_base_layer().weight


@dataclass
class SelectionSummary:
    adapter_name: str
    scope: str
    num_targeted: int  # elements in all targeted weights
    num_candidates: int  # kept (δ_max)
    num_active: int  # active now
    per_tensor: dict[str, tuple[int, int]]  # name -> (candidates, active)

    @property
    def active_fraction(self) -> float:
        return self.num_active / max(self.num_targeted, 1)


def _validate_scores(targets: dict[str, nn.Parameter], scores: Mapping[str, torch.Tensor]) -> None:
    if not isinstance(scores, Mapping):
        raise ValueError(f"scores must be a mapping {{name: tensor}}, got {type(scores).__name__}")
    missing = [n for n in targets if n not in scores]
    unknown = [n for n in scores if n not in targets]
    if missing:
        raise ValueError(f"scores: missing for {len(missing)} targeted weight(s), e.g. {missing[:3]}; "
                         "names come from target_parameters(model)")
    if unknown:
        raise ValueError(f"scores: unknown name(s) {unknown[:3]}; expected the names of target_parameters(model), "
                         f"e.g. {list(targets)[:2]}")
    for name, weight in targets.items():
        s = scores[name]
        if not isinstance(s, torch.Tensor):
            raise ValueError(f"scores[{name!r}] must be a tensor, got {type(s).__name__}")
        if tuple(s.shape) != tuple(weight.shape):
            raise ValueError(f"scores[{name!r}] has shape {tuple(s.shape)}; expected the weight's shape {tuple(weight.shape)}")
        if not s.is_floating_point():
            raise ValueError(f"scores[{name!r}] has dtype {s.dtype}; expected a real floating-point tensor "
                             "(float32, float64, float16 or bfloat16)")
        if s.device.type == "meta":
            raise ValueError(f"scores[{name!r}] is on the meta device (no values); pass scores with real values")
        if not torch.isfinite(s).all():
            raise ValueError(f"scores[{name!r}] holds NaN or inf; scores must be finite")


def select_parameters(
    model: nn.Module,
    scores: Mapping[str, torch.Tensor],
    *,
    scope: str | None = None,
    adapter_name: str | None = None,
    delta_min: float | None = None,
    delta_max: float | None = None,
) -> SelectionSummary:
    """Rank every targeted element by `scores`; keep the top δ_max as candidates, activate the top δ_min.

    `scope="global"` ranks all targeted elements together; `"per_tensor"` takes the same fraction of each weight.
    δ_min, δ_max and the scope default to the adapter's config (a scope given here is written back to it, so it is
    saved and used by `set_active_fraction`). Deltas already learned for elements that stay candidates are kept.
    """
    adapter_name, layers = _layers(model, adapter_name)
    config = _config(model, adapter_name)
    scope = check_scope(scope if scope is not None else (config.scope if config is not None else "global"))
    delta_min = delta_min if delta_min is not None else config.delta_min
    delta_max = delta_max if delta_max is not None else config.delta_max
    check_fractions(delta_min, delta_max)
    if config is not None:
        config.scope = scope
    targets = {f"{m.ft_key}.weight": m.get_base_layer().weight for m in layers}
    _validate_scores(targets, scores)
    value_dtypes = [m.ft_values[adapter_name].dtype for m in layers]
    with torch.no_grad():
        if scope == "per_tensor":
            for layer, name, dt in zip(layers, targets, value_dtypes):
                n = layer.weight_numel
                (idx, ranks, scratch), = top_k_ranked([scores[name]], round(delta_max * n), value_dtypes=[dt])
                # local ranks 0..k_max-1; active: rank < round(δ·numel)
                layer.install_candidates(adapter_name, idx, ranks, round(delta_min * n), scratch)
        else:
            total = sum(m.weight_numel for m in layers)
            ranked = top_k_ranked([scores[n] for n in targets], round(delta_max * total), value_dtypes=value_dtypes)
            k_min = round(delta_min * total)
            for layer, (idx, ranks, scratch) in zip(layers, ranked):
                # ranks are global; active: rank < round(δ·total)
                layer.install_candidates(adapter_name, idx, ranks, k_min, scratch)
    return _summary(model, adapter_name, scope, layers)


# ------------------------------------------------------------------ lean global top-k
# Exact global ranking of the top k elements of many score tensors, without concatenating or sorting them all:
#   1. radix select (4 passes of 8 bits over order-preserving int32 keys) finds the k-th key T and how many
#      elements equal to T are taken (ties go to the lowest global index: tensor order, then flat index);
#   2. each tensor's candidates (key < T, plus its share of the ties) are written, in ascending index order, into
#      buffers the adapter keeps (indices, ranks, and the values buffer, which holds the keys meanwhile);
#   3. global ranks are assigned range by range of keys (ranges found by 256-bin histograms of the candidates' keys,
#      each range at most `budget` elements), sorting only one range at a time.
# Transient memory stays within a fixed fraction of the scores' size: chunks of `chunk` elements, ranges of at
# most `budget` elements. Descending score == ascending key; -0.0 counts as 0.0.

_KEY_LO, _KEY_HI = -(2**31), 2**31
LEAN_MEMORY_FRACTION = 0.05  # transient budget, as a fraction of the scores' bytes (the outputs are the adapter's)
_MIN_CHUNK = 4096


def _keys(chunk: torch.Tensor) -> torch.Tensor:
    """int32 keys, ascending == descending score (float32 order; ties equal)."""
    b = chunk.to(torch.float32, copy=True)
    b.add_(0.0)  # -0.0 -> +0.0
    b = b.view(torch.int32)
    b.bitwise_xor_(b.bitwise_right_shift(31).bitwise_and_(0x7FFFFFFF))  # ascending int == ascending float
    return b.bitwise_not_()  # descending


def _chunks(t: torch.Tensor, size: int):
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), size):
        yield start, flat[start:start + size]


_DIGITS = ((21, 11), (10, 11), (0, 10))  # (shift, bits): three passes over 32-bit keys


def _radix_select(tensors, k: int, chunk: int) -> tuple[int, int]:
    """(T, q): the k-th smallest key is T, and q elements equal to T are among the k smallest."""
    prefix, need, prev_shift = None, k, None
    for shift, bits in _DIGITS:
        hist = torch.zeros(1 << bits, dtype=torch.int64)
        for t in tensors:
            for _, c in _chunks(t, chunk):
                d = _keys(c)
                if prefix is not None:
                    d = d[d.bitwise_right_shift(prev_shift) == prefix]
                dig = d.bitwise_right_shift(shift)
                if prefix is None:
                    dig.add_(1 << (bits - 1))  # the signed top digit, shifted to start at 0
                else:
                    dig.bitwise_and_((1 << bits) - 1)
                hist += torch.bincount(dig.long(), minlength=1 << bits).cpu()
                del d, dig
        cum = hist.cumsum(0)
        b = int(torch.searchsorted(cum, torch.tensor(need)))
        need -= int(cum[b - 1]) if b else 0
        prefix = b - (1 << (bits - 1)) if prefix is None else (prefix << bits) + b
        prev_shift = shift
    return prefix, need


def top_k_ranked(scores: list[torch.Tensor], k: int, *, value_dtypes=None, memory_fraction: float = LEAN_MEMORY_FRACTION):
    """Per score tensor: (ascending flat indices of its elements among the global top `k`, their global ranks,
    a float buffer of the same length for the adapter's values). Rank order: descending score, ties by global
    index (tensor order, then flat index). Equal to a stable descending sort of all scores concatenated."""
    numels = [s.numel() for s in scores]
    total = sum(numels)
    k = max(0, min(int(k), total))
    value_dtypes = value_dtypes or [torch.float32] * len(scores)
    score_bytes = sum(s.numel() * s.element_size() for s in scores)
    budget_bytes = max(1, int(memory_fraction * score_bytes))
    chunk = max(_MIN_CHUNK, budget_bytes // 24)  # key copy, shifts, masks, positions per scanned element
    budget = max(_MIN_CHUNK, budget_bytes // 40)  # keys, owners, positions, order, ranks per ranged element
    if k == 0:
        return [(torch.empty(0, dtype=index_dtype_for(n)), torch.empty(0, dtype=index_dtype_for(n)),
                 torch.empty(0, dtype=dt)) for n, dt in zip(numels, value_dtypes)]
    T, ties_left = _radix_select(scores, k, chunk)
    out, key_views = [], []
    for s, n, dt in zip(scores, numels, value_dtypes):
        count, taken = 0, 0
        for _, c in _chunks(s, chunk):  # pass 1: how many candidates this tensor holds
            d = _keys(c)
            count += int((d < T).sum())
            taken += min(ties_left - taken, int((d == T).sum()))
            del d
        device = s.device
        idx = torch.empty(count + taken, dtype=index_dtype_for(n), device=device)
        ranks = torch.empty(count + taken, dtype=index_dtype_for(max(n, k)), device=device)
        if dt.itemsize == 4:  # the values buffer holds the keys until the ranks are known
            scratch = torch.empty(count + taken, dtype=dt, device=device)
            keys = scratch.view(torch.int32)
        else:
            scratch = torch.empty(count + taken, dtype=dt, device=device)
            keys = torch.empty(count + taken, dtype=torch.int32, device=device)
        at, tie_quota = 0, taken
        for start, c in _chunks(s, chunk):  # pass 2: write them in ascending index order
            d = _keys(c)
            m = d < T
            if tie_quota:
                tie = torch.nonzero(d == T).view(-1)[:tie_quota]
                m[tie] = True
                tie_quota -= tie.numel()
                del tie
            pos = torch.nonzero(m).view(-1)
            idx[at:at + pos.numel()] = pos + start
            keys[at:at + pos.numel()] = d[pos]
            at += pos.numel()
            del d, m, pos
        ties_left -= taken
        out.append((idx, ranks, scratch))
        key_views.append(keys)
    if max(kv.numel() for kv in key_views) * 16 <= 1.8 * budget_bytes:
        _assign_ranks_sorted(key_views, out, k, budget)  # fast path: one tensor's sort fits the budget
    else:
        _assign_ranks(key_views, [r for _, r, _ in out], k, budget, chunk)
    return out


def _assign_ranks_sorted(keys: list[torch.Tensor], out: list, k: int, budget: int) -> None:
    """As `_assign_ranks`, but first sorts each tensor's candidates by key in place (one tensor's transient at a
    time), so every key range is a contiguous slice of each tensor: no scans. Restores index order at the end."""
    for kv, (idx, _, _) in zip(keys, out):
        if kv.numel():
            sk, perm = torch.sort(kv, stable=True)  # ties keep ascending index order
            kv.copy_(sk)
            idx.copy_(idx[perm])
            del sk, perm
    ranks = [r for _, r, _ in out]

    def count_below(x: int) -> list[int]:
        if x >= _KEY_HI:
            return [kv.numel() for kv in keys]
        t = torch.tensor([x], dtype=torch.int32)
        return [int(torch.searchsorted(kv, t.to(kv.device))) if kv.numel() else 0 for kv in keys]

    offset, lo, starts = 0, _KEY_LO, [0] * len(keys)
    while offset < k:
        # the largest hi with at most `budget` candidates in [lo, hi), by bisection on the key value
        a, b = lo + 1, _KEY_HI
        if sum(count_below(a)) - offset > budget:
            hi = a  # one key value holds more than the budget: a tie range
        else:
            while a < b:
                mid = (a + b + 1) // 2
                if sum(count_below(mid)) - offset <= budget:
                    a = mid
                else:
                    b = mid - 1
            hi = a
        ends = count_below(hi)
        n = sum(e - s0 for s0, e in zip(starts, ends))
        if hi - lo == 1 or n == 0:  # ties: tensor order, then index order
            at = offset
            for r, s0, e in zip(ranks, starts, ends):
                if e > s0:
                    r[s0:e] = torch.arange(at, at + e - s0, device=r.device).to(r.dtype)
                    at += e - s0
        else:
            d = torch.cat([kv[s0:e] for kv, s0, e in zip(keys, starts, ends)])
            order = torch.argsort(d, stable=True)
            del d
            rr = torch.empty(n, dtype=torch.int64, device=order.device)
            rr[order] = torch.arange(offset, offset + n, device=order.device)
            del order
            at = 0
            for r, s0, e in zip(ranks, starts, ends):
                r[s0:e] = rr[at:at + e - s0].to(r.dtype)
                at += e - s0
            del rr
        offset += n
        lo, starts = hi, ends
        if hi >= _KEY_HI:
            break
    if offset != k:  # pragma: no cover - an internal invariant
        raise RuntimeError(f"lean selection assigned {offset} ranks for {k} candidates")
    for idx, r, _ in out:  # back to ascending index order (what the layer stores)
        if idx.numel():
            si, perm = torch.sort(idx)
            idx.copy_(si)
            r.copy_(r[perm])
            del si, perm


def _assign_ranks(keys: list[torch.Tensor], ranks: list[torch.Tensor], k: int, budget: int, chunk: int) -> None:
    """ranks[i][j] = global position of candidate j of tensor i in ascending (key, tensor, index) order."""
    offset = 0

    def scan(lo: int, hi: int):
        for i, kv in enumerate(keys):
            for start, c in _chunks(kv, chunk):
                if lo > _KEY_LO and hi < _KEY_HI:
                    m = (c >= lo) & (c < hi)
                elif lo > _KEY_LO:
                    m = c >= lo
                elif hi < _KEY_HI:
                    m = c < hi
                else:
                    m = torch.ones_like(c, dtype=torch.bool)
                pos = torch.nonzero(m).view(-1)
                del m
                if pos.numel():
                    yield i, start, pos, c[pos]

    def histogram(lo: int, hi: int, shift: int) -> torch.Tensor:
        hist = torch.zeros(256, dtype=torch.int64)
        for _, _, _, d in scan(lo, hi):
            hist += torch.bincount(((d.long() - lo) >> shift), minlength=256).cpu()
        return hist

    def emit(lo: int, hi: int, count: int) -> None:
        nonlocal offset
        if hi - lo == 1:  # one key value: ties in tensor order, then index order -- no sort needed
            for i, start, pos, _ in scan(lo, hi):
                ranks[i][pos + start] = torch.arange(offset, offset + pos.numel(), device=pos.device).to(ranks[i].dtype)
                offset += pos.numel()
            return
        parts = list(scan(lo, hi))
        d = torch.cat([p[3] for p in parts])
        order = torch.argsort(d, stable=True)  # gathered in (tensor, index) order, so ties stay in that order
        del d
        r = torch.empty(count, dtype=torch.int64, device=order.device)
        r[order] = torch.arange(offset, offset + count, device=order.device)
        del order
        at = 0
        for i, start, pos, _ in parts:
            ranks[i][pos + start] = r[at:at + pos.numel()].to(ranks[i].dtype)
            at += pos.numel()
        offset += count

    def walk(lo: int, hi: int, count: int) -> None:
        if count == 0:
            return
        if count <= budget or hi - lo == 1:
            emit(lo, hi, count)
            return
        shift = (hi - lo).bit_length() - 1 - 8  # 256 bins over [lo, hi), a power-of-two width
        width = 1 << shift
        hist = histogram(lo, hi, shift).tolist()
        group_lo, group_count = lo, 0
        for b, n in enumerate(hist):
            b_lo = lo + b * width
            if n > budget:
                walk(group_lo, b_lo, group_count)
                walk(b_lo, b_lo + width, n)
                group_lo, group_count = b_lo + width, 0
            elif group_count + n > budget:
                walk(group_lo, b_lo, group_count)
                group_lo, group_count = b_lo, n
            else:
                group_count += n
        walk(group_lo, hi, group_count)

    walk(_KEY_LO, _KEY_HI, k)
    if offset != k:  # pragma: no cover - an internal invariant
        raise RuntimeError(f"lean selection assigned {offset} ranks for {k} candidates")


def _summary(model, adapter_name, scope, layers) -> SelectionSummary:
    per = {f"{m.ft_key}.weight": (m.num_candidates(adapter_name), m.num_active(adapter_name)) for m in layers}
    return SelectionSummary(
        adapter_name=adapter_name,
        scope=scope,
        num_targeted=sum(m.weight_numel for m in layers),
        num_candidates=sum(c for c, _ in per.values()),
        num_active=sum(a for _, a in per.values()),
        per_tensor=per,
    )


def set_active_fraction(model: nn.Module, fraction: float, *, adapter_name: str | None = None) -> SelectionSummary:
    """Activate the top `fraction` of the candidate list (δ_min <= fraction <= δ_max of the adapter's config)."""
    adapter_name, layers = _layers(model, adapter_name)
    config = _config(model, adapter_name)
    if config is None:
        raise ValueError("set_active_fraction needs the model's peft_config (use the model returned by get_peft_model)")
    try:
        finite_number("fraction", fraction, low=config.delta_min - _FRACTION_TOL, high=config.delta_max + _FRACTION_TOL)
    except ValueError:
        raise ValueError(
            f"fraction={fraction!r} is outside [delta_min, delta_max] = [{config.delta_min}, {config.delta_max}] "
            f"of adapter {adapter_name!r}"
        ) from None
    if all(m.num_candidates(adapter_name) == 0 for m in layers):
        raise ValueError(f"adapter {adapter_name!r} has no candidates yet: call select_parameters(model, scores) first")
    # a fixed selection has every rank -1, a ranked one every rank >= 0: the first rank tells (O(1) per layer, not a
    # pass over every candidate at each growth step)
    if _any_fixed(layers, adapter_name):
        raise ValueError(
            f"adapter {adapter_name!r} was loaded from a saved file written fully grown (every candidate active), "
            "which holds only its active elements, not the ranked candidate list; its selection is fixed."
        )
    total = sum(m.weight_numel for m in layers)
    for layer in layers:
        threshold = round(fraction * (layer.weight_numel if config.scope == "per_tensor" else total))
        layer.set_threshold(adapter_name, threshold, prepare=False)
    prepare_active_sets(layers, adapter_name)  # the layers' counts read at once on an accelerator
    return _summary(model, adapter_name, config.scope, layers)


def _any_fixed(layers, adapter_name: str) -> bool:
    """Whether a layer's selection is fixed (every rank -1; a ranked one has every rank >= 0): the first rank of
    each layer tells, read for all the layers of a device at once."""
    firsts = [m.ft_rank[adapter_name][:1] for m in layers if m.num_candidates(adapter_name)]
    return any(v < 0 for (v,) in host_values_of(firsts))


def layer_seed(seed: int, key: str) -> int:
    """A per-layer seed, so same-shaped layers get different random masks (unlike SHiRA)."""
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1)


def random_scores(model: nn.Module, seed: int = 0, *, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """Uniform random scores per targeted weight, seeded per layer (`layer_seed(seed, name)`): the random-selection
    baseline and `init_selection="random"`. The same seed gives the same scores on every rank and run."""
    out = {}
    for name, weight in target_parameters(model, adapter_name=adapter_name):
        gen = torch.Generator().manual_seed(layer_seed(seed, name))
        out[name] = torch.rand(weight.shape, generator=gen)
    return out


def magnitude_scores(model: nn.Module, *, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """|W| per targeted weight (`init_selection="magnitude"`)."""
    return {name: weight.detach().abs().float() for name, weight in target_parameters(model, adapter_name=adapter_name)}


def selection_summary(model: nn.Module, adapter_name: str | None = None) -> SelectionSummary:
    """Counts of candidates and active elements per targeted weight."""
    adapter_name, layers = _layers(model, adapter_name)
    config = _config(model, adapter_name)
    return _summary(model, adapter_name, config.scope if config is not None else "global", layers)
