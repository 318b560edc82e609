"""Structural guarantees of the Fisher engine (issue 9): streamed gradients, owned memory, untouched model.

No timing or allocator measurements: each check is about which tensors exist, not how fast.
"""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_fishertune.fisher import EmpiricalFisherEstimator, FisherInputError, VariationalFisherEstimator
from peft_fishertune.fisher.gradients import stream_grads
from peft_fishertune.fisher.weight_sampling import stream_sampled_grads


class BNNet(nn.Module):
    """conv -> BatchNorm -> conv -> per-pixel logits; `head` plays the decoder (not targeted)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, pixel_values, labels):
        h = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(pixel_values)))))
        return {"loss": F.cross_entropy(self.head(h), labels)}


def _batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 8, 8, generator=g) * torch.rand(b, 3, 1, 1, generator=g) * 2 + torch.randn(b, 3, 1, 1,
                                                                                                     generator=g)
    return {"pixel_values": x, "labels": torch.randint(0, 4, (b, 8, 8), generator=g)}


def _targets(model):
    return {"conv1.weight": model.conv1.weight, "conv2.weight": model.conv2.weight}


ESTIMATORS = [
    ("empirical", "batch", {}),
    ("empirical", "per_sample", {}),
    ("variational", "batch", {}),
    ("variational", "batch", {"regenerate_samples": True}),
    ("variational", "per_sample", {"per_sample_method": "loop", "regenerate_samples": True}),
    ("variational", "per_sample", {}),
]


def _make(kind, mode, model, **kw):
    cls = EmpiricalFisherEstimator if kind == "empirical" else VariationalFisherEstimator
    return cls(model, params=_targets(model), mode=mode, **kw)


@pytest.mark.parametrize("kind,mode,kw", ESTIMATORS)
def test_step_leaves_buffers_params_and_grads_untouched(kind, mode, kw):
    torch.manual_seed(0)
    model = BNNet().train()
    model.conv1.weight.requires_grad_(False)  # like a PEFT base weight
    sentinel = torch.full_like(model.head.weight, 3.0)
    model.head.weight.grad = sentinel.clone()  # the decoder's gradient between two optimizer steps
    before = {k: v.clone() for k, v in model.state_dict().items()}
    est = _make(kind, mode, model, **kw)
    est.step(_batch())
    est.step(_batch(seed=1))
    res = est.result()
    for k, v in model.state_dict().items():  # BatchNorm running statistics included
        assert torch.equal(v, before[k]), k
    assert model.conv1.weight.grad is None and model.conv2.weight.grad is None and model.bn.weight.grad is None
    assert torch.equal(model.head.weight.grad, sentinel)
    assert model.conv1.weight.requires_grad is False and model.conv2.weight.requires_grad is True
    assert not any("forward" in m.__dict__ for m in model.modules())  # no instance forward left behind
    if mode == "per_sample" and "per_sample_method" not in kw:
        assert res.metadata["per_sample_method"] == "vmap"  # BN no longer forces the loop
    # the test can fail: a plain train-mode forward does move the running statistics
    model(**_batch())
    assert not torch.equal(model.bn.running_mean, before["bn.running_mean"])


def test_exception_mid_pass_leaves_model_clean():
    model = BNNet()
    est = VariationalFisherEstimator(model, params=_targets(model), mode="batch", regenerate_samples=True)
    bad = dict(_batch(), labels=torch.full((4, 8, 8), 9))  # class 9 of 4: cross_entropy raises
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Exception):
        est.step(bad)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not any("weight" in m.__dict__ for m in model.modules())
    assert model.bn.track_running_stats
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("sampled", [None, "regenerate", "keep"])
def test_gradients_are_streamed_not_held(sampled):
    """Each weight's gradient is gone before the next one is delivered (no full-model gradient at once)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(4)])
    params = {f"{i}.weight": model[i].weight for i in range(4)}
    batch = {"input": torch.randn(5, 6)}
    alive: list[weakref.ref] = []
    order = []

    def on_grad(i, g):
        assert all(r() is None for r in alive), "an earlier gradient is still alive"
        order.append(i)
        alive.append(weakref.ref(g))

    def loss_fn(out, b):
        return out.square().mean()

    paths = list(params)
    if sampled:
        makers = [lambda p=p: p.detach() * 1.0 for p in params.values()]
        stream_sampled_grads(model, batch, paths, makers, loss_fn, on_grad, regenerate=sampled == "regenerate")
    else:
        stream_grads(model, batch, paths, list(params.values()), loss_fn, on_grad)
    gc.collect()
    assert sorted(order) == [0, 1, 2, 3] and order[0] == 3  # backward order: last layer first


