"""The stage-3 sparse layer (tuner/sparse_delta.py): no weight rebuild, base weights bit-identical at every hand-back,
and the values' gradient equal to the dense reference on both sides of the SDDMM / dense-dW crossover."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from script_modules import load_script
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import peft_fishertune as pf
from peft_fishertune.tuner import sparse_delta
from peft_fishertune.tuner.layer import FisherTuneLayer


class Net(nn.Module):
    """Every wrapped layer type: Embedding, Conv2d, LayerNorm, Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.lin = nn.Linear(16, 48)
        self.out = nn.Linear(48, 4)

    def forward(self, ids, img):
        h = self.emb(ids).mean(1) + self.conv(img).mean((2, 3))
        return self.out(torch.relu(self.lin(self.norm(h))))


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 20, (4, 5), generator=g), torch.randn(4, 3, 6, 6, generator=g)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().view(torch.int32)  # bit patterns: -0.0 != 0.0, NaN payloads count


def _base_bits(model):
    return {m.ft_key: _bits(m.get_base_layer().weight) for m in model.modules() if isinstance(m, FisherTuneLayer)}


def _assert_base_unchanged(model, expected, when):
    now = _base_bits(model)
    assert now.keys() == expected.keys()
    for k in expected:
        assert torch.equal(now[k], expected[k]), f"{k}: base weight differs from the pretrained one {when}"


def test_base_weights_bit_identical_at_every_hand_back(tmp_path):
    """After a forward (with a graph pending), a backward, an optimizer step, eval, a save, and an op that raised:
    the base weights are the pretrained ones, bit for bit (the active deltas live in the weight only inside the
    sparse op)."""
    def net():
        torch.manual_seed(0)
        n = Net()
        with torch.no_grad():  # a -0.0 in the weight must survive too
            n.lin.weight[0, :4] = -0.0
        return n

    model = get_peft_model(net(), pf.FisherTuneConfig(target_modules=["emb", "conv", "norm", "lin"], init_selection="random",
                                                      init_weights=False, delta_min=0.1, delta_max=0.3))
    pretrained = _base_bits(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, img = _inputs()
    for step in range(3):
        pf.set_active_fraction(model, [0.1, 0.2, 0.3][step])
        loss = model(ids, img).pow(2).mean()
        _assert_base_unchanged(model, pretrained, f"after forward {step}")
        loss.backward()
        _assert_base_unchanged(model, pretrained, f"after backward {step}")
        opt.step()
        opt.zero_grad()
        _assert_base_unchanged(model, pretrained, f"after optimizer step {step}")
    assert all(torch.count_nonzero(m.ft_values["default"]) for m in model.modules() if isinstance(m, FisherTuneLayer))
    model.eval()
    with torch.no_grad():
        out = model(ids, img)
    _assert_base_unchanged(model, pretrained, "after an eval forward")
    model.save_pretrained(tmp_path)
    _assert_base_unchanged(model, pretrained, "after save_pretrained")
    with pytest.raises(RuntimeError):
        model.base_model.model.lin(torch.randn(2, 7))  # wrong width: the op raises inside the sparse function
    _assert_base_unchanged(model, pretrained, "after an op that raised")
    reloaded = PeftModel.from_pretrained(net(), tmp_path)
    reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids, img), out, atol=1e-6)


class _Sizes(TorchDispatchMode):
    """Records the number of elements of every new tensor an op returns (not views or in-place results: outputs
    whose storage is one of the inputs')."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {_ptr(a) for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and _ptr(t) not in inputs:
                self.sizes.append((str(func), t.values().numel() if t.layout != torch.strided else t.numel()))
        return out


def _ptr(t: torch.Tensor):
    if t.layout != torch.strided:  # sparse CSR: its values' storage
        return t.values().untyped_storage().data_ptr()
    return t.untyped_storage().data_ptr()


def test_no_weight_sized_tensor_per_step_below_the_crossover():
    """A 512 x 512 layer on 3 tokens at 2 % active (SDDMM side): forward + backward create no tensor of the weight's
    size (the old forward cloned the weight, and backward cloned it again)."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(512, 512)), pf.FisherTuneConfig(
        target_modules=["0"], init_selection="random", init_weights=False, delta_min=0.02, delta_max=0.02))
    layer = model.base_model.model[0]
    # the SDDMM side of the crossover (the old code, without a threshold, always used SDDMM on CPU in fp32)
    assert 0.02 < getattr(sparse_delta, "SDDMM_MAX_DENSITY", {"cpu": 1.0})["cpu"]
    x = torch.randn(3, 512, requires_grad=True)
    with _Sizes() as rec:
        model(x).sum().backward()
    big = [(f, n) for f, n in rec.sizes if n >= 512 * 512]
    assert not big, big
    assert layer.ft_values["default"].grad is not None


