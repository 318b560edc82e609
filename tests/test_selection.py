"""The lean global selection: exact ranking (ties by global index) and a memory bound that does not depend on the
allocator (every tensor the selection allocates is counted through a dispatch mode, with its lifetime)."""

from __future__ import annotations

import weakref

import pytest
import torch
from peft import get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import peft_fishertune as pf
from peft_fishertune.tuner.layer import FisherTuneLayer
from peft_fishertune.tuner.selection import magnitude_scores, random_scores, top_k_ranked


def _tied_scores(shapes, seed=0, levels=40):
    """Scores with many ties (a few dozen distinct values), negatives and -0.0."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        s = (torch.randint(-levels // 4, levels, shape, generator=g).float() / 7.0)
        s[s == 0] = -0.0 if len(out) % 2 else 0.0
        out.append(s)
    return out


def _reference(scores, k):
    """A stable descending sort of everything concatenated: ties by global index (tensor order, then flat index)."""
    flat = torch.cat([s.reshape(-1).float() + 0.0 for s in scores])
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    ranks = torch.empty(flat.numel(), dtype=torch.int64).fill_(-1)
    ranks[order] = torch.arange(k)
    out, start = [], 0
    for s in scores:
        r = ranks[start:start + s.numel()]
        idx = torch.nonzero(r >= 0).view(-1)
        out.append((idx, r[idx]))
        start += s.numel()
    return out


@pytest.mark.parametrize("k_fraction", [0.0, 0.01, 0.15, 0.5, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_top_k_equals_a_stable_sort_of_everything(k_fraction, dtype):
    shapes = [(30, 40), (7,), (64, 9), (3, 5, 5), (128, 16)]
    scores = [s.to(dtype) for s in _tied_scores(shapes, seed=int(k_fraction * 100))]
    total = sum(s.numel() for s in scores)
    k = round(k_fraction * total)
    # a tiny budget forces many ranges, histogram refinement and single-value (tie) ranges
    got = top_k_ranked(scores, k, memory_fraction=1e-6)
    for (idx, ranks, scratch), (ref_idx, ref_ranks) in zip(got, _reference(scores, k)):
        assert torch.equal(idx.long(), ref_idx) and torch.equal(ranks.long(), ref_ranks)
        assert scratch.numel() == idx.numel()


def test_top_k_on_distinct_scores_equals_topk():
    g = torch.Generator().manual_seed(3)
    scores = [torch.randn(50, 50, generator=g) for _ in range(4)]
    k = 1234
    got = top_k_ranked(scores, k, memory_fraction=1e-6)
    gidx = torch.topk(torch.cat([s.reshape(-1) for s in scores]), k, sorted=True).indices
    start = 0
    for s, (idx, ranks, _) in zip(scores, got):
        mine = {int(i) + start: int(r) for i, r in zip(idx, ranks)}
        start += s.numel()
        for r, gi in enumerate(gidx.tolist()):
            if gi in mine:
                assert mine.pop(gi) == r
        assert not mine


class _Many(nn.Module):
    def __init__(self, n=40, shape=(64, 200)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(shape[1], shape[0], bias=False) for _ in range(n))


def test_select_parameters_matches_the_reference_global_and_per_tensor():
    torch.manual_seed(0)
    model = get_peft_model(_Many(6, (16, 30)), pf.FisherTuneConfig(target_modules=["layers.0", "layers.1", "layers.2",
                                                                                   "layers.3", "layers.4", "layers.5"],
                                                                   delta_min=0.05, delta_max=0.3))
    names = [n for n, _ in pf.target_parameters(model)]
    scores = dict(zip(names, _tied_scores([(16, 30)] * 6, seed=5, levels=12)))
    layers = [m for m in model.modules() if isinstance(m, FisherTuneLayer)]
    pf.select_parameters(model, scores, scope="global")
    k = round(0.3 * 6 * 480)
    for layer, (ref_idx, ref_ranks) in zip(layers, _reference(list(scores.values()), k)):
        assert torch.equal(layer.ft_indices["default"].long(), ref_idx)
        assert torch.equal(layer.ft_rank["default"].long(), ref_ranks)
    pf.select_parameters(model, scores, scope="per_tensor")
    for layer, name in zip(layers, names):
        (ref_idx, ref_ranks), = _reference([scores[name]], round(0.3 * 480))
        assert torch.equal(layer.ft_indices["default"].long(), ref_idx)
        assert torch.equal(layer.ft_rank["default"].long(), ref_ranks)


class _Allocations(TorchDispatchMode):
    """Bytes of every storage an op creates while the mode is on, alive until the storage is freed; the peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key, nbytes):
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key in inputs or key in self._seen or st.nbytes() == 0:
                continue
            self._seen.add(key)
            self.live += st.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._free, key, st.nbytes())
        return out


