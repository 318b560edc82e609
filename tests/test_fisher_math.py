"""Empirical Fisher against closed forms; perturbation; bad input."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_fishertune.fisher import (
    EmpiricalFisherEstimator,
    FeaturePerturbation,
    estimate_fisher,
    perturb_features,
)
from peft_fishertune.fisher.perturbation import draw

# Tolerances: fp32 sums of a few hundred terms; closed forms computed in float64.
RTOL, ATOL = 1e-5, 1e-8


class SoftmaxRegression(nn.Module):
    def __init__(self, d=5, k=3):
        super().__init__()
        self.linear = nn.Linear(d, k)

    def forward(self, pixel_values, labels=None, **unused):
        logits = self.linear(pixel_values)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def _data(n_batches=4, b=6, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"pixel_values": torch.randn(b, d, generator=g), "labels": torch.randint(0, k, (b,), generator=g)}
        for _ in range(n_batches)
    ]


def _closed_form_per_sample(model, batches):
    """mean_i ((p_i − y_i) x_iᵀ)² and mean_i (p_i − y_i)² (bias), in float64."""
    w, b = model.linear.weight.double(), model.linear.bias.double()
    xs = torch.cat([bt["pixel_values"] for bt in batches]).double()
    ys = torch.cat([bt["labels"] for bt in batches])
    r = torch.softmax(xs @ w.T + b, -1) - F.one_hot(ys, w.shape[0]).double()  # (N, K)
    gw = r[:, :, None] * xs[:, None, :]  # (N, K, D)
    return {"linear.weight": gw.square().mean(0), "linear.bias": r.square().mean(0)}


def _closed_form_batch(model, batches):
    w, b = model.linear.weight.double(), model.linear.bias.double()
    out_w, out_b = 0, 0
    for bt in batches:
        x = bt["pixel_values"].double()
        r = torch.softmax(x @ w.T + b, -1) - F.one_hot(bt["labels"], w.shape[0]).double()
        out_w = out_w + (r.T @ x / len(x)).square()
        out_b = out_b + r.mean(0).square()
    return {"linear.weight": out_w / len(batches), "linear.bias": out_b / len(batches)}


def _params(model):
    return dict(model.named_parameters())


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_per_sample_fisher_equals_closed_form(method):
    torch.manual_seed(0)
    model = SoftmaxRegression()
    batches = _data()
    est = EmpiricalFisherEstimator(model, params=_params(model), mode="per_sample", perturb=False,
                                   per_sample_method=method)
    for bt in batches:
        est.step(bt)
    res = est.result()
    assert res.metadata["per_sample_method"] == method
    assert res.num_samples == 24
    expected = _closed_form_per_sample(model, batches)
    for name, value in expected.items():
        torch.testing.assert_close(res.fisher_x[name].double(), value, rtol=RTOL, atol=ATOL)
    # the per-sample Fisher is not the batch proxy on this data (the test can tell them apart)
    proxy = _closed_form_batch(model, batches)["linear.weight"]
    assert not torch.allclose(proxy, expected["linear.weight"], rtol=0.1)


def test_batch_mode_is_squared_mean_gradient():
    torch.manual_seed(1)
    model = SoftmaxRegression()
    batches = _data(seed=3)
    fisher = estimate_fisher(model, batches, mode="batch", params=_params(model), progress=False)
    for name, value in _closed_form_batch(model, batches).items():
        torch.testing.assert_close(fisher[name].double(), value, rtol=RTOL, atol=ATOL)


def test_loss_fn_and_max_batches():
    torch.manual_seed(2)
    model = SoftmaxRegression()
    batches = _data(n_batches=5, seed=4)
    fisher = estimate_fisher(
        model, [{"pixel_values": b["pixel_values"], "y": b["labels"]} for b in batches],
        loss_fn=lambda out, batch: F.cross_entropy(out["logits"], batch["y"]),
        params=_params(model), max_batches=2, progress=False,
    )
    for name, value in _closed_form_per_sample(model, batches[:2]).items():
        torch.testing.assert_close(fisher[name].double(), value, rtol=RTOL, atol=ATOL)


def test_auto_uses_vmap_and_says_why():
    model = SoftmaxRegression()
    est = EmpiricalFisherEstimator(model, params=_params(model), perturb=False)
    est.step(_data(n_batches=1)[0])
    meta = est.result().metadata
    assert meta["per_sample_method"] == "vmap" and "vmap" in meta["per_sample_method_reason"]
    assert meta["per_sample_fallback_reason"] is None


def test_model_state_untouched():
    model = SoftmaxRegression()
    model.linear.weight.requires_grad_(False)  # like a PEFT base weight
    sentinel = torch.full_like(model.linear.bias, 7.0)
    model.linear.bias.grad = sentinel.clone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    estimate_fisher(model, _data(), params=_params(model), progress=False)
    estimate_fisher(model, _data(), params=_params(model), mode="batch", progress=False)
    assert model.linear.weight.requires_grad is False and model.linear.weight.grad is None
    assert model.linear.bias.requires_grad is True
    torch.testing.assert_close(model.linear.bias.grad, sentinel)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class CheckingModel(SoftmaxRegression):
    """Validates labels with Python control flow on tensor values: vmap cannot run that."""

    def forward(self, pixel_values, labels=None, **unused):
        if bool((labels < 0).any()):
            raise RuntimeError("negative label")
        return super().forward(pixel_values, labels)


def test_vmap_fallback_is_logged_and_recorded(caplog):
    model = CheckingModel()
    batches = _data(n_batches=1)
    params = {"linear.weight": model.linear.weight}
    with pytest.raises(Exception):
        EmpiricalFisherEstimator(model, params=params, perturb=False, per_sample_method="vmap").step(batches[0])
    with caplog.at_level(logging.INFO, logger="peft_fishertune.fisher"):
        est = EmpiricalFisherEstimator(model, params=params, perturb=False, per_sample_method="auto")
        est.step(batches[0])
    res = est.result()
    assert res.metadata["per_sample_method"] == "loop"
    assert res.metadata["per_sample_fallback_reason"]
    assert any("using a loop" in r.getMessage() for r in caplog.records)
    expected = _closed_form_per_sample(model, batches)["linear.weight"]
    torch.testing.assert_close(res.fisher_x["linear.weight"].double(), expected, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------ bad input
def test_empty_data_raises():
    model = SoftmaxRegression()
    with pytest.raises(ValueError, match="batches is empty"):
        estimate_fisher(model, [], params=_params(model), progress=False)
    with pytest.raises(ValueError, match="batch size 0"):
        estimate_fisher(model, [{"pixel_values": torch.zeros(0, 5), "labels": torch.zeros(0, dtype=torch.long)}],
                        params=_params(model), progress=False)
    with pytest.raises(ValueError, match="params is empty"):
        estimate_fisher(model, _data(), params={}, progress=False)


@pytest.mark.parametrize("mode", ["per_sample", "batch"])
def test_batch_without_loss_raises(mode):
    model = SoftmaxRegression()
    with pytest.raises(ValueError, match="produced no loss"):
        estimate_fisher(model, [{"pixel_values": torch.randn(3, 5)}], params=_params(model), mode=mode,
                        progress=False)


@pytest.mark.parametrize("mode", ["per_sample", "batch"])
def test_nan_gradient_raises(mode):
    model = SoftmaxRegression()
    x = torch.randn(3, 5)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite gradient for 'linear"):
        estimate_fisher(model, [{"pixel_values": x, "labels": torch.tensor([0, 1, 2])}], params=_params(model),
                        mode=mode, progress=False)


def test_bad_arguments_raise():
    model = SoftmaxRegression()
    with pytest.raises(ValueError, match="mode='diag'"):
        estimate_fisher(model, _data(), params=_params(model), mode="diag")
    with pytest.raises(ValueError, match="per_sample_method='fast'"):
        estimate_fisher(model, _data(), params=_params(model), per_sample_method="fast")
    with pytest.raises(ValueError, match="not a parameter of the model"):
        estimate_fisher(model, _data(), params={"w": nn.Parameter(torch.zeros(3))})


# ------------------------------------------------------------------ perturbation
def test_perturbation_statistics_and_weight():
    x = torch.randn(4, 3, 8, 8) * 2 + 1
    d = draw(3, seed=5, index=2)
    d2 = draw(3, seed=5, index=2)
    assert torch.equal(d.eps_mu, d2.eps_mu) and torch.equal(d.eps_sigma, d2.eps_sigma)
    assert not torch.equal(draw(3, seed=5, index=3).eps_mu, d.eps_mu)
    xp = perturb_features(x, d.eps_mu, d.eps_sigma)
    mu, sd = x.mean((2, 3)), x.var((2, 3), correction=0).add(1e-6).sqrt()
    s_mu, s_sd = mu.std(0, correction=0), sd.std(0, correction=0)
    torch.testing.assert_close(xp.mean((2, 3)), mu + d.eps_mu * s_mu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xp.var((2, 3), correction=0).add(1e-6).sqrt(),
                               (sd + d.eps_sigma * s_sd).clamp_min(1e-6), rtol=1e-3, atol=1e-4)
    w = torch.exp(-(d.eps_mu.abs() + d.eps_sigma.abs())).mean()
    assert d.weight == pytest.approx(float(w)) and 0 < d.weight <= 1
    assert perturb_features(x, d.eps_mu, d.eps_sigma, strength=0.0) is x


def test_perturbation_disabled_is_identity_and_hook_reproducible():
    model = SoftmaxRegression()
    batch = {"pixel_values": torch.randn(4, 2, 5)}  # tokens (B, N, C): the hook perturbs logits per channel
    off = FeaturePerturbation(seed=0, strength=0.0)
    with off.applied(model, batch, 0) as (bp, d):
        assert bp is batch and d is None
    outs = []
    for _ in range(2):
        pert = FeaturePerturbation(seed=3, perturb_at="linear")
        with pert.applied(model, batch, 7) as (bp, d):
            outs.append(model(**bp)["logits"].detach())
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], model(**batch)["logits"])
    assert not model.linear._forward_hooks  # hooks removed
    with pytest.raises(ValueError, match="perturb_at='nope'"):
        with FeaturePerturbation(perturb_at="nope").applied(model, batch, 0):
            pass