@pytest.mark.parametrize("density", [0.03, 0.4], ids=["sddmm-side", "dense-side"])
@pytest.mark.parametrize("partial", [False, True], ids=["all-active", "partly-active"])
def test_forward_and_gradients_equal_the_dense_reference(density, partial):
    """On each side of SDDMM_MAX_DENSITY['cpu']: output, input gradient and values' gradient equal those of a plain
    nn.Linear holding W + delta (autograd's dense dW sampled at the active entries); both paths agree at the same
    density."""
    assert (density < sparse_delta.SDDMM_MAX_DENSITY["cpu"]) == (density == 0.03)
    torch.manual_seed(0)
    lin = nn.Linear(96, 80)
    ref = copy.deepcopy(lin)
    model = get_peft_model(nn.Sequential(lin), pf.FisherTuneConfig(
        target_modules=["0"], init_selection="random", init_weights=False,
        delta_min=density / 2 if partial else density, delta_max=density))
    layer = model.base_model.model[0]
    assert (layer.num_active("default") < layer.num_candidates("default")) == partial
    with torch.no_grad():
        ref.weight += layer.get_delta_weight("default")
    ref.weight.requires_grad_(True)
    x = torch.randn(2, 7, 96, generator=torch.Generator().manual_seed(3))

    def run(max_density=None):
        saved = dict(sparse_delta.SDDMM_MAX_DENSITY)
        if max_density is not None:
            sparse_delta.SDDMM_MAX_DENSITY["cpu"] = max_density
        try:
            xi = x.clone().requires_grad_(True)
            out = model(xi)
            out.pow(2).sum().backward()
            g = layer.ft_values["default"].grad.clone()
            layer.ft_values["default"].grad = None
            return out.detach(), xi.grad, g
        finally:
            sparse_delta.SDDMM_MAX_DENSITY.clear()
            sparse_delta.SDDMM_MAX_DENSITY.update(saved)

    xr = x.clone().requires_grad_(True)
    ref_out = ref(xr)
    ref_out.pow(2).sum().backward()
    mask = layer.ft_rank["default"] < layer.ft_threshold["default"]
    expected_g = ref.weight.grad.reshape(-1)[layer.ft_indices["default"][mask].long()]
    out, gx, g = run()
    assert torch.allclose(out, ref_out, atol=1e-5)
    assert torch.allclose(gx, xr.grad, atol=1e-5)
    assert torch.allclose(g[mask], expected_g, atol=1e-4, rtol=1e-4)
    assert torch.count_nonzero(g[~mask]) == 0, "inactive candidates get exact zeros"
    # the other path at the same density gives the same numbers
    _, _, g_sddmm = run(max_density=1.0)
    _, _, g_dense = run(max_density=0.0)
    assert torch.allclose(g_sddmm, g_dense, atol=1e-4, rtol=1e-4)
    assert torch.equal(g_sddmm[~mask], g_dense[~mask])