@pytest.mark.parametrize("kind", ["empirical", "variational"])
@pytest.mark.parametrize("dr", [False, True])
@pytest.mark.parametrize("keep", [False, True])
def test_owned_tensors_within_stated_bound(kind, dr, keep):
    model = BNNet()
    est = _make(kind, "batch", model, perturb=dr, keep_fisher_xp=keep)
    est.step(_batch())
    numel = sum(p.numel() for p in _targets(model).values())
    owned = sum(t.numel() for t in est.owned_tensors())
    assert owned <= est.memory_bound() == numel * (1 + int(dr) + int(dr and keep))
    refs = [weakref.ref(t) for t in est.owned_tensors()]
    est.release()
    gc.collect()
    assert all(r() is None for r in refs)


def _count_forwards(model):
    calls = []
    model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    return calls


@pytest.mark.parametrize("kind", ["empirical", "variational"])
def test_fim_only_skips_the_perturbed_pass(kind):
    model = BNNet()
    calls = _count_forwards(model)
    est = _make(kind, "batch", model, lambda_dr=0.0)
    est.step(_batch())
    assert len(calls) == 1 and not est.dr_on
    res = est.result()
    assert res.fisher_xp is None and all(torch.equal(t, torch.zeros_like(t)) for t in res.delta_f.values())
    calls.clear()
    est = _make(kind, "batch", model, lambda_dr=0.5)
    est.step(_batch())
    assert len(calls) == 2 and est.dr_on


def test_micro_batch_of_one_is_refused_with_the_dr_term():
    model = BNNet().eval()
    with pytest.raises(FisherInputError, match="micro-batch of 1 sample.*lambda_dr=0"):
        _make("empirical", "batch", model).step(_batch(b=1))
    _make("empirical", "batch", model, lambda_dr=0.0).step(_batch(b=1))  # FIM only: fine
    _make("empirical", "batch", model, perturb=False).step(_batch(b=1))


@pytest.mark.parametrize("kind", ["empirical", "variational"])
def test_accumulator_dtype_and_device_options(kind):
    torch.manual_seed(0)
    model = BNNet()
    ref = _make(kind, "batch", model)
    low = _make(kind, "batch", model, accumulator_dtype="bfloat16", accumulator_device="cpu")
    for s in range(3):
        ref.step(_batch(seed=s))
        low.step(_batch(seed=s))
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in low.owned_tensors())
    a, b = ref.result(), low.result()
    for n in a.scores:
        torch.testing.assert_close(b.fisher_x[n], a.fisher_x[n], rtol=2e-2, atol=1e-8)
    with pytest.raises(FisherInputError, match="accumulator_dtype='float16'"):
        _make(kind, "batch", model, accumulator_dtype="float16")
    with pytest.raises(FisherInputError, match="accumulator_device='cuda:7'"):
        _make(kind, "batch", model, accumulator_device="cuda:7")


