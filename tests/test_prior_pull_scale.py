"""prior_pull_loss is never silently unscaled (issue 21, deliverable 5): it warns without a data size (num_samples
or FisherTuneConfig.data_scale), is quiet and N times weaker with one, and refuses a bad num_samples."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T
from peft import get_peft_model

import peft_fishertune as pf
from peft_fishertune.fisher import FisherInputError, prior_pull_loss


def _model(**kwargs):
    torch.manual_seed(0)
    vit = T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                  intermediate_size=64, image_size=32, patch_size=8, num_labels=3))
    return get_peft_model(vit, pf.FisherTuneConfig(**{"init_selection": "random", "init_weights": False, **kwargs}))


def test_prior_pull_loss_warns_without_a_data_size():
    model = _model()
    with pytest.warns(UserWarning, match=r"no data size.*scale 1.*num_samples=len\(train_dataset\)"):
        literal = float(prior_pull_loss(model).detach())
    assert literal > 0


def test_prior_pull_loss_with_num_samples_is_quiet_and_scaled():
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled = float(prior_pull_loss(model, num_samples=500).detach())
        literal = float(prior_pull_loss(model, num_samples=1).detach())  # the literal scale, asked for
    assert scaled == pytest.approx(literal / 500, rel=1e-5)


def test_prior_pull_loss_with_data_scale_is_quiet_and_scaled():
    model = _model(data_scale=250.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled = float(prior_pull_loss(model).detach())
        literal = float(prior_pull_loss(model, num_samples=1).detach())  # data_scale wins over num_samples
    assert scaled == pytest.approx(literal, rel=1e-6)
    unscaled = _model()
    with pytest.warns(UserWarning, match="no data size"):
        assert float(prior_pull_loss(unscaled).detach()) == pytest.approx(250.0 * scaled, rel=1e-5)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_prior_pull_loss_refuses_a_bad_num_samples(bad):
    with pytest.raises(FisherInputError, match=r"num_samples=.*training set's size"):
        prior_pull_loss(_model(), num_samples=bad)


def test_schedule_says_when_the_pull_is_strong():
    """κ = γ/(N·τ²) at the defaults: N = 200 (the DG benchmark) gives 0.5 and a note; N = 25,000 (GTA5) gives 0.004
    and none; prior_pull=False or a data_scale of the paper's size silences it."""
    with pytest.warns(UserWarning, match=r"prior pull is strong here: κ = γ/\(N·τ²\) = 0.5 .*N=200.*prior_pull=False"):
        pf.FisherTuneSchedule(_model(), stage1_steps=1, stage2_steps=1, stage3_steps=2, num_samples=200)
    for kwargs, n in (({}, 25_000), ({"prior_pull": False}, 200), ({"data_scale": 25_000.0}, 200)):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*prior pull is strong")
            pf.FisherTuneSchedule(_model(**kwargs), stage1_steps=1, stage2_steps=1, stage3_steps=2, num_samples=n)


def _layers(model):
    from peft_fishertune.tuner.layer import FisherTuneLayer

    return [m for m in model.modules() if isinstance(m, FisherTuneLayer) and m.num_candidates("default")]


def _pull_and_grads(model, reference: bool):
    """prior_pull_loss and the values' gradients; `reference`: κ/2·Σ of the gathered active values' squares, written
    out as tensor operations (the formula before the whole-tensor pull and its dot product)."""
    values = [m.ft_values["default"] for m in _layers(model)]
    for v in values:
        v.grad = None
    if reference:
        from peft_fishertune.fisher.scores import prior_pull_coefficient

        cfg = model.peft_config["default"]
        squares = sum(m.active_values("default").float().square().sum() for m in _layers(model)
                      if m.num_active("default"))
        loss = 0.5 * prior_pull_coefficient(cfg.gamma, cfg.tau, 50) * squares
    else:
        loss = prior_pull_loss(model, num_samples=50)
    loss.backward()
    return float(loss.detach()), [torch.zeros_like(v) if v.grad is None else v.grad.clone() for v in values]


def test_the_pull_over_every_value_is_the_pull_over_the_active_ones():
    """While the inactive candidates' values are zero (a growing stage 3), the pull sums the squares of the whole
    values tensor instead of gathering the active ones: the same loss to float rounding, the same gradient bit for
    bit (zero at every inactive candidate)."""
    from peft_fishertune.tuner.selection import set_active_fraction

    model = _model(delta_min=0.02, delta_max=0.1)  # init_weights=False: the active values are non-zero
    set_active_fraction(model, 0.05)
    layers = _layers(model)
    assert all(m._active("default")[1] is not None for m in layers)  # partly active: there is a gather to skip
    assert all(m.pulled_values("default") is m.ft_values["default"] for m in layers)
    loss, grads = _pull_and_grads(model, reference=False)
    ref_loss, ref_grads = _pull_and_grads(model, reference=True)
    assert loss == pytest.approx(ref_loss, rel=1e-6) and ref_loss > 0
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


def test_values_left_behind_by_a_shrinking_active_set_are_not_pulled():
    """Lowering the active fraction leaves learned, non-zero values outside the active set: those layers go back to
    the gathered pull, which neither counts nor pulls them (a pull over every value would: the gradient there would
    be κ·v). The same holds for values loaded that way from a state dict."""
    from peft_fishertune.tuner.selection import set_active_fraction

    model = _model(delta_min=0.02, delta_max=0.1)
    set_active_fraction(model, 0.02)  # the init's non-zero values at 10 % stay behind, now inactive
    layers = _layers(model)
    left = [m for m in layers if m._active("default")[1] is not None
            and bool(m.ft_values["default"].detach().count_nonzero() > m.num_active("default"))]
    assert left and all(not m._inactive_zero["default"] for m in left)
    loss, grads = _pull_and_grads(model, reference=False)
    ref_loss, ref_grads = _pull_and_grads(model, reference=True)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    for m, g in zip(layers, grads):  # no pull on an inactive value, whatever it holds
        inactive = torch.ones(g.numel(), dtype=torch.bool)
        inactive[m._active("default")[1].long()] = False
        assert not g[inactive].any()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = _model(delta_min=0.02, delta_max=0.1, init_weights=True)  # zeros everywhere: every layer pulls all
    assert all(m._inactive_zero["default"] for m in _layers(fresh))
    fresh.load_state_dict(state)
    assert [m._inactive_zero["default"] for m in _layers(fresh)] == [m._inactive_zero["default"] for m in layers]
    assert _pull_and_grads(fresh, reference=False)[0] == pytest.approx(ref_loss, rel=1e-6)