def test_two_adapters_sharing_elements_add_in_order_and_restore():
    """Two adapters active on one layer (overlapping elements): the output is that of W + d1 + d2, and the base weight
    is restored bit for bit afterwards."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 16)), pf.FisherTuneConfig(
        target_modules=["0"], init_selection="random", init_weights=False, delta_min=0.5, delta_max=0.5, seed=1))
    model.add_adapter("b", pf.FisherTuneConfig(target_modules=["0"], init_selection="random", init_weights=False,
                                               delta_min=0.5, delta_max=0.5, seed=2))
    layer = model.base_model.model[0]
    a_idx, b_idx = set(layer.active_indices("default").tolist()), set(layer.active_indices("b").tolist())
    assert a_idx & b_idx, "the two selections must overlap for this test"
    layer.set_adapter(["default", "b"])
    pretrained = _bits(layer.get_base_layer().weight)
    w = layer.get_base_layer().weight.detach().clone()
    w += layer.get_delta_weight("default")
    w += layer.get_delta_weight("b")
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.allclose(layer(x), nn.functional.linear(x, w, layer.get_base_layer().bias), atol=1e-6)
    assert torch.equal(_bits(layer.get_base_layer().weight), pretrained)


def _load_crossover():
    return load_script("benchmarks/sddmm_crossover.py")


def test_crossover_interpolates_where_dense_becomes_cheaper(tmp_path):
    sc = _load_crossover()
    rows = [{"sddmm": 1.0, "dense": 4.0}, {"sddmm": 3.0, "dense": 4.0}, {"sddmm": 5.0, "dense": 4.0}]
    assert sc.crossover([0.05, 0.1, 0.2], rows) == pytest.approx(0.1 + 0.25 / 0.5 * 0.1)  # ratio 0.75 -> 1.25
    assert sc.crossover([0.05, 0.1], rows[:2]) is None  # SDDMM cheaper everywhere measured
    assert sc.crossover([0.05], [{"sddmm": 2.0, "dense": 1.0}]) == 0.0
    out = tmp_path / "x.jsonl"
    assert sc.main(["--shapes", "32x16", "--densities", "0.1,0.5", "--reps", "1", "--tokens", "8", "--out", str(out)]) == 0
    import json

    data = json.loads(out.read_text())
    assert set(data["median_s"]["32x16"][0]) == {"sddmm", "dense"} and "recommended_sddmm_max_density" in data


def test_csr_rows_of_the_active_entries_at_every_threshold():
    """The CSR row pointers SDDMM samples with (binary searches over the candidates and the active positions) equal
    the counts of active entries per row, at thresholds from none to all active, with empty rows first, inside and
    last; the cached pointers follow a threshold change."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(12, 10)), pf.FisherTuneConfig(
        target_modules=["0"], init_selection="random", delta_min=0.1, delta_max=0.1))
    layer = model.base_model.model[0]
    rows_used = torch.tensor([1, 2, 4, 5, 8])  # rows 0, 3, 6, 7, 9 have no candidate
    flat = (rows_used[:, None] * 12 + torch.randperm(12)[:7]).reshape(-1)
    ranks = torch.randperm(flat.numel())
    layer.set_candidates("default", flat, ranks, threshold=0)
    for thr in [0, 1, 5, 17, flat.numel() - 1, flat.numel()]:
        layer.set_threshold("default", thr)
        active = flat[ranks < thr]
        expected = torch.zeros(11, dtype=torch.int64)
        expected[1:] = torch.bincount(active // 12, minlength=10).cumsum(0)
        assert torch.equal(layer._crow("default").long(), expected), thr
        assert torch.equal(layer.active_indices("default").long(), active.sort().values), thr


def test_cached_active_indices_follow_thresholds_candidates_and_loads():
    """The active elements' flat indices are gathered once per threshold and reused (write, restore, backward); the
    cache follows a growing and a shrinking threshold, a new candidate list, and a load of another adapter's tensors
    of the same sizes, and a step with part of the candidates active writes exactly the active deltas."""
    torch.manual_seed(0)
    cfg = pf.FisherTuneConfig(target_modules=["0"], init_selection="random", delta_min=0.1, delta_max=0.1)
    model = get_peft_model(nn.Sequential(nn.Linear(12, 10)), cfg)
    layer = model.base_model.model[0]

    def expected():
        mask = layer.ft_rank["default"] < int(layer.ft_threshold["default"])
        return layer.ft_indices["default"][mask].long()

    flat = torch.randperm(120)[:40]
    layer.set_candidates("default", flat, torch.randperm(40), threshold=10)
    first = layer.active_indices("default")
    assert first is layer.active_indices("default")  # reused, not gathered again
    for thr in [25, 7, 40, 0, 13]:
        layer.set_threshold("default", thr)
        assert torch.equal(layer.active_indices("default").long(), expected()), thr
    layer.set_candidates("default", torch.randperm(120)[:40], torch.randperm(40), threshold=13)
    assert torch.equal(layer.active_indices("default").long(), expected())
    other = get_peft_model(nn.Sequential(nn.Linear(12, 10)), cfg)
    other.base_model.model[0].set_candidates("default", torch.randperm(120)[:40], torch.randperm(40), threshold=13)
    model.load_state_dict(other.state_dict())
    assert torch.equal(layer.active_indices("default").long(), expected())
    with torch.no_grad():
        layer.ft_values["default"].copy_(torch.randn(40))
    delta = torch.zeros(120)
    idx = expected()
    pos = torch.nonzero(layer.ft_rank["default"] < 13).view(-1)
    delta[idx] = layer.ft_values["default"].detach()[pos]
    base = layer.get_base_layer().weight.detach().clone()
    x = torch.randn(3, 12)
    with sparse_delta.deltas_in_weights(model):
        out = model(x)
    assert torch.equal(out, torch.nn.functional.linear(x, base + delta.view(10, 12), layer.get_base_layer().bias))
    assert torch.equal(layer.get_base_layer().weight, base)


@pytest.mark.parametrize("shape", [(640, 512), (512, 640)])
def test_compiled_transpose_is_the_eager_one_on_any_strides(shape):
    """contiguous_t (the compiled kernel above TRANSPOSE_COMPILE_MIN_ELEMENTS) gives t.t().contiguous() exactly, for a
    contiguous, a transposed and a sliced input."""
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    assert t.numel() >= sparse_delta.TRANSPOSE_COMPILE_MIN_ELEMENTS
    for src in (t, t.t(), torch.randn(shape[0], shape[1] + 7)[:, 3:3 + shape[1]]):
        out = sparse_delta.contiguous_t(src)
        assert out.is_contiguous() and out.shape == (src.shape[1], src.shape[0])
        assert torch.equal(out, src.t())
    assert sparse_delta._TRANSPOSE.failed is None, sparse_delta._TRANSPOSE.failed
    assert sparse_delta._TRANSPOSE.is_compiled("copy")  # the compiled kernel ran, not the eager copy


def test_sddmm_backward_with_compiled_transposes_equals_the_eager_one_bit_for_bit(monkeypatch):
    """A layer whose activations pass the compile threshold (520 tokens x 256 features): the first training forward
    compiles the transpose (before backward, where the activations peak; an inference forward and one whose backward
    takes the dense dW do not), and the values' gradient and the input gradient from the compiled transposes equal
    those from eager transposes bit for bit, and match the dense dW sampled at the active entries."""
    monkeypatch.setattr(sparse_delta, "_TRANSPOSE", sparse_delta._TRANSPOSE.fresh())
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(256, 256)), pf.FisherTuneConfig(
        target_modules=["0"], init_selection="random", init_weights=False, delta_min=0.05, delta_max=0.05))
    layer = model.base_model.model[0]
    x = torch.randn(2, 520, 256, generator=torch.Generator().manual_seed(1))
    assert x.numel() >= sparse_delta.TRANSPOSE_COMPILE_MIN_ELEMENTS
    assert sparse_delta.use_sddmm(layer, "default", "cpu", torch.float32)
    with torch.no_grad():
        model(x)
    assert not sparse_delta._TRANSPOSE.is_compiled("copy")  # no backward to come: nothing compiled
    threshold = sparse_delta.SDDMM_MAX_DENSITY["cpu"]
    monkeypatch.setitem(sparse_delta.SDDMM_MAX_DENSITY, "cpu", 0.0)  # the dense path: no transpose to compile
    model(x)  # a training forward whose backward would take the dense dW
    assert not sparse_delta._TRANSPOSE.is_compiled("copy")
    monkeypatch.setitem(sparse_delta.SDDMM_MAX_DENSITY, "cpu", threshold)
    out = model(x)
    assert sparse_delta._TRANSPOSE.is_compiled("copy")  # compiled in the forward, before backward
    del out

    def grads(min_elements):
        monkeypatch.setattr(sparse_delta, "TRANSPOSE_COMPILE_MIN_ELEMENTS", min_elements)
        xi = x.clone().requires_grad_(True)
        model(xi).pow(2).sum().backward()
        g = layer.ft_values["default"].grad.clone()
        layer.ft_values["default"].grad = None
        return xi.grad, g

    gx_c, gv_c = grads(1 << 18)
    assert sparse_delta._TRANSPOSE.failed is None, sparse_delta._TRANSPOSE.failed
    gx_e, gv_e = grads(1 << 62)
    assert torch.equal(gx_c, gx_e)
    assert torch.equal(gv_c, gv_e)
    ref = nn.Linear(256, 256)
    with torch.no_grad():
        ref.weight.copy_(layer.get_base_layer().weight + layer.get_delta_weight("default").view(256, 256))
        ref.bias.copy_(layer.get_base_layer().bias)
    ref(x).pow(2).sum().backward()
    mask = layer.ft_rank["default"] < layer.ft_threshold["default"]
    expected = ref.weight.grad.reshape(-1)[layer.ft_indices["default"][mask].long()]
    assert torch.allclose(gv_c[mask], expected, rtol=1e-4, atol=1e-3)


