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


def _vit_growing():
    """Candidates at 40 %, a quarter of them active: the write gathers the deltas at their positions."""
    set_seed(0)
    base = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, image_size=16, patch_size=8, num_labels=3))
    return get_peft_model(base, FisherTuneConfig(target_modules=TARGETS, init_selection="random", delta_min=0.1,
                                                 delta_max=0.4, init_weights=False))


@pytest.mark.parametrize("make", [_vit, _vit_growing], ids=["all_active", "part_active"])
def test_compiled_writes_equal_the_index_operations_bit_for_bit(monkeypatch, make):
    """The compiled write and restore (sparse_delta._WRITES, used on the CPU from WRITE_COMPILE_MIN_ELEMENTS active
    elements) against the eager index_select / index_add_ / index_put_: the weights inside the step, the logits and
    every gradient equal bit for bit, and the base weights restored bit for bit."""
    from peft_fishertune.tuner import sparse_delta

    model = make()
    layers = [m for m in model.modules() if isinstance(m, FisherTuneLayer)]
    partial = [m._active("default")[1] is not None for m in layers]
    assert all(partial) if make is _vit_growing else not any(partial)
    monkeypatch.setattr(sparse_delta, "_WRITES", sparse_delta._WRITES.fresh())
    monkeypatch.setattr(sparse_delta, "WRITE_COMPILE_MIN_ELEMENTS", 1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 3, 16, 16, generator=g), torch.tensor([0, 1, 2])
    before = _weights(model)
    runs = {}
    for compiled in (False, True):
        monkeypatch.setattr(sparse_delta, "COMPILED_WRITES", compiled)
        with deltas_in_weights(model):
            inside = _weights(model)
            runs[compiled] = (inside, *_step(model, x, y))
        assert all(torch.equal(w, before[n]) for n, w in _weights(model).items())
    kernel = "write_at" if make is _vit_growing else "write_all"
    assert sparse_delta._WRITES.is_compiled(kernel) and sparse_delta._WRITES.is_compiled("put")
    assert sparse_delta._WRITES.failed is None, sparse_delta._WRITES.failed
    (w_e, logits_e, grads_e), (w_c, logits_c, grads_c) = runs[False], runs[True]
    assert any(not torch.equal(w_e[n], before[n]) for n in before)  # the deltas were in
    assert all(torch.equal(w_c[n], w_e[n]) for n in w_e)
    assert torch.equal(logits_c, logits_e)
    assert grads_c.keys() == grads_e.keys() and all(torch.equal(grads_c[n], grads_e[n]) for n in grads_e)


def test_a_failing_write_compile_is_logged_once_and_the_index_operations_run(monkeypatch, caplog):
    from peft_fishertune.tuner import sparse_delta

    def broken_compile(*args, **kwargs):
        def run(*a):
            raise RuntimeError("no C++ compiler found")
        return run

    model = _vit()
    monkeypatch.setattr(sparse_delta, "_WRITES", sparse_delta._WRITES.fresh())
    monkeypatch.setattr(sparse_delta, "WRITE_COMPILE_MIN_ELEMENTS", 1)
    monkeypatch.setattr(torch, "compile", broken_compile)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    before = _weights(model)
    with torch.no_grad():
        ref = model(pixel_values=x).logits  # the per-call path (its own write and restore)
    with caplog.at_level("WARNING", logger="peft_fishertune.tuner"):
        for _ in range(2):
            with deltas_in_weights(model), torch.no_grad():
                assert torch.equal(model(pixel_values=x).logits, ref)
            assert all(torch.equal(w, before[n]) for n, w in _weights(model).items())
    assert "no C++ compiler found" in sparse_delta._WRITES.failed
    warned = [r.getMessage() for r in caplog.records if "delta write kernels failed" in r.getMessage()]
    assert len(warned) == 1 and "index_put_ run instead" in warned[0]


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
