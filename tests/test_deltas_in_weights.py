"""deltas_in_weights(): the active deltas written into the base weights once per training step instead of in every
forward and backward. Same numbers bit for bit, the base weights restored bit for bit on exit (an error too), tied
weights left alone, a change of the deltas inside refused, and FisherTuneTrainer's training identical with it on
and off."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from peft import get_peft_model
from transformers import ViTConfig, ViTForImageClassification
from transformers.trainer_utils import set_seed

from peft_fishertune import FisherTuneConfig, FisherTuneTrainer
from peft_fishertune.tuner.layer import FisherTuneLayer
from peft_fishertune.tuner.sparse_delta import deltas_in_weights, kept_base_values

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]


def _vit(delta=0.2, delta_max=None):
    set_seed(0)
    base = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, image_size=16, patch_size=8, num_labels=3))
    cfg = FisherTuneConfig(target_modules=TARGETS, modules_to_save=["classifier"], init_selection="random",
                           delta_min=delta, delta_max=delta_max or delta, init_weights=False)  # non-zero deltas
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
    # the base values kept between steps are dropped when train() returns
    assert all(m._base_kept is None and not m._keep_base for m in model.modules() if isinstance(m, FisherTuneLayer))
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


# ---------------------------------------------------------------- base values kept between steps
def _train_loop(model, steps, kept, between=None):
    """`steps` SGD steps of a plain loop, each forward + backward inside deltas_in_weights; inside kept_base_values
    when `kept`. `between(step)` runs after each optimizer step. Returns the logits and value gradients per step."""
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(3, 3, 16, 16, generator=g), torch.tensor([0, 1, 2])) for _ in range(steps)]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    seen = []
    with kept_base_values(model) if kept else nullcontext():
        for i, (x, y) in enumerate(data):
            with deltas_in_weights(model):
                logits, grads = _step(model, x, y)
            seen.append((logits, {n: t for n, t in grads.items() if ".ft_values." in n}))
            opt.step()
            if between is not None:
                between(i)
    return seen


def _same(a, b):
    assert len(a) == len(b)
    for (la, ga), (lb, gb) in zip(a, b):
        assert torch.equal(la, lb)
        assert ga.keys() == gb.keys() and ga
        for n in ga:
            assert torch.equal(ga[n], gb[n]), n


@pytest.mark.parametrize("delta", [0.05, 0.5])
def test_kept_base_values_give_the_same_steps_and_are_reused_then_dropped(delta):
    ref_model, model = _vit(delta), _vit(delta)
    before = _weights(model)
    layers = [m for m in model.modules() if isinstance(m, FisherTuneLayer)]
    kept_objects = []

    def check(i):  # after each step: the base weights are the pretrained ones, the kept values still there
        assert all(torch.equal(w, before[n]) for n, w in _weights(model).items())
        assert all(m._base_kept is not None for m in layers)
        kept_objects.append([m._base_kept.base for m in layers])

    ref = _train_loop(ref_model, 4, kept=False)
    _same(_train_loop(model, 4, kept=True, between=check), ref)
    # read once at the first step, then reused (the same tensors), though the values changed at every step
    assert all(a is b for step in kept_objects[1:] for a, b in zip(step, kept_objects[0]))
    assert all(m._base_kept is None for m in layers)  # dropped on exit
    assert all(torch.equal(w, before[n]) for n, w in _weights(model).items())


def test_kept_base_values_are_read_anew_when_the_weights_or_the_active_set_change():
    from peft_fishertune.tuner.selection import set_active_fraction

    ref_model, model = _vit(0.1, 0.3), _vit(0.1, 0.3)  # a growing selection: candidates to 30 %, 10 % active
    first = next(m for m in model.modules() if isinstance(m, FisherTuneLayer))
    ref_first = next(m for m in ref_model.modules() if isinstance(m, FisherTuneLayer))
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(first.get_base_layer().weight.shape, generator=gen) * 0.01

    def change(mdl, lay, i):
        w = lay.get_base_layer().weight
        if i == 0:  # the active set grows: a new active-index tensor
            set_active_fraction(mdl, 0.2)
        elif i == 1:  # an in-place change the version counter sees (what load_state_dict does), at active entries
            # away from the first and last few that the spot check compares
            idx = lay.active_indices("default")
            mid = idx[idx.numel() // 2 - 2: idx.numel() // 2 + 2].long()
            with torch.no_grad():
                w.view(-1)[mid] += 0.25
        elif i == 2:  # behind the version counter: .data, caught by the spot check of the first and last entries
            w.data.copy_(w.data + noise)
        elif i == 3:  # a merge and unmerge drop them (W + d - d need not be W)
            mdl.merge_adapter()
            mdl.unmerge_adapter()

    ref = _train_loop(ref_model, 5, kept=False, between=lambda i: change(ref_model, ref_first, i))
    kept = []
    got = _train_loop(model, 5, kept=True, between=lambda i: (kept.append(first._base_kept), change(model, first, i)))
    _same(got, ref)
    assert kept[0] is not None and len({id(k) for k in kept}) == len(kept)  # a new read after each change
    assert all(torch.equal(a, b) for a, b in zip(_weights(model).values(), _weights(ref_model).values()))
    with kept_base_values(model):
        with deltas_in_weights(model):
            pass
        assert first._base_kept is not None
        model.merge_adapter()  # a merge (and an unmerge) drops them: the weight changes through .data
        assert first._base_kept is None
        model.unmerge_adapter()


def test_kept_base_values_need_one_adapter_and_bf16_weights_match_bit_for_bit():
    model = _vit(0.5)
    model.add_adapter("other", FisherTuneConfig(target_modules=TARGETS, init_selection="random", delta_min=0.5,
                                                 delta_max=0.5, init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    layers = [m for m in model.modules() if isinstance(m, FisherTuneLayer)]
    before = _weights(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(pixel_values=x).logits
    with kept_base_values(model):
        for _ in range(2):
            with deltas_in_weights(model), torch.no_grad():
                assert torch.equal(model(pixel_values=x).logits, ref)
            assert all(m._base_kept is None for m in layers)  # two active adapters: read at every step
    assert all(torch.equal(w, before[n]) for n, w in _weights(model).items())

    bf = _vit(0.5).to(torch.bfloat16)
    bf_layers = [m for m in bf.modules() if isinstance(m, FisherTuneLayer)]
    xb = x.to(torch.bfloat16)
    with torch.no_grad():
        with kept_base_values(bf):
            for _ in range(3):
                ref = bf(pixel_values=xb).logits  # the per-call path
                with deltas_in_weights(bf):
                    assert torch.equal(bf(pixel_values=xb).logits, ref)
                    merged = {n: w.clone() for n, w in _weights(bf).items()}
                for m in bf_layers:  # the write of a reused read: base + v in bf16, as index_add_ computes it
                    w = m.get_base_layer().weight.detach().reshape(-1).clone()
                    w.index_add_(0, m.active_indices("default"), m.active_values("default").detach().to(w.dtype))
                    name = next(n for n in merged if n.startswith(m.ft_key) or m.ft_key in n)
                    assert torch.equal(merged[name].reshape(-1), w), name
                for m in bf_layers:
                    m.ft_values["default"].mul_(1.5)
            assert all(m._base_kept is not None for m in bf_layers)


# ---------------------------------------------------------------- a shared layer, a second backward
class _Twice(torch.nn.Module):
    """One Linear called twice in a forward (a shared layer), and one called once."""

    def __init__(self):
        super().__init__()
        self.shared, self.head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


@pytest.mark.parametrize("delta", [0.05, 0.5])
def test_a_layer_called_twice_and_a_second_backward_give_the_per_call_gradients(delta):
    torch.manual_seed(0)
    base = _Twice()
    model = get_peft_model(base, FisherTuneConfig(target_modules=["shared", "head"], init_selection="random",
                                                  delta_min=delta, delta_max=delta, init_weights=False))
    before = _weights(model)
    x = torch.randn(5, 16)

    def grads(resident):
        model.zero_grad(set_to_none=True)
        with deltas_in_weights(model, enabled=resident):
            out = model(x)
            out.pow(2).sum().backward(retain_graph=True)  # the shared layer's two backwards read the same weight
            out.sum().backward()  # a second backward through the same graph
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_out, ref = grads(False)
    out, got = grads(True)
    assert torch.equal(out, ref_out)
    assert ref.keys() == got.keys() and any("ft_values" in n for n in ref)
    for n in ref:
        assert torch.equal(got[n], ref[n]), n
    assert all(torch.equal(w, before[n]) for n, w in _weights(model).items())