def _broken_compile(*args, **kwargs):
    """torch.compile as it behaves without a C++ compiler: the compiled function raises when called."""
    def run(*a, **k):
        raise RuntimeError("no C++ compiler found")
    return run


def test_a_transpose_compile_that_fails_is_logged_and_the_eager_copy_runs(monkeypatch, caplog):
    """torch.compile failing (e.g. no C++ compiler for inductor) is reported once, naming the error, and the transpose
    still comes back right (eager)."""
    monkeypatch.setattr(sparse_delta, "_TRANSPOSE", sparse_delta._TRANSPOSE.fresh())
    monkeypatch.setattr(torch, "compile", _broken_compile)
    t = torch.randn(600, 512)
    with caplog.at_level("WARNING", logger="peft_fishertune.tuner"):
        out = sparse_delta.contiguous_t(t)
        again = sparse_delta.contiguous_t(t)
    assert torch.equal(out, t.t()) and torch.equal(again, t.t())
    assert "no C++ compiler found" in sparse_delta._TRANSPOSE.failed
    warned = [r for r in caplog.records if "transpose kernel failed" in r.getMessage()]
    assert len(warned) == 1 and "no C++ compiler found" in warned[0].getMessage()


def test_step_transposes_reuse_one_buffer_per_role_and_shape_only_inside_a_step():
    """Inside deltas_in_weights, step_transpose writes into one buffer per (role, shape): a second call of the same
    role and shape reuses its storage, another role gets its own; outside the step (before, after, or on another
    thread while the step is open) every call is a new tensor. Values are tᵀ in every case."""
    import threading

    gen = torch.Generator().manual_seed(0)
    t1, t2 = torch.randn(520, 512, generator=gen), torch.randn(520, 512, generator=gen)
    assert t1.numel() >= sparse_delta.TRANSPOSE_COMPILE_MIN_ELEMENTS
    model = nn.Linear(2, 2)
    a, b = sparse_delta.step_transpose(t1, "g"), sparse_delta.step_transpose(t1, "g")
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, t1.t())  # no step open: new tensors
    other = {}
    with torch.no_grad(), sparse_delta.deltas_in_weights(model):
        g1 = sparse_delta.step_transpose(t1, "g")
        assert torch.equal(g1, t1.t())
        ptr = g1.data_ptr()
        x1 = sparse_delta.step_transpose(t2, "x")
        g2 = sparse_delta.step_transpose(t2, "g")
        assert g2.data_ptr() == ptr and x1.data_ptr() != ptr  # same role and shape: the same buffer
        assert torch.equal(g2, t2.t()) and torch.equal(x1, t2.t())
        worker = threading.Thread(target=lambda: other.update(
            out=sparse_delta.step_transpose(t1, "g"), bufs=getattr(sparse_delta._STEP, "buffers", None)))
        worker.start()
        worker.join()
    assert other["bufs"] is None and other["out"].data_ptr() not in (ptr, x1.data_ptr())
    assert torch.equal(other["out"], t1.t())
    assert sparse_delta._TRANSPOSE_INTO.failed is None, sparse_delta._TRANSPOSE_INTO.failed
    assert getattr(sparse_delta._STEP, "buffers", None) is None  # freed with the step
    assert sparse_delta.step_transpose(t1, "g").data_ptr() != ptr