@pytest.mark.parametrize("mode", ["batch", "per_sample"])
def test_regenerated_samples_equal_kept_samples(mode):
    """Checkpointed layers regenerate exactly the sample the forward used (same key, same draw)."""
    torch.manual_seed(0)
    model = BNNet()
    kw = dict(mode=mode, per_sample_method="loop", tau=0.05, seed=4)
    a = _make("variational", mode, model, regenerate_samples=True, **{k: v for k, v in kw.items() if k != "mode"})
    b = _make("variational", mode, model, regenerate_samples=False, **{k: v for k, v in kw.items() if k != "mode"})
    for s in range(2):
        a.step(_batch(seed=s))
        b.step(_batch(seed=s))
    ra, rb = a.result(), b.result()
    for n in ra.scores:
        torch.testing.assert_close(ra.fisher_x[n], rb.fisher_x[n], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(ra.delta_f[n], rb.delta_f[n], rtol=1e-4, atol=1e-8)
    assert ra.metadata["regenerate_samples"] and not rb.metadata["regenerate_samples"]


class MLPNet(nn.Module):
    """Tokens -> Linear -> GELU -> Linear -> per-token logits: every targeted weight is an nn.Linear's."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, pixel_values, labels):
        h = self.fc2(F.gelu(self.fc1(pixel_values)))
        return {"loss": F.cross_entropy(self.head(h).flatten(0, 1), labels.flatten())}


def _tokens(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 5, 6, generator=g) * (1 + torch.rand(b, 1, 6, generator=g)) + torch.randn(b, 1, 6, generator=g)
    return {"pixel_values": x, "labels": torch.randint(0, 3, (b, 5), generator=g)}


def test_linear_layers_regenerate_their_sample_in_backward_exactly():
    """The nn.Linear path (_SampledLinear: only x kept, θ made again in backward) equals keeping the sample."""
    torch.manual_seed(0)
    model = MLPNet()
    params = {"fc1.weight": model.fc1.weight, "fc2.weight": model.fc2.weight}
    ests = [VariationalFisherEstimator(model, params=params, mode="batch", tau=0.05, seed=3, regenerate_samples=r)
            for r in (True, False)]
    for s in range(3):
        for e in ests:
            e.step(_tokens(seed=s))
    ra, rb = (e.result() for e in ests)
    for n in params:
        torch.testing.assert_close(ra.fisher_x[n], rb.fisher_x[n], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(ra.delta_f[n], rb.delta_f[n], rtol=1e-4, atol=1e-8)
        assert ra.fisher_x[n].abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def _jaccard_top(a: dict, b: dict, frac=0.15) -> float:
    fa, fb = torch.cat([a[n].flatten() for n in a]), torch.cat([b[n].flatten() for n in a])
    k = max(1, int(frac * fa.numel()))
    sa, sb = set(fa.topk(k).indices.tolist()), set(fb.topk(k).indices.tolist())
    return len(sa & sb) / len(sa | sb)


@pytest.mark.parametrize("kind", ["empirical", "variational"])
def test_consumed_result_equals_the_kept_result_and_releases(kind):
    """result(consume=True) builds the same scores in place from the accumulators, then releases the estimator."""
    torch.manual_seed(0)
    model = BNNet()
    a, b = _make(kind, "batch", model, seed=1), _make(kind, "batch", model, seed=1)
    for s in range(3):
        a.step(_batch(seed=s))
        b.step(_batch(seed=s))
    kept, consumed = a.result(), b.result(consume=True)
    for n in kept.scores:
        torch.testing.assert_close(consumed.scores[n], kept.scores[n], rtol=1e-5, atol=1e-7)
    assert consumed.fisher_x is None and consumed.delta_f is None
    assert consumed.metadata["lambda_effective"] == pytest.approx(kept.metadata["lambda_effective"], rel=1e-5)
    assert b.released and b.owned_tensors() == []
    with pytest.raises(RuntimeError, match="released"):
        b.result()


def test_streamed_step_matches_the_general_path():
    """One process, one micro-batch, batch mode: Λ updated as each gradient arrives (F(x) kept in bfloat16 only
    until the x' pass) agrees with the general path (an fp32 statistic buffer) to bfloat16 rounding."""
    torch.manual_seed(0)
    model = MLPNet()
    params = {"fc1.weight": model.fc1.weight, "fc2.weight": model.fc2.weight}
    lean = VariationalFisherEstimator(model, params=params, mode="batch", tau=0.05, seed=2)
    general = VariationalFisherEstimator(model, params=params, mode="batch", tau=0.05, seed=2)
    general._step_natural_streamed = None  # never called: the general path runs when it is not callable
    for s in range(4):
        lean.step(_tokens(seed=s))
        VariationalFisherEstimator._step_natural_general(general, [_tokens(seed=s)])
        general.steps += 1
    ra, rb = lean.result(), general.result()
    for n in params:
        torch.testing.assert_close(ra.fisher_x[n], rb.fisher_x[n], rtol=2e-2, atol=1e-10)
        torch.testing.assert_close(ra.delta_f[n], rb.delta_f[n], rtol=5e-2, atol=1e-4)
    assert _jaccard_top(ra.scores, rb.scores) > 0.9


def test_non_finite_gradient_in_the_streamed_step_stops_the_estimate():
    model = MLPNet()
    params = {"fc1.weight": model.fc1.weight, "fc2.weight": model.fc2.weight}
    est = VariationalFisherEstimator(model, params=params, mode="batch", lambda_dr=0.0)
    bad = _tokens()
    bad["pixel_values"][0, 0, 0] = float("nan")
    with pytest.raises(FisherInputError, match="non-finite gradient"):
        est.step(bad)
    with pytest.raises(RuntimeError, match="cannot continue"):
        est.step(_tokens())


def test_release_freed_memory_runs():
    from peft_fishertune._memory import release_freed_memory

    assert release_freed_memory() in (True, False)


def test_block_checkpointing_gives_the_same_estimate_on_a_transformers_vit():
    """estimator_checkpointing: each Dinov2Layer runs under activation checkpointing during the passes; its
    recomputed forward makes the same samples from their keys, so the estimate is unchanged."""
    from peft_fishertune.fisher.weight_sampling import checkpoint_blocks

    model, params, batches = dinov2_seg()
    on = VariationalFisherEstimator(model, params=params, mode="batch", tau=0.05, seed=1, checkpointing=True)
    off = VariationalFisherEstimator(model, params=params, mode="batch", tau=0.05, seed=1, checkpointing=False)
    assert [type(b).__name__ for b in on.blocks] == ["Dinov2Layer", "Dinov2Layer"] and off.blocks == []
    assert checkpoint_blocks(model, ["head.weight"]) == []  # only blocks that own a targeted weight
    for b in batches:
        on.step(b)
        off.step(b)
    ra, rb = on.result(), off.result()
    for n in params:
        torch.testing.assert_close(ra.fisher_x[n], rb.fisher_x[n], rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(ra.delta_f[n], rb.delta_f[n], rtol=1e-3, atol=1e-6)
    assert ra.metadata["checkpointed_blocks"] == 2
    assert not any("forward" in m.__dict__ for m in model.modules())
    with pytest.raises(FisherInputError, match="checkpointing='yes'"):
        VariationalFisherEstimator(model, params=params, checkpointing="yes")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_empirical_streamed_step_equals_the_general_path(dtype):
    """Batch mode folds each ĝ² into F(x)'s accumulator as it arrives and keeps F(x) (in the accumulator dtype)
    only until the x' pass: with float32 accumulators that is the general path's estimate bit for bit, with
    bfloat16 ones they differ by bfloat16 rounding. Two micro-batches per step included."""
    torch.manual_seed(0)
    model = BNNet()
    lean = _make("empirical", "batch", model, seed=1, accumulator_dtype=dtype)
    general = _make("empirical", "batch", model, seed=1, accumulator_dtype=dtype)
    assert lean.dr_on
    for s in range(3):
        micro = [_batch(seed=s)] if s != 1 else [_batch(seed=10), _batch(seed=11)]
        lean.step(micro)
        EmpiricalFisherEstimator._step_general(general, micro)
        general.steps += 1
    ra, rb = lean.result(), general.result()
    assert ra.num_samples == rb.num_samples == 16 and ra.w == rb.w
    for n in _targets(model):
        if dtype == "float32":
            assert torch.equal(ra.fisher_x[n], rb.fisher_x[n])
            assert torch.equal(ra.delta_f[n], rb.delta_f[n]) and torch.equal(ra.scores[n], rb.scores[n])
        else:  # the general path rounds each micro-batch's statistic to bfloat16 before adding it
            torch.testing.assert_close(ra.fisher_x[n], rb.fisher_x[n], rtol=2e-2, atol=1e-8)
            torch.testing.assert_close(ra.delta_f[n], rb.delta_f[n], rtol=5e-2, atol=1e-3)


@pytest.mark.parametrize("dr", [True, False])
def test_empirical_batch_mode_holds_no_statistic_buffer(dr, monkeypatch):
    """The general path's per-micro-batch statistic buffer (one value per targeted element) is never made in
    batch mode; the probe does see it in per-sample mode, in the accumulator dtype."""
    model = BNNet()
    calls = []
    original = EmpiricalFisherEstimator._zeros

    def probe(self, *, compute=False, stat=False):
        calls.append(compute or stat)
        out = original(self, compute=compute, stat=stat)
        if stat:
            assert out[0].dtype == torch.bfloat16  # the accumulator dtype asked for
        return out

    monkeypatch.setattr(EmpiricalFisherEstimator, "_zeros", probe)
    est = _make("empirical", "batch", model, lambda_dr=0.5 if dr else 0.0, accumulator_dtype="bfloat16")
    calls.clear()
    est.step(_batch())
    assert calls == []
    per_sample = _make("empirical", "per_sample", model, lambda_dr=0.5 if dr else 0.0, accumulator_dtype="bfloat16")
    calls.clear()
    per_sample.step(_batch())
    assert True in calls


def test_empirical_non_finite_batch_is_refused_and_the_estimate_goes_on():
    """A NaN input gives non-finite gradients: refused, by weight name, before anything was folded, so the
    estimate continues and equals one that never saw that batch."""
    torch.manual_seed(0)
    model = BNNet()
    a, b = _make("empirical", "batch", model, seed=1), _make("empirical", "batch", model, seed=1)
    a.step(_batch(seed=0))
    b.step(_batch(seed=0))
    bad = _batch(seed=5)
    bad["pixel_values"][0, 0, 0, 0] = float("nan")
    with pytest.raises(FisherInputError, match="non-finite gradient for 'conv"):
        a.step(bad)
    a.step(_batch(seed=1))
    b.step(_batch(seed=1))
    ra, rb = a.result(), b.result()
    for n in _targets(model):
        assert torch.equal(ra.fisher_x[n], rb.fisher_x[n]) and torch.equal(ra.delta_f[n], rb.delta_f[n])


@pytest.mark.parametrize("kind", ["empirical", "variational"])
def test_per_sample_method_comes_from_the_config(kind):
    """FisherTuneConfig.per_sample_method (default 'loop': one sample's gradients at a time) and vmap_chunk_size
    reach the estimator; an explicit argument still wins."""
    import peft_fishertune as pf

    model = BNNet()
    cls = EmpiricalFisherEstimator if kind == "empirical" else VariationalFisherEstimator
    cfg = pf.FisherTuneConfig(target_modules=["conv1", "conv2"])
    assert cfg.per_sample_method == "loop" and cfg.vmap_chunk_size is None
    est = cls(model, cfg, _targets(model), mode="per_sample")
    est.step(_batch())
    assert est.result().metadata["per_sample_method"] == "loop"
    cfg = pf.FisherTuneConfig(target_modules=["conv1", "conv2"], per_sample_method="vmap", vmap_chunk_size=2)
    est = cls(model, cfg, _targets(model), mode="per_sample")
    assert est.vmap_chunk_size == 2
    est.step(_batch())
    assert est.result().metadata["per_sample_method"] == "vmap"
    assert cls(model, cfg, _targets(model), per_sample_method="loop").per_sample_method == "loop"


def test_empirical_streamed_step_on_a_transformers_model_with_its_own_loss():
    """The streamed empirical step on a model we did not write (transformers' Dinov2ForImageClassification,
    its own head and loss from `labels`): with float32 accumulators it equals the general path bit for bit,
    the DR term on; the model's parameters and buffers are untouched."""
    from transformers import Dinov2Config, Dinov2ForImageClassification

    torch.manual_seed(0)
    model = Dinov2ForImageClassification(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                      intermediate_size=64, patch_size=8, image_size=16,
                                                      num_labels=3))
    params = {n: p for n, p in model.named_parameters() if ".encoder." in n and n.endswith("weight") and p.dim() == 2}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    batches = [{"pixel_values": torch.randn(2, 3, 16, 16, generator=g), "labels": torch.randint(0, 3, (2,), generator=g)}
               for _ in range(3)]
    lean = EmpiricalFisherEstimator(model, params=params, mode="batch", seed=3, accumulator_dtype="float32")
    general = EmpiricalFisherEstimator(model, params=params, mode="batch", seed=3, accumulator_dtype="float32")
    assert lean.dr_on and len(params) == 12
    for b in batches:
        lean.step(b)
        EmpiricalFisherEstimator._step_general(general, [b])
        general.steps += 1
    ra, rb = lean.result(), general.result()
    for n in params:
        assert torch.equal(ra.fisher_x[n], rb.fisher_x[n]) and torch.equal(ra.delta_f[n], rb.delta_f[n])
        assert float(ra.fisher_x[n].sum()) > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def dinov2_seg():
    """A 2-block DINOv2 with a per-token linear head (seeded), its encoder's 2-D weights, and two batches."""
    from transformers import Dinov2Config, Dinov2Model

    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=64, patch_size=8, image_size=16))
            self.head = nn.Linear(32, 3)

        def forward(self, pixel_values, labels):
            h = self.backbone(pixel_values=pixel_values).last_hidden_state[:, 1:]
            return {"loss": F.cross_entropy(self.head(h).flatten(0, 1), labels.flatten())}

    torch.manual_seed(0)
    model = Seg().train()
    params = {n: p for n, p in model.named_parameters() if ".encoder." in n and n.endswith("weight") and p.dim() == 2}
    g = torch.Generator().manual_seed(0)
    batches = [{"pixel_values": torch.randn(2, 3, 16, 16, generator=g), "labels": torch.randint(0, 3, (2, 4), generator=g)}
               for _ in range(2)]
    return model, params, batches