def test_lean_selection_extra_memory_is_at_most_ten_percent_of_the_scores():
    scores = _tied_scores([(64, 200)] * 40, seed=1, levels=1000)  # 512k scores, 2 MiB
    score_bytes = sum(s.numel() * s.element_size() for s in scores)
    k = round(0.15 * sum(s.numel() for s in scores))
    with _Allocations() as mem:
        out = top_k_ranked(scores, k)
    kept = sum(t.numel() * t.element_size() for triple in out for t in triple)  # the adapter's own state
    extra = mem.peak - kept
    assert 0 < extra <= 0.10 * score_bytes, (extra, score_bytes, mem.peak, kept)
    # the straightforward way (concatenate, sort) is far above the bound: the meter sees it
    with _Allocations() as naive:
        torch.topk(torch.cat([s.reshape(-1) for s in scores]), k)
    assert naive.peak > 0.5 * score_bytes


def test_select_parameters_on_a_model_stays_within_the_bound():
    torch.manual_seed(0)
    model = get_peft_model(_Many(), pf.FisherTuneConfig(target_modules=[f"layers.{i}" for i in range(40)],
                                                        delta_min=0.01, delta_max=0.15))
    scores = random_scores(model, seed=0)
    score_bytes = sum(s.numel() * s.element_size() for s in scores.values())
    with _Allocations() as mem:
        pf.select_parameters(model, scores)
    state = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, FisherTuneLayer)
                for d in (m.ft_indices, m.ft_rank, m.ft_values) for b in d.values())
    assert mem.peak - state <= 0.10 * score_bytes, (mem.peak, state, score_bytes)


def test_random_and_magnitude_scores():
    torch.manual_seed(0)
    model = get_peft_model(_Many(3, (8, 8)), pf.FisherTuneConfig(target_modules=["layers.0", "layers.1", "layers.2"]))
    a, b = random_scores(model, seed=4), random_scores(model, seed=4)
    assert list(a) == [n for n, _ in pf.target_parameters(model)]
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["layers.0.weight"], a["layers.1.weight"]), "same-shaped layers get different scores"
    assert not torch.equal(a["layers.0.weight"], random_scores(model, seed=5)["layers.0.weight"])
    mags = magnitude_scores(model)
    assert torch.equal(mags["layers.2.weight"], model.base_model.model.layers[2].weight.detach().abs())


@pytest.mark.parametrize("bad, match", [
    (lambda w: torch.ones(w.shape, dtype=torch.int64), r"dtype torch.int64; expected a real floating-point"),
    (lambda w: torch.ones(w.shape, dtype=torch.bool), r"dtype torch.bool"),
    (lambda w: torch.ones(w.shape, dtype=torch.complex64), r"dtype torch.complex64"),
    (lambda w: torch.empty(w.shape, device="meta"), r"meta device"),
])
def test_bad_score_tensors_are_refused(bad, match):
    torch.manual_seed(0)
    model = get_peft_model(_Many(2, (4, 4)), pf.FisherTuneConfig(target_modules=["layers.0", "layers.1"]))
    scores = random_scores(model)
    scores["layers.1.weight"] = bad(scores["layers.1.weight"])
    with pytest.raises(ValueError, match=r"scores\['layers.1.weight'\] .*" + match):
        pf.select_parameters(model, scores)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_active_positions_by_numpy_equal_torch_nonzero(dtype):
    """The CPU update finds the active candidates (rank < threshold) with numpy; the torch path (CUDA's) must give
    the same count and positions, also with none, some and all of them active, and for no candidates at all."""
    from peft_fishertune.tuner.layer import _below, _below_torch

    rank = torch.randperm(5000, generator=torch.Generator().manual_seed(0)).to(dtype)
    for threshold in (0, 1, 1234, 4999, 5000, 10**9):
        k, pos = _below(rank, threshold)
        k_ref, pos_ref = _below_torch(rank, threshold)
        assert k == k_ref == int((rank < threshold).sum())
        if k == rank.numel():
            assert pos is None and pos_ref is None
        else:
            assert pos.dtype == pos_ref.dtype == torch.int32 and torch.equal(pos, pos_ref)
            assert torch.equal(rank[pos.long()] < threshold, torch.ones(k, dtype=torch.bool))
    assert _below(torch.empty(0, dtype=dtype), 3) == (0, None) == _below_torch(torch.empty(0, dtype=dtype), 3)


def test_growing_selection_trains_as_the_active_set_says():
    """A growing δ on a real model: after each update the layer's active indices are exactly the candidates with rank
    below its threshold, ascending, and the CSR rows count them per output row."""
    model = get_peft_model(nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8)),
                           pf.FisherTuneConfig(target_modules=["0", "2"], init_selection="random",
                                               delta_min=0.05, delta_max=0.5))
    layers = [m for m in model.modules() if isinstance(m, FisherTuneLayer)]
    for fraction in (0.05, 0.1, 0.2, 0.35, 0.5):
        pf.set_active_fraction(model, fraction)
        for m in layers:
            rank, cand = m.ft_rank["default"].long(), m.ft_indices["default"].long()
            expect = cand[rank < m._threshold("default")]
            got = m.active_indices("default").long()
            assert torch.equal(got, expect) and bool((got[1:] > got[:-1]).all())
            rows = torch.bincount(expect // m.weight_shape[1], minlength=m.weight_shape[0])
            crow = torch.cat([torch.zeros(1, dtype=torch.long), rows.cumsum(0)])
            assert torch.equal(m._crow("default").long(), crow)