def test_step_buffers_give_the_same_gradients_bit_for_bit(monkeypatch):
    """Two square layers in a row (their gᵀ and xᵀ have the same shape, so only the role keeps them apart) and a
    wide one: the values' and input gradients of a backward inside deltas_in_weights are the same with the
    transposes in step buffers as with a new tensor per transpose."""
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 640)),
                           pf.FisherTuneConfig(target_modules=["0", "1", "2"], init_selection="random",
                                               init_weights=False, delta_min=0.05, delta_max=0.05))
    layers = [model.base_model.model[i] for i in range(3)]
    assert all(sparse_delta.use_sddmm(m, "default", "cpu", torch.float32) for m in layers)
    x = torch.randn(2, 520, 256, generator=torch.Generator().manual_seed(1))

    def grads(buffered: bool):
        monkeypatch.setattr(sparse_delta, "TRANSPOSE_BUFFERS_IN_STEP", buffered)
        xi = x.clone().requires_grad_(True)
        with sparse_delta.deltas_in_weights(model):
            model(xi).pow(2).sum().backward()
        out = [xi.grad] + [m.ft_values["default"].grad.clone() for m in layers]
        for m in layers:
            m.ft_values["default"].grad = None
        return out

    new, buffered = grads(False), grads(True)
    assert sparse_delta._TRANSPOSE_INTO.failed is None, sparse_delta._TRANSPOSE_INTO.failed
    assert all(torch.equal(a, b) for a, b in zip(new, buffered))
    assert all(g.abs().sum() > 0 for g in buffered)


