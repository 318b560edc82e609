"""deltas_in_weights(): the active deltas written into the base weights once per training step instead of in every
forward and backward. Same numbers bit for bit, the base weights restored bit for bit on exit (an error too), tied
weights left alone, a change of the deltas inside refused, and FisherTuneTrainer's training identical with it on
and off."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import ViTConfig, ViTForImageClassification
from transformers.trainer_utils import set_seed

from peft_fishertune import FisherTuneConfig, FisherTuneTrainer
from peft_fishertune.tuner.layer import FisherTuneLayer
from peft_fishertune.tuner.sparse_delta import deltas_in_weights

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]


def _vit(delta=0.2):
    set_seed(0)
    base = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, image_size=16, patch_size=8, num_labels=3))
    cfg = FisherTuneConfig(target_modules=TARGETS, modules_to_save=["classifier"], init_selection="random",
                           delta_min=delta, delta_max=delta, init_weights=False)  # non-zero deltas
    return get_peft_model(base, cfg)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}


def _step(model, x, y):
    model.zero_grad(set_to_none=True)
    out = model(pixel_values=x, labels=y)
    out.loss.backward()
    return out.logits.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("delta", [0.05, 0.5])  # SDDMM and dense-dW backward on the CPU
def test_same_outputs_and_gradients_and_weights_restored(delta):
    model = _vit(delta)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 3, 16, 16, generator=g), torch.tensor([0, 1, 2])
    before = _weights(model)
    ref_logits, ref_grads = _step(model, x, y)
    with deltas_in_weights(model):
        layers = [m for m in model.modules() if isinstance(m, FisherTuneLayer)]
        assert layers and all(m._resident is not None for m in layers)
        assert any(not torch.equal(w, before[n]) for n, w in _weights(model).items())  # the deltas are in
        logits, grads = _step(model, x, y)
    assert torch.equal(logits, ref_logits)
    assert ref_grads.keys() == grads.keys() and any(".ft_values." in n for n in grads)
    for n in ref_grads:
        assert torch.equal(grads[n], ref_grads[n]), n
    after = _weights(model)
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert all(m._resident is None for m in layers)


def test_restored_after_an_error_and_a_changed_delta_refused():
    model = _vit()
    before = _weights(model)
    with pytest.raises(ValueError, match="boom"):
        with deltas_in_weights(model):
            raise ValueError("boom")
    assert all(torch.equal(w, before[n]) for n, w in _weights(model).items())
    x = torch.randn(2, 3, 16, 16)
    with deltas_in_weights(model):
        with torch.no_grad():
            next(m for m in model.modules() if isinstance(m, FisherTuneLayer)).ft_values["default"].add_(1.0)
        with pytest.raises(RuntimeError, match="the active deltas changed inside deltas_in_weights"):
            model(pixel_values=x)
    assert all(torch.equal(w, before[n]) for n, w in _weights(model).items())


def test_disabled_merged_and_disabled_adapters_keep_the_per_call_path():
    model = _vit()
    x = torch.randn(2, 3, 16, 16)
    layers = [m for m in model.modules() if isinstance(m, FisherTuneLayer)]
    with torch.no_grad():
        ref = model(pixel_values=x).logits
    with deltas_in_weights(model, enabled=False), torch.no_grad():
        assert all(m._resident is None for m in layers)
        assert torch.equal(model(pixel_values=x).logits, ref)
    with model.disable_adapter(), torch.no_grad():
        plain = model(pixel_values=x).logits
        with deltas_in_weights(model):  # disabled adapters: nothing written, the base model's output
            assert all(m._resident is None for m in layers)
            assert torch.equal(model(pixel_values=x).logits, plain)
    model.merge_adapter()
    with deltas_in_weights(model), torch.no_grad():  # merged: the deltas are in already, not written twice
        assert all(m._resident is None for m in layers)
        assert torch.allclose(model(pixel_values=x).logits, ref, atol=1e-5)
    model.unmerge_adapter()


def _train(tmp_path, resident):
    from test_any_model import args, vit

    model, data = vit()
    trainer = FisherTuneTrainer(model=model, args=args(tmp_path / str(resident), (1, 2, 4), deltas_in_weights=resident),
                                train_dataset=data)
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad or "ft_values" in n}, \
        _weights(model)


def test_trainer_trains_the_same_with_and_without(tmp_path):
    on, base_on = _train(tmp_path, True)
    off, base_off = _train(tmp_path, False)
    assert on.keys() == off.keys() and any("ft_values" in n for n in on)
    for n in on:
        assert torch.equal(on[n], off[n]), n
    assert any(on[n].abs().sum() > 0 for n in on if "ft_values" in n)
    for n in base_on:  # and the base weights are the pretrained ones after train()
        assert torch.equal(base_on[n], base_off[n]), n
