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
    return get_peft_model(vit, pf.FisherTuneConfig(init_selection="random", init_weights=False, **kwargs))


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