def test_a_buffered_transpose_compile_that_fails_is_logged_and_new_tensors_are_made(monkeypatch, caplog):
    """torch.compile failing for the buffered kernel is reported once, naming the error; the step's transposes come
    back right as new tensors, and later steps do not try again."""
    monkeypatch.setattr(sparse_delta, "_TRANSPOSE", sparse_delta._TRANSPOSE.fresh())
    monkeypatch.setattr(sparse_delta, "_TRANSPOSE_INTO", sparse_delta._TRANSPOSE_INTO.fresh())
    monkeypatch.setattr(torch, "compile", _broken_compile)
    t = torch.randn(600, 512)
    with caplog.at_level("WARNING", logger="peft_fishertune.tuner"):
        for _ in range(2):
            with torch.no_grad(), sparse_delta.deltas_in_weights(nn.Linear(2, 2)):
                a, b = sparse_delta.step_transpose(t, "g"), sparse_delta.step_transpose(t, "g")
            assert torch.equal(a, t.t()) and torch.equal(b, t.t()) and a.data_ptr() != b.data_ptr()
    assert "no C++ compiler found" in sparse_delta._TRANSPOSE_INTO.failed
    warned = [r for r in caplog.records if "buffered transpose failed" in r.getMessage()]
    assert len(warned) == 1 and "no C++ compiler found" in warned[0].getMessage()


