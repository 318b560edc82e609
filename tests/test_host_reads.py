"""Host reads on the per-step paths (issue 23, the GPU profile's first suspects): each read of a device value waits
for the device's queue, so the estimator's streamed step and the δ(t) update read once per pass / update, not once
per weight.

Counted here on the CPU with a dispatch mode that records every operation which reads a value on the host
(`_local_scalar_dense`: `float()` / `int()` / `bool()`; `nonzero`; a copy to the CPU, which is `host_values`), on
transformers' own ViT built from a config. The deferred paths are the ones CUDA takes; on the CPU they are asked for
(`defer_checks=True`, `count_below`) and must give the immediate paths' numbers bit for bit.
"""

import math

import pytest
import torch
import transformers as T
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

import peft_fishertune as pf
from peft_fishertune.fisher import VariationalFisherEstimator
from peft_fishertune.fisher.errors import FisherInputError
from peft_fishertune.fisher.micro_batch import MicroBatchStatistics, PassChecks
from peft_fishertune.tuner.layer import FisherTuneLayer, _below, count_below


class HostReads(TorchDispatchMode):
    """Counts the operations that read a tensor's value on the host."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "nonzero", "is_nonzero", "equal") or (
                name == "_to_copy" and kwargs.get("device") == torch.device("cpu")):
            self.count += 1
        return func(*args, **kwargs)


def _vit():
    torch.manual_seed(0)
    return T.ViTForImageClassification(T.ViTConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=16,
        patch_size=8, num_labels=4))


def _linear_weights(model):
    return {n: p for n, p in model.named_parameters()
            if n.startswith("vit.layers") and n.endswith("weight") and p.dim() == 2}


def _batch(seed=0, nan=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, 16, 16, generator=g)
    if nan:
        x[0, 0, 0, 0] = float("nan")
    return {"pixel_values": x, "labels": torch.randint(0, 4, (3,), generator=g)}


def _estimator(model, defer, **kw):
    est = VariationalFisherEstimator(model, params=_linear_weights(model), mode="batch", tau=0.05, seed=3,
                                     fused_kernels=False, **kw)
    est.defer_checks = defer
    return est


@pytest.mark.parametrize("lambda_dr", [0.5, 0.0])
@pytest.mark.parametrize("acc", ["bfloat16", "float32"])
def test_streamed_step_reads_once_per_pass_and_estimates_the_same(lambda_dr, acc):
    model = _vit()
    n = len(_linear_weights(model))
    assert n == 18
    results, reads = {}, {}
    for defer in (False, True):
        est = _estimator(model, defer, lambda_dr=lambda_dr, accumulator_dtype=acc)
        counts = []
        for s in range(3):
            with HostReads() as hr:
                est.step(_batch(s))
            counts.append(hr.count)
        results[defer], reads[defer] = est.result(), max(counts)
    for name in _linear_weights(model):
        assert torch.equal(results[True].scores[name], results[False].scores[name])
        assert torch.equal(results[True].fisher_x[name], results[False].fisher_x[name])
        if lambda_dr:
            assert torch.equal(results[True].delta_f[name], results[False].delta_f[name])
    passes = 2 if lambda_dr else 1
    assert reads[False] >= passes * n  # a read per weight per pass
    # one per pass, and the x' pass's w (drawn on the CPU: no device read)
    assert reads[True] <= passes + 1, reads


def test_streamed_step_on_the_default_path_reads_per_weight_on_the_cpu_only():
    est = _estimator(_vit(), None)
    assert est._deferred_checks() is None  # auto: every targeted weight is on the CPU
    est.defer_checks = True
    assert isinstance(est._deferred_checks(), PassChecks)


@pytest.mark.parametrize("defer", [False, True])
def test_a_nan_batch_in_the_x_pass_is_refused_and_the_estimate_goes_on(defer):
    """DR term on: the x pass folds nothing into the precision, so a non-finite x pass is refused by weight name and
    the estimate equals one that never saw the batch, whether checked per weight or at the end of the pass."""
    model = _vit()
    a, b = _estimator(model, defer), _estimator(model, defer)
    a.step(_batch(0))
    b.step(_batch(0))
    with pytest.raises(FisherInputError, match="non-finite gradient for 'vit.layers"):
        a.step(_batch(5, nan=True))
    a.step(_batch(1))
    b.step(_batch(1))
    ra, rb = a.result(), b.result()
    for name in _linear_weights(model):
        assert torch.equal(ra.fisher_x[name], rb.fisher_x[name]) and torch.equal(ra.delta_f[name], rb.delta_f[name])


@pytest.mark.parametrize("defer", [False, True])
def test_a_nan_batch_without_the_dr_term_stops_the_estimate(defer):
    est = _estimator(_vit(), defer, lambda_dr=0.0)
    est.step(_batch(0))
    with pytest.raises(FisherInputError, match="non-finite gradient"):
        est.step(_batch(5, nan=True))
    with pytest.raises(RuntimeError, match="cannot continue"):
        est.step(_batch(1))


def test_pass_checks_apply_the_immediate_rule():
    """Per weight, in arrival order: non-finite squares are bad; finite squares whose float32 sum overflows are kept
    (as `_checked_square` does); the total is the float64 sum of the float32 sums of the good ones."""
    names = ["ok", "nan", "overflow", "inf", "ok2"]
    sqs = {0: torch.tensor([1.5, 2.25]), 1: torch.tensor([1.0, float("nan")]), 2: torch.tensor([3e38, 3e38]),
           3: torch.tensor([float("inf"), 0.0]), 4: torch.tensor([1e-3, 7.0])}
    order = [4, 1, 0, 3, 2]
    checks, bad, total = PassChecks(names), [], [0.0]
    for i in order:
        checks.add(i, sqs[i])
    checks.settle(bad, total)

    class _Immediate(MicroBatchStatistics):
        def _work(self, i, _):
            return torch.empty_like(sqs[i])

    imm, bad_i, total_i = _Immediate(), [], [0.0]
    imm.names = names
    for i in order:
        imm._checked_square(i, sqs[i].sqrt(), bad_i, total_i)
    assert bad == bad_i == ["nan", "inf"]
    assert math.isinf(total[0]) and math.isinf(total_i[0])  # the overflowing weight is kept, as before
    checks, bad, total = PassChecks(names), [], [0.0]
    for i in (4, 0):
        checks.add(i, sqs[i])
    checks.settle(bad, total)
    assert bad == [] and total[0] == float(sqs[4].sum()) + float(sqs[0].sum())


def _grown_vit(fraction=0.02):
    model = get_peft_model(_vit(), pf.FisherTuneConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
                                                       init_selection="random", delta_min=fraction, delta_max=0.3))
    return model, [m for m in model.modules() if isinstance(m, FisherTuneLayer)]


def test_count_below_equals_the_per_layer_scan_with_one_read():
    _, layers = _grown_vit()
    ranks = [m.ft_rank["default"] for m in layers]
    n = sum(r.numel() for r in ranks)
    for thr in (0, 1, n // 7, n // 2, n):  # none, one, some, half, all active
        thresholds = [thr] * len(ranks)
        with HostReads() as hr:
            got = count_below(ranks, thresholds)
        assert hr.count == 1
        for (k, pos), r in zip(got, ranks):
            k_ref, pos_ref = _below(r, thr)
            assert k == k_ref
            assert (pos is None) == (pos_ref is None)
            if pos is not None:
                assert pos.dtype == pos_ref.dtype and torch.equal(pos, pos_ref)


def test_a_growing_update_reads_the_device_once_per_update(monkeypatch):
    """`set_active_fraction` over a transformers ViT: the same active sets as the per-layer scan, and on the device
    path (asked for on the CPU) one read for the fixed-selection check and one for every layer's count."""
    from peft_fishertune.tuner import layer as layer_mod

    model, layers = _grown_vit()
    ref, ref_layers = _grown_vit()
    for fraction in (0.03, 0.05, 0.1, 0.2, 0.3):
        monkeypatch.setattr(layer_mod, "NUMPY_SCAN_ON_CPU", False)
        with HostReads() as hr:
            pf.set_active_fraction(model, fraction)
        assert hr.count == 2, (fraction, hr.count)
        monkeypatch.setattr(layer_mod, "NUMPY_SCAN_ON_CPU", True)
        with HostReads() as hr:
            pf.set_active_fraction(ref, fraction)
        assert hr.count >= 1  # the fixed-selection check; numpy's scan is not a torch operation
        for m, r in zip(layers, ref_layers):
            assert m.num_active("default") == r.num_active("default") > 0
            assert torch.equal(m.active_indices("default"), r.active_indices("default"))
            assert torch.equal(m._crow("default"), r._crow("default"))
    # a layer nobody prepared (a load, a device move) still makes its set on first use
    layers[0]._active_cache.clear()
    assert torch.equal(layers[0].active_indices("default"), ref_layers[0].active_indices("default"))


def test_a_fixed_selection_is_still_refused_by_set_active_fraction():
    model, layers = _grown_vit()
    for m in layers:
        m.ft_rank["default"].fill_(-1)
    with pytest.raises(ValueError, match="selection is fixed"):
        pf.set_active_fraction(model, 0.1)