def test_dense_dw_workspace_is_per_thread():
    """The CPU dense-dW workspace is reused per shape; a dW taken on one thread must survive another thread's dW of
    the same shape until it is gathered (one shared buffer would overwrite it: a wrong gradient, silently)."""
    import threading

    g = torch.Generator().manual_seed(0)
    g1, x1, g2, x2 = (torch.randn(40, n, generator=g) for n in (24, 16, 24, 16))
    mine = sparse_delta._dense_dw(g1, x1, (24, 16), torch.float32)
    expected = g1.t() @ x1
    assert torch.equal(mine, expected)
    other = {}
    worker = threading.Thread(target=lambda: other.update(dw=sparse_delta._dense_dw(g2, x2, (24, 16), torch.float32)))
    worker.start()
    worker.join()
    assert torch.equal(other["dw"], g2.t() @ x2)
    assert torch.equal(mine, expected), "another thread's dW overwrote this thread's workspace"
    assert sparse_delta._dense_dw(g2, x2, (24, 16), torch.float32).data_ptr() == mine.data_ptr()  # reused here


def test_two_threads_training_same_shaped_layers_get_their_own_gradients():
    """Two models with same-shaped layers above the SDDMM threshold (dense dW + gather) run backward at the same
    time on two threads: each values' gradient equals the one the same backward gives alone."""
    import threading

    def make(seed):
        torch.manual_seed(seed)
        return get_peft_model(nn.Sequential(*[nn.Linear(96, 96) for _ in range(6)]),
                              pf.FisherTuneConfig(target_modules=[str(i) for i in range(6)], init_selection="random",
                                                  init_weights=False, delta_min=0.5, delta_max=0.5))

    models = [make(1), make(2)]
    layers = [[m.base_model.model[i] for i in range(6)] for m in models]
    assert not any(sparse_delta.use_sddmm(m, "default", "cpu", torch.float32) for m in layers[0])
    xs = [torch.randn(8, 64, 96, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]

    def grads(i, rounds=1, barrier=None):
        out = None
        for _ in range(rounds):
            if barrier is not None:
                barrier.wait()
            with sparse_delta.deltas_in_weights(models[i]):
                models[i](xs[i]).pow(2).sum().backward()
            got = [m.ft_values["default"].grad.clone() for m in layers[i]]
            for m in layers[i]:
                m.ft_values["default"].grad = None
            assert out is None or all(torch.equal(a, b) for a, b in zip(out, got)), f"model {i}: gradients moved"
            out = got
        return out

    alone = [grads(0), grads(1)]
    together, errors = {}, []
    barrier = threading.Barrier(2)

    def run(i):
        try:
            together[i] = grads(i, rounds=20, barrier=barrier)
        except AssertionError as exc:  # noqa: PERF203
            errors.append(str(exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(alone[i], together[i])), f"model {i}'s gradients differ"


@pytest.mark.parametrize("delta", [0.05, 0.5], ids=["sddmm", "dense_dw"])
@pytest.mark.parametrize("resident", [False, True], ids=["per_call", "deltas_in_weights"])
def test_higher_order_gradients_are_refused_naming_the_layer(resident, delta):
    """create_graph=True through FisherTune layers (transformers' ViT, SDDMM and dense-dW layers): refused in
    backward, naming the layer. Before, inside deltas_in_weights a Hessian-vector product over the values came back
    wrong without a word (the term through the weight was missing), and outside it autograd failed on a version
    counter without saying why."""
    from contextlib import nullcontext

    from transformers import ViTConfig, ViTForImageClassification
    from transformers.trainer_utils import set_seed

    set_seed(0)
    model = get_peft_model(
        ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, image_size=16, patch_size=8, num_labels=3)),
        pf.FisherTuneConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
                            init_selection="random", init_weights=False, delta_min=delta, delta_max=delta))
    values = [p for n, p in model.named_parameters() if "ft_values" in n]
    x = torch.randn(2, 3, 16, 16)
    with sparse_delta.deltas_in_weights(model) if resident else nullcontext():
        loss = model(pixel_values=x).logits.pow(2).sum()
        with pytest.raises(RuntimeError, match=r"FisherTune layer '.*': higher-order gradients .*create_graph=True"):
            torch.autograd.grad(loss, values, create_graph=True)
        loss = model(pixel_values=x).logits.pow(2).sum()
        grads = torch.autograd.grad(loss, values)  # first order: as before
    assert any(g.abs().sum() > 0 for g in grads)
