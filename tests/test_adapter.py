"""The FisherTune adapter under PEFT's shared checks (in the manner of peft's tests/test_custom_models.py).

One case table of tiny models; every check runs on every case.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import warnings

import pytest
import torch
import transformers as T
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import _get_in_out_features
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Dinov2Config, Dinov2Model

import peft_fishertune as pf
from peft_fishertune.tuner.layer import FisherTuneLayer
from peft_fishertune.tuner.storage import encoded_sizes


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(12, 24)
        self.norm = nn.LayerNorm(24)
        self.lin1 = nn.Linear(24, 24)
        self.lin2 = nn.Linear(24, 24)  # same shape as lin1: masks must differ
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        h = torch.relu(self.lin0(x))
        h = torch.relu(self.lin1(self.norm(h)))
        return self.head(torch.relu(self.lin2(h)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.conv1(torch.relu(self.conv0(x))))
        return self.lin(h.mean((2, 3)))


class EmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.lin = nn.Linear(16, 5)

    def forward(self, x):
        return self.lin(self.emb(x).mean(1))


class TinyViT(nn.Module):
    """A Dinov2 encoder from a small config with a linear head (what the segmentation models wrap)."""

    def __init__(self):
        super().__init__()
        cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=28, patch_size=7, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        self.backbone = Dinov2Model(cfg)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.backbone(pixel_values=x).last_hidden_state)


class HF(nn.Module):
    """A transformers model built from a tiny config, called with one tensor, returning one output tensor."""

    def __init__(self, build, input_name, output):
        super().__init__()
        self.model = build()
        self.input_name, self.output = input_name, output

    def forward(self, x):
        return getattr(self.model(**{self.input_name: x}), self.output)


def _hf(build, input_name="pixel_values", output="logits"):
    return functools.partial(HF, build, input_name, output)


_NO_DROP = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
HF_VIT = _hf(lambda: T.ViTForImageClassification(T.ViTConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=7,
    num_labels=3, **_NO_DROP)))
HF_DINOV2 = _hf(lambda: T.Dinov2ForImageClassification(T.Dinov2Config(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=7,
    num_labels=3, **_NO_DROP)))
HF_SEGFORMER = _hf(lambda: T.SegformerForSemanticSegmentation(T.SegformerConfig(
    num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3], strides=[4, 2],
    num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=3, drop_path_rate=0.0,
    classifier_dropout_prob=0.0, initializer_range=0.2, **_NO_DROP)))
HF_CLIP = _hf(lambda: T.CLIPVisionModel(T.CLIPVisionConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=7)),
    output="last_hidden_state")
HF_SAM = _hf(lambda: T.SamVisionModel(T.SamVisionConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64, image_size=32, patch_size=8,
    output_channels=16, window_size=2, global_attn_indexes=[1], num_pos_feats=8, initializer_range=0.02)),
    output="last_hidden_state")
HF_BERT = _hf(lambda: T.BertForSequenceClassification(T.BertConfig(
    vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    max_position_embeddings=16, num_labels=3, initializer_range=0.2, **_NO_DROP)), input_name="input_ids")
HF_GPT2 = _hf(lambda: T.GPT2LMHeadModel(T.GPT2Config(
    vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    bos_token_id=0, eos_token_id=0)), input_name="input_ids")
HF_M2F = _hf(lambda: T.Mask2FormerForUniversalSegmentation(T.Mask2FormerConfig(
    backbone_config=T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                                 window_size=2, drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"],
                                 initializer_range=0.2),
    feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32, dim_feedforward=32,
    encoder_layers=1, decoder_layers=2, num_queries=5, num_attention_heads=2, num_labels=3, dropout=0.0)),
    output="masks_queries_logits")


def _inputs(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return torch.randn(5, 12, generator=g)
    if kind == "conv":
        return torch.randn(2, 3, 8, 8, generator=g)
    if kind == "emb":
        return torch.randint(0, 30, (4, 6), generator=g)
    if kind == "ids":
        return torch.randint(0, 50, (2, 8), generator=g)
    if kind == "img32":
        return torch.randn(2, 3, 32, 32, generator=g)
    return torch.randn(2, 3, 28, 28, generator=g)


# (name, model factory, input kind, config kwargs)
TEST_CASES = [
    ("mlp-linear", MLP, "mlp", {"target_modules": ["lin0", "lin1", "lin2"]}),
    ("mlp-linear+layernorm", MLP, "mlp", {"target_modules": ["lin0", "lin1", "norm"]}),
    ("mlp-per-tensor", MLP, "mlp", {"target_modules": ["lin0", "lin1", "lin2"], "scope": "per_tensor"}),
    ("mlp-index-encoding", MLP, "mlp", {"target_modules": ["lin1"], "encoding": "index", "delta_min": 0.01, "delta_max": 0.02}),
    ("conv", ConvNet, "conv", {"target_modules": ["conv0", "conv1", "lin"]}),
    ("embedding", EmbedNet, "emb", {"target_modules": ["emb", "lin"]}),
    ("vit", TinyViT, "vit", {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "projection",
                                                "norm1", "norm2"], "modules_to_save": ["head"]}),
    ("vit-regex", TinyViT, "vit", {"target_modules": r".*layer\.\d+\.(attention\.(q_proj|v_proj)|mlp\.fc1)"}),
    # transformers models from tiny configs (a larger initializer_range where attention would otherwise be uniform, so
    # that a query delta visibly changes the output)
    ("hf-vit", HF_VIT, "vit", {"target_modules": ["q_proj", "v_proj", "fc1", "layernorm_before", "projection"],
                               "modules_to_save": ["classifier"]}),
    ("hf-dinov2", HF_DINOV2, "vit", {"target_modules": ["q_proj", "o_proj", "fc2", "norm1"], "modules_to_save": ["classifier"]}),
    ("hf-segformer", HF_SEGFORMER, "img32", {"target_modules": ["q_proj", "fc1", "proj", "layer_norm"]}),
    ("hf-clip-vision", HF_CLIP, "vit", {"target_modules": ["q_proj", "out_proj", "position_embedding", "layer_norm1"]}),
    ("hf-sam-vision", HF_SAM, "img32", {"target_modules": r".*layers\.\d+\.(attn\.qkv|mlp\.lin1|layer_norm1)"}),
    ("hf-bert", HF_BERT, "ids", {"target_modules": ["query", "value", "word_embeddings", "LayerNorm"],
                                 "modules_to_save": ["classifier"]}),
    # GPT-2's attention and MLP are transformers' Conv1D, which FisherTune does not wrap (see docs/notes/tuner.md)
    ("hf-gpt2", HF_GPT2, "ids", {"target_modules": ["wpe", "ln_1", "ln_2", "ln_f"]}),
    ("hf-mask2former-swin", HF_M2F, "img32",
     # (stage 4 sees one token at 32x32: its attention query cannot act, so it is left out)
     {"target_modules": r".*pixel_level_module\.encoder\..*layers\.[0-2]\..*\.(q_proj|v_proj|fc1|layernorm_before)"}),
]


def _make(factory, kwargs, *, init_weights=False, selection="random", seed=0, **extra):
    torch.manual_seed(seed)
    model = factory()
    cfg = pf.FisherTuneConfig(**{"delta_min": 0.2, "delta_max": 0.4, **kwargs, **extra},
                              init_selection=selection, init_weights=init_weights)
    return model, cfg


def _peft(factory, kwargs, **kw):
    model, cfg = _make(factory, kwargs, **kw)
    base = copy.deepcopy(model)
    return base, get_peft_model(model, cfg)


cases = pytest.mark.parametrize("name,factory,kind,kwargs", TEST_CASES, ids=[c[0] for c in TEST_CASES])


@cases
def test_adapter_changes_output_and_disable_restores_base(name, factory, kind, kwargs):
    base, model = _peft(factory, kwargs)
    x = _inputs(kind)
    model.eval(), base.eval()
    with torch.no_grad():
        expected = base(x)
        out = model(x)
        assert not torch.allclose(out, expected, atol=1e-6), "init_weights=False must change outputs"
        with model.disable_adapter():
            assert torch.allclose(model(x), expected, atol=1e-6, rtol=1e-5)
        assert torch.allclose(model(x), out, atol=1e-6, rtol=1e-5)


@cases
def test_save_load_gives_identical_outputs(name, factory, kind, kwargs, tmp_path):
    _, model = _peft(factory, kwargs)
    x = _inputs(kind)
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "FISHERTUNE"
    state = {k: v for k, v in model.state_dict().items() if ".ft_" in k}
    assert state
    for low_cpu in (False, True):
        fresh, _ = _make(factory, kwargs)
        loaded = PeftModel.from_pretrained(fresh, tmp_path, low_cpu_mem_usage=low_cpu)
        loaded.eval()
        with torch.no_grad():
            assert torch.allclose(loaded(x), out, atol=1e-6), f"low_cpu_mem_usage={low_cpu}"
        assert pf.selection_summary(loaded).num_active == pf.selection_summary(model).num_active
        # PEFT's generic check: the adapter state round-trips exactly (a partly grown selection included)
        again = {k: v for k, v in loaded.state_dict().items() if ".ft_" in k}
        assert again.keys() == state.keys()
        fully_grown = all(m.num_active("default") == m.num_candidates("default") for m in _layers_of(model))
        for k, v in state.items():
            if fully_grown and (".ft_rank." in k or ".ft_threshold." in k):
                continue  # a fully grown file is compact: a fixed selection (ranks -1), see the test below
            assert again[k].dtype == v.dtype and torch.equal(again[k], v), f"{k} (low_cpu_mem_usage={low_cpu})"
        assert all(t.device.type != "meta" for t in loaded.state_dict().values())


@cases
def test_merge_unmerge_and_merge_and_unload_equal_unmerged(name, factory, kind, kwargs):
    base, model = _peft(factory, kwargs)
    x = _inputs(kind)
    model.eval()
    with torch.no_grad():
        out = model(x)
        model.merge_adapter()
        assert torch.allclose(model(x), out, atol=1e-5, rtol=1e-4)
        model.unmerge_adapter()
        assert torch.allclose(model(x), out, atol=1e-5, rtol=1e-4)
        with model.disable_adapter():
            assert torch.allclose(model(x), base.eval()(x), atol=1e-5, rtol=1e-4)
        merged = copy.deepcopy(model).merge_and_unload(safe_merge=True)
        assert not any(isinstance(m, FisherTuneLayer) for m in merged.modules())
        assert torch.allclose(merged(x), out, atol=1e-5, rtol=1e-4)
        unloaded = copy.deepcopy(model).unload()  # merge + unmerge above leave float rounding in the base weights
        assert torch.allclose(unloaded(x), base(x), atol=1e-5, rtol=1e-4)


@cases
def test_only_candidates_train_and_base_weights_never_change(name, factory, kind, kwargs):
    _, model = _peft(factory, kwargs, init_weights=True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    adapter = {n for n in trainable if ".ft_values." in n}
    assert adapter, "the adapter must have trainable values"
    assert set(trainable) - adapter == {n for n in trainable if "modules_to_save" in n}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    layers = [m for m in model.modules() if isinstance(m, FisherTuneLayer)]
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.1)
    x = _inputs(kind)
    for step in range(3):
        opt.zero_grad()
        out = model(x)
        out.float().pow(2).mean().backward()
        for layer in layers:
            g, active = layer.ft_values["default"].grad, _active_mask(layer)
            assert g is not None and g.shape == layer.ft_values["default"].shape
            assert torch.count_nonzero(g[~active]) == 0, "inactive candidates must get exact zero gradients"
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} changed"
    for layer in layers:
        v, active = layer.ft_values["default"], _active_mask(layer)
        assert torch.count_nonzero(v[~active]) == 0, "AdamW (incl. weight decay) must not move inactive candidates"
    assert sum(int(torch.count_nonzero(m.ft_values["default"])) for m in layers) > 0, "active elements must train"


@cases
def test_sparse_gradient_matches_dense_autograd(name, factory, kind, kwargs):
    """d loss / d values == the dense weight gradient of the merged model, sampled at the active entries."""
    _, model = _peft(factory, kwargs)
    x = _inputs(kind)
    model(x).float().pow(2).sum().backward()
    merged = copy.deepcopy(model).merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    merged(x).float().pow(2).sum().backward()
    params = dict(merged.named_parameters())
    for layer in (m for m in model.modules() if isinstance(m, FisherTuneLayer)):
        dense = params[_merged_name(model, layer)].grad.reshape(-1)
        active = _active_mask(layer)
        expected = dense[layer.ft_indices["default"][active].long()]
        # atol 5e-5: the sparse and dense paths sum in different orders (on one CPU thread a deep Swin differs by ~1.6e-5)
        assert torch.allclose(layer.ft_values["default"].grad[active], expected, atol=5e-5, rtol=1e-4), layer.ft_key


@cases
def test_layers_expose_in_and_out_features(name, factory, kind, kwargs):
    _, model = _peft(factory, kwargs)
    layers = _layers_of(model)
    assert layers
    for layer in layers:
        base = layer.get_base_layer()
        if isinstance(base, nn.LayerNorm):  # PEFT's helper does not know LayerNorm (it warns)
            expected = (base.weight.numel(), base.weight.numel())
        else:
            expected = _get_in_out_features(base)
        assert (layer.in_features, layer.out_features) == expected, layer.ft_key
        assert layer.weight is base.weight  # BaseTunerLayer.weight, read by PEFT utilities


@cases
def test_model_with_nothing_active_trains_and_says_so(name, factory, kind, kwargs):
    """Before select_parameters (and where delta_min rounds to no element) backward works; the model warns."""
    _, model = _peft(factory, kwargs, selection="none", init_weights=True)
    model.train()
    x = _inputs(kind)
    with pytest.warns(UserWarning, match="no active element in any layer"):
        out = model(x)
    out.float().pow(2).mean().backward()
    for layer in _layers_of(model):
        g = layer.ft_values["default"].grad
        assert g is not None and g.numel() == 0
    assert model.get_nb_trainable_parameters()[0] == sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and ".ft_values." not in n)


@cases
def test_init_weights_false_changes_the_output_of_every_targeted_layer(name, factory, kind, kwargs):
    """PEFT's non-identity init, at delta_min = 1 % (where tiny layers round to no element). Visible: more than
    1e-3 (PEFT's tolerance on its tiny models) relative to the output's mean magnitude."""
    base, model = _peft(factory, kwargs, delta_min=0.01, delta_max=0.15)
    x = _inputs(kind)
    model.eval(), base.eval()
    layers = _layers_of(model)
    with torch.no_grad():
        expected = base(x)
        tol = 1e-3 * float(expected.abs().mean())
        saved = {id(m): m.ft_values["default"].detach().clone() for m in layers}
        for layer in layers:
            for m in layers:  # only `layer` keeps its deltas
                m.ft_values["default"].copy_(saved[id(m)] if m is layer else torch.zeros_like(saved[id(m)]))
            assert not torch.allclose(model(x), expected, atol=tol, rtol=0), f"{layer.ft_key} did not change the output"
        for m in layers:
            m.ft_values["default"].copy_(saved[id(m)])


@cases
def test_trainable_count_is_the_active_elements(name, factory, kind, kwargs, capsys):
    _, model = _peft(factory, kwargs)
    active = sum(m.num_active("default") for m in _layers_of(model))
    candidates = sum(m.num_candidates("default") for m in _layers_of(model))
    others = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".ft_values." not in n)
    assert 0 < active <= candidates
    assert model.get_nb_trainable_parameters()[0] == active + others
    model.print_trainable_parameters()
    assert f"trainable params: {active + others:,d} (FisherTune: {active:,d} active of {candidates:,d} candidates)" \
        in capsys.readouterr().out


def test_all_params_is_the_base_plus_the_active_values(capsys):
    """Issue 21 (9): "all params" = the base model's count + what PEFT adds for modules_to_save + the active
    FisherTune values; it used to grow by the whole candidate list at selection."""
    torch.manual_seed(0)
    vit = T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                  intermediate_size=64, image_size=32, patch_size=8, num_labels=3))
    base = sum(p.numel() for p in vit.parameters())
    head = sum(p.numel() for p in vit.classifier.parameters())
    model = get_peft_model(vit, pf.FisherTuneConfig(modules_to_save=["classifier"]))
    layers = _layers_of(model)

    def check():
        active = sum(m.num_active("default") for m in layers)
        trainable, total = model.get_nb_trainable_parameters()
        assert (trainable, total) == (head + active, base + head + active)
        model.print_trainable_parameters()
        assert f"all params: {base + head + active:,d} ||" in capsys.readouterr().out
        return active

    assert check() == 0  # before selection
    scores = {n: torch.rand_like(p) for n, p in pf.target_parameters(model)}
    pf.select_parameters(model, scores, delta_min=0.01, delta_max=0.15)
    candidates = sum(m.num_candidates("default") for m in layers)
    assert 0 < check() < candidates  # after selection: the candidates are not counted
    pf.set_active_fraction(model, 0.15)
    assert check() == candidates  # fully grown


def _active_mask(layer, adapter="default"):
    return layer.ft_rank[adapter] < layer.ft_threshold[adapter]


def _merged_name(model, layer):
    names = {n: p for n, p in pf.target_parameters(model)}
    for n, p in names.items():
        if p is layer.get_base_layer().weight:
            return n.replace("modules_to_save.default.", "")
    raise AssertionError(layer.ft_key)


def test_target_parameter_names_match_the_unwrapped_state_dict():
    torch.manual_seed(0)
    plain = TinyViT()
    model = get_peft_model(copy.deepcopy(plain), pf.FisherTuneConfig(target_modules=["q_proj", "fc1"]))
    names = [n for n, _ in pf.target_parameters(model)]
    assert len(names) == 4 and set(names) <= set(plain.state_dict())
    assert names == [n for n in plain.state_dict() if n.endswith(("q_proj.weight", "fc1.weight"))]


def test_global_and_per_tensor_selection_counts():
    torch.manual_seed(0)
    model = get_peft_model(MLP(), pf.FisherTuneConfig(target_modules=["lin0", "lin1", "lin2"], delta_min=0.1, delta_max=0.25))
    targets = dict(pf.target_parameters(model))
    # lin1 scores dominate: global ranking takes lin1 first, per-tensor takes the same share everywhere
    scores = {n: torch.rand(w.shape) + (10.0 if "lin1" in n else 0.0) for n, w in targets.items()}
    total = sum(w.numel() for w in targets.values())
    s = pf.select_parameters(model, scores, scope="global")
    assert s.num_candidates == round(0.25 * total) and s.num_active == round(0.1 * total)
    lin1 = targets["lin1.weight"].numel()
    assert s.per_tensor["lin1.weight"] == (min(lin1, round(0.25 * total)), min(lin1, round(0.1 * total)))
    layer = model.base_model.model.lin1
    top = torch.topk(scores["lin1.weight"].reshape(-1), round(0.1 * total)).indices
    assert set(layer.active_indices("default").tolist()) == set(top.tolist())
    s = pf.select_parameters(model, scores, scope="per_tensor")
    for n, w in targets.items():
        assert s.per_tensor[n] == (round(0.25 * w.numel()), round(0.1 * w.numel()))
    assert model.peft_config["default"].scope == "per_tensor"


def test_growth_keeps_values_and_optimizer_moments():
    torch.manual_seed(0)
    model = get_peft_model(MLP(), pf.FisherTuneConfig(target_modules=["lin0", "lin1", "lin2"], delta_min=0.05, delta_max=0.3))
    scores = {n: torch.rand(w.shape) for n, w in pf.target_parameters(model)}
    pf.select_parameters(model, scores)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = _inputs("mlp")
    for _ in range(2):
        opt.zero_grad(), model(x).pow(2).mean().backward(), opt.step()
    layer = model.base_model.model.lin1
    k0, active0 = layer.num_active("default"), _active_mask(layer).clone()
    before_vals = layer.ft_values["default"].detach()[active0].clone()
    state = opt.state[layer.ft_values["default"]]
    before_m, value_ptr = state["exp_avg"][active0].clone(), layer.ft_values["default"].data_ptr()
    fractions = [0.05, 0.1, 0.2, 0.3]
    actives = [pf.set_active_fraction(model, f).num_active for f in fractions]
    assert actives == sorted(actives) and actives[-1] == pf.selection_summary(model).num_candidates
    assert layer.ft_values["default"].data_ptr() == value_ptr, "growth must not reallocate the trained values"
    assert torch.equal(layer.ft_values["default"].detach()[active0], before_vals)
    assert torch.equal(opt.state[layer.ft_values["default"]]["exp_avg"][active0], before_m)
    assert layer.num_active("default") > k0
    new = _active_mask(layer) & ~active0
    assert bool((active0 <= _active_mask(layer)).all()), "growing must keep every active element active"
    # the newly active elements were candidates: their values start at zero, then train
    assert torch.count_nonzero(layer.ft_values["default"].detach()[new]) == 0
    opt.zero_grad(), model(x).pow(2).mean().backward(), opt.step()
    assert torch.count_nonzero(layer.ft_values["default"].detach()[new]) > 0


def test_same_shaped_layers_get_different_random_masks():
    _, model = _peft(MLP, {"target_modules": ["lin1", "lin2"], "scope": "per_tensor"})
    m = model.base_model.model
    assert not torch.equal(m.lin1.ft_indices["default"], m.lin2.ft_indices["default"])


def test_magnitude_selection_picks_largest_weights():
    torch.manual_seed(0)
    model = get_peft_model(MLP(), pf.FisherTuneConfig(target_modules=["lin1"], init_selection="magnitude",
                                                     delta_min=0.1, delta_max=0.1))
    layer = model.base_model.model.lin1
    w = layer.get_base_layer().weight.detach().abs().reshape(-1)
    chosen = w[layer.active_indices("default").long()]
    others = torch.ones_like(w, dtype=torch.bool)
    others[layer.active_indices("default").long()] = False
    assert chosen.min() >= w[others].max()


def test_two_adapters_on_one_model(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(MLP(), pf.FisherTuneConfig(target_modules=["lin0", "lin1"], init_selection="random",
                                                     init_weights=False, seed=1))
    model.add_adapter("other", pf.FisherTuneConfig(target_modules=["lin1", "lin2"], init_selection="random",
                                                   init_weights=False, seed=2))
    x = _inputs("mlp")
    model.eval()
    with torch.no_grad():
        out_a = model(x)
        model.set_adapter("other")
        out_b = model(x)
        assert not torch.allclose(out_a, out_b)
        assert [n for n, p in model.named_parameters() if p.requires_grad] == [
            n for n, _ in model.named_parameters() if n.endswith("ft_values.other")]
        model.save_pretrained(tmp_path)
        torch.manual_seed(0)
        loaded = PeftModel.from_pretrained(MLP(), tmp_path)
        loaded.load_adapter(tmp_path / "other", adapter_name="other")
        loaded.eval()
        assert torch.allclose(loaded(x), out_a, atol=1e-6)
        loaded.set_adapter("other")
        assert torch.allclose(loaded(x), out_b, atol=1e-6)
        model.delete_adapter("default")
        assert all("default" not in m.ft_values for m in model.modules() if isinstance(m, FisherTuneLayer))
        assert torch.allclose(model(x), out_b, atol=1e-6)


def test_two_active_adapters_on_different_layers_change_the_output_more():
    torch.manual_seed(0)
    base = MLP().eval()
    model = get_peft_model(copy.deepcopy(base), pf.FisherTuneConfig(
        target_modules=["lin0"], init_selection="random", init_weights=False, seed=1))
    model.add_adapter("other", pf.FisherTuneConfig(target_modules=["lin2"], init_selection="random",
                                                   init_weights=False, seed=2))
    model.eval()
    x = _inputs("mlp")
    with torch.no_grad():
        ref = base(x)
        one = model(x)
        model.base_model.set_adapter(["default", "other"])
        both = model(x)
        model.base_model.set_adapter("other")
        two = model(x)
    assert not torch.allclose(both, one) and not torch.allclose(both, two)
    dist = lambda y: float((y - ref).norm())  # noqa: E731
    assert dist(both) > max(dist(one), dist(two))


def test_weights_read_by_the_parent_are_refused_at_wrap_time():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x)[0]

    with pytest.raises(ValueError, match=r"'mha.out_proj'.*nn.MultiheadAttention, which reads its weight directly"):
        get_peft_model(Attn(), pf.FisherTuneConfig(target_modules=["out_proj"]))
    # tied weights: GPT-2's lm_head reads wte.weight
    with pytest.raises(ValueError, match=r"'model.transformer.wte'.*shared with \['model.lm_head'\]"):
        get_peft_model(HF_GPT2(), pf.FisherTuneConfig(target_modules=["wte"]))
    # a LayerNorm subclass with its own forward (SAM's channels-first norm) would be computed wrongly
    with pytest.raises(ValueError, match=r"'model.vision_encoder.neck.layer_norm1' of type SamLayerNorm.*its own forward"):
        get_peft_model(HF_SAM(), pf.FisherTuneConfig(target_modules=["neck.layer_norm1"]))


def test_a_layer_never_called_in_forward_is_named_and_never_merged():
    class Lookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(6, 4)  # used as a query table: the parent reads .weight itself
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) @ self.table.weight.t()

    torch.manual_seed(0)
    model = get_peft_model(Lookup(), pf.FisherTuneConfig(target_modules=["table", "lin"], init_selection="random",
                                                         init_weights=False))
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match=r"'table' has active elements but was not called in the forward"):
        model(x)
    with pytest.raises(ValueError, match=r"'table' was not called in the model's forward"):
        model.merge_and_unload()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per layer
        model(x)


def test_bf16_autocast_and_bf16_model():
    _, model = _peft(TinyViT, TEST_CASES[6][3])
    x = _inputs("vit")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        assert out.dtype == torch.bfloat16
        out.float().pow(2).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if ".ft_values." in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.dtype == torch.float32 for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # the adapter on a bf16 model: values are upcast to fp32 by PEFT, the forward runs in bf16
    torch.manual_seed(0)
    bf = TinyViT().to(torch.bfloat16)
    bmodel = get_peft_model(bf, pf.FisherTuneConfig(target_modules=["q_proj", "fc1"], init_selection="random", init_weights=False))
    y = bmodel(x.to(torch.bfloat16))
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert all(p.grad is not None for n, p in bmodel.named_parameters() if ".ft_values." in n)


def test_gradient_checkpointing_gives_same_gradients():
    def grads(checkpointing):
        _, model = _peft(TinyViT, TEST_CASES[6][3])
        if checkpointing:
            model.base_model.model.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(_inputs("vit")).pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if ".ft_values." in n}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], atol=1e-6), n


def test_merged_weight_is_not_saved_for_backward():
    """Saved activations of one sparse layer: the input only, no weight-sized tensor."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(64, 64))
    model = get_peft_model(lin, pf.FisherTuneConfig(target_modules=["0"], init_selection="random", delta_min=0.5, delta_max=0.5))
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    x = torch.randn(3, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    weight_sized = [s for s in saved if s == torch.Size([64, 64])]
    # the base weight itself is saved by reference (a parameter), never a merged copy
    assert len(weight_sized) <= 1, saved


# ------------------------------------------------------------------ bad input
def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="delta_min"):
        pf.FisherTuneConfig(target_modules=["a"], delta_min=0.0)
    with pytest.raises(ValueError, match=r"delta_min=0.3 is larger than delta_max=0.2"):
        pf.FisherTuneConfig(target_modules=["a"], delta_min=0.3, delta_max=0.2)
    with pytest.raises(ValueError, match=r"schedule='step'.*linear"):
        pf.FisherTuneConfig(target_modules=["a"], schedule="step")
    with pytest.raises(ValueError, match="scope"):
        pf.FisherTuneConfig(target_modules=["a"], scope="layer")
    with pytest.raises(ValueError, match="init_selection"):
        pf.FisherTuneConfig(target_modules=["a"], init_selection="fisher")
    assert pf.FisherTuneConfig().target_modules is None  # filled from the model when the adapter is created
    with pytest.raises(ValueError, match="lambda_dr"):
        pf.FisherTuneConfig(target_modules=["a"], lambda_dr=1.5)
    with pytest.raises(ValueError, match="gamma"):
        pf.FisherTuneConfig(target_modules=["a"], gamma=float("nan"))


@pytest.mark.parametrize("kwargs, match", [
    ({"target_modules": 123}, r"target_modules=123 \(int\) is not allowed; expected a regex string or a list"),
    ({"target_modules": ["q_proj", 7]}, r"target_modules holds 7 \(int\); every entry must be a module name"),
    ({"target_modules": ["a"], "exclude_modules": 5}, r"exclude_modules=5 \(int\) is not allowed"),
    ({"target_modules": ["a"], "perturb_at": 123}, r"perturb_at=123 is not allowed"),
    ({"target_modules": ["a"], "modules_to_save": "classifier"}, r"modules_to_save='classifier' is a string; expected a list"),
    ({"target_modules": "q_proj(["}, r"target_modules='q_proj\(\[' is not a valid regular expression"),
    ({"target_modules": ["a"], "exclude_modules": "(("}, r"exclude_modules='\(\(' is not a valid regular expression"),
    ({"target_modules": ["a"], "delta_max": 1.5}, r"FisherTuneConfig.delta_max=1.5 is out of range"),
    ({"target_modules": ["a"], "scope": 3}, r"FisherTuneConfig.scope=3 is not allowed"),
    ({"target_modules": ["a"], "per_sample_method": "fast"}, r"FisherTuneConfig.per_sample_method='fast' is not allowed"),
    ({"target_modules": ["a"], "vmap_chunk_size": 0}, r"FisherTuneConfig.vmap_chunk_size=0 is not allowed"),
])
def test_config_field_types_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=r"FisherTuneConfig\." + match.removeprefix("FisherTuneConfig.")):
        pf.FisherTuneConfig(**kwargs)


def test_unsupported_layer_type_is_named():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

    with pytest.raises(ValueError, match=r"'bn' of type BatchNorm1d.*wraps only Linear, Conv2d, LayerNorm, Embedding"):
        get_peft_model(M(), pf.FisherTuneConfig(target_modules=["bn"]))


def test_selection_errors():
    torch.manual_seed(0)
    model = get_peft_model(MLP(), pf.FisherTuneConfig(target_modules=["lin0", "lin1"], delta_min=0.1, delta_max=0.2))
    good = {n: torch.rand(w.shape) for n, w in pf.target_parameters(model)}
    with pytest.raises(ValueError, match="has no candidates yet"):
        pf.set_active_fraction(model, 0.1)
    with pytest.raises(ValueError, match=r"missing.*lin1.weight"):
        pf.select_parameters(model, {"lin0.weight": good["lin0.weight"]})
    with pytest.raises(ValueError, match=r"unknown name.*lin9.weight"):
        pf.select_parameters(model, {**good, "lin9.weight": torch.rand(2)})
    with pytest.raises(ValueError, match=r"scores\['lin0.weight'\] has shape \(12, 24\).*\(24, 12\)"):
        pf.select_parameters(model, {**good, "lin0.weight": torch.rand(12, 24)})
    bad = good["lin1.weight"].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"scores\['lin1.weight'\] holds NaN"):
        pf.select_parameters(model, {**good, "lin1.weight": bad})
    with pytest.raises(ValueError, match="scope='layer'"):
        pf.select_parameters(model, good, scope="layer")
    pf.select_parameters(model, good)
    for f in (0.05, 0.25, float("nan")):
        with pytest.raises(ValueError, match=r"outside \[delta_min, delta_max\]"):
            pf.set_active_fraction(model, f)
    with pytest.raises(ValueError, match="adapter_name='nope'"):
        pf.set_active_fraction(model, 0.1, adapter_name="nope")


def test_partly_grown_adapter_keeps_growing_after_reload(tmp_path):
    _, model = _peft(MLP, TEST_CASES[0][3])
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(MLP(), tmp_path, is_trainable=True)
    grown = pf.set_active_fraction(loaded, 0.3)
    assert grown.num_active == pf.set_active_fraction(model, 0.3).num_active > pf.selection_summary(model).num_candidates // 2
    for a, b in zip(_layers_of(loaded), _layers_of(model)):
        assert torch.equal(a.active_indices("default"), b.active_indices("default"))


def test_fully_grown_adapter_file_is_compact_and_fixed(tmp_path):
    _, model = _peft(MLP, TEST_CASES[0][3])
    pf.set_active_fraction(model, 0.4)  # every candidate active (the end of stage 3)
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert not any(k.endswith(("ft_rank", "ft_pending", "ft_threshold")) for k in keys), keys
    loaded = PeftModel.from_pretrained(_make(MLP, TEST_CASES[0][3])[0], tmp_path)
    x = _inputs("mlp")
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    with pytest.raises(ValueError, match="loaded from a saved file"):
        pf.set_active_fraction(loaded, 0.3)


def _layers_of(model):
    return [m for m in model.modules() if isinstance(m, FisherTuneLayer)]


def _tamper(tmp_path, key_suffix, fn):
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(path)
    key = next(k for k in sd if k.endswith(key_suffix))
    sd[key] = fn(sd[key])
    save_file(sd, path)
    return key


@pytest.mark.parametrize("what,suffix,fn,match", [
    ("out of range", "lin1.ft_index", lambda t: torch.cat([t[:-1], torch.tensor([10**6], dtype=t.dtype)]), r"lin1.ft_index holds index 1000000, out of range"),
    ("duplicated", "lin1.ft_index", lambda t: torch.cat([t[:-1], t[:1]]), r"lin1.ft_index holds duplicated indices"),
    ("other shape", "lin1.ft_shape", lambda t: torch.tensor([12, 48]), r"lin1.ft_shape is \(12, 48\).*another model"),
    ("count mismatch", "lin1.ft_values", lambda t: t[:-1], r"lin1 has \d+ selected elements but \d+ values"),
    ("nan values", "lin1.ft_values", lambda t: t * float("nan"), r"lin1.ft_values holds NaN"),
])
def test_tampered_adapter_file_is_rejected(tmp_path, what, suffix, fn, match):
    _, model = _peft(MLP, {"target_modules": ["lin0", "lin1"], "encoding": "index"})
    model.save_pretrained(tmp_path)
    _tamper(tmp_path, suffix, fn)
    with pytest.raises(pf.AdapterFileError, match=match):
        PeftModel.from_pretrained(MLP(), tmp_path)


def test_tampered_bitmask_is_rejected(tmp_path):
    _, model = _peft(MLP, {"target_modules": ["lin1"], "encoding": "bitmask"})
    model.save_pretrained(tmp_path)
    _tamper(tmp_path, "lin1.ft_mask", lambda t: t[:-1])
    with pytest.raises(pf.AdapterFileError, match=r"lin1.ft_mask must be uint8 of length 72"):
        PeftModel.from_pretrained(MLP(), tmp_path)


def test_tampered_gap_codes_are_rejected(tmp_path):
    _, model = _peft(MLP, {"target_modules": ["lin1"], "encoding": "gaps"})
    model.save_pretrained(tmp_path)
    _tamper(tmp_path, "lin1.ft_gaps", lambda t: torch.cat([t, torch.tensor([200], dtype=torch.uint8)]))
    with pytest.raises(pf.AdapterFileError, match=r"lin1.ft_gaps reaches index \d+, out of range"):
        PeftModel.from_pretrained(MLP(), tmp_path)


@pytest.mark.parametrize("encoding", ["index", "bitmask", "gaps"])
def test_every_encoding_round_trips(tmp_path, encoding):
    _, model = _peft(MLP, {"target_modules": ["lin0", "lin1"], "encoding": encoding})
    x = _inputs("mlp")
    model.save_pretrained(tmp_path)
    fresh, _ = _make(MLP, {"target_modules": ["lin0", "lin1"]})
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    assert f"lin1.ft_{'mask' if encoding == 'bitmask' else encoding}" in "".join(load_file(tmp_path / "adapter_model.safetensors"))


def test_unknown_or_missing_tensors_are_refused_naming_the_file(tmp_path):
    _, model = _peft(MLP, {"target_modules": ["lin0", "lin1"]})
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(path)
    save_file({**sd, "base_model.model.lin2.weight": torch.zeros(24, 24)}, path)
    with pytest.raises(pf.AdapterFileError, match=rf"{path}: tensor\(s\) \['base_model.model.lin2.weight'\] are neither"):
        PeftModel.from_pretrained(_make(MLP, {"target_modules": ["lin0", "lin1"]})[0], tmp_path)
    save_file({k: v for k, v in sd.items() if not k.endswith("lin1.ft_values")}, path)
    with pytest.raises(pf.AdapterFileError, match=rf"{path}: tensor\(s\) \[.*lin1.ft_values'\] are missing"):
        PeftModel.from_pretrained(_make(MLP, {"target_modules": ["lin0", "lin1"]})[0], tmp_path)


@pytest.mark.parametrize("declared", ["LORA", "SHIRA"])
def test_fishertune_file_declared_as_another_method_is_refused(tmp_path, declared):
    _, model = _peft(MLP, {"target_modules": ["lin0"]})
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["peft_type"] = declared
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(pf.AdapterFileError, match=rf"adapter_config.json: declares peft_type '{declared}', but .* holds "
                       "FisherTune tensors"):
        PeftModel.from_pretrained(MLP(), tmp_path)


@pytest.mark.parametrize("damage, match", [
    ("truncate", r"adapter_model.safetensors: not a readable safetensors file"),
    ("overwrite", r"adapter_model.safetensors: not a readable safetensors file"),
    ("json", r"adapter_config.json: not valid JSON"),
])
def test_damaged_files_are_named(tmp_path, damage, match):
    _, model = _peft(MLP, {"target_modules": ["lin0"]})
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:20])
    elif damage == "overwrite":
        weights.write_bytes(b"\xff" * 64)
    else:
        (tmp_path / "adapter_config.json").write_text('{"peft_type": "FISHERTUNE", ')
    with pytest.raises(pf.AdapterFileError, match=str(tmp_path) + ".*" + match):
        PeftModel.from_pretrained(MLP(), tmp_path)


def test_file_from_other_targets_is_rejected(tmp_path):
    _, model = _peft(MLP, {"target_modules": ["lin0"]})
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["target_modules"] = ["lin0", "lin2"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(pf.AdapterFileError, match=r"no tensors for .*lin2"):
        PeftModel.from_pretrained(MLP(), tmp_path)


# ------------------------------------------------------------------ storage
class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(1024, 1024) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("fraction", [0.005, 0.02, 0.1, 0.4])
def test_file_size_within_10_percent_of_compact_encoding(tmp_path, fraction):
    torch.manual_seed(0)
    model = get_peft_model(Wide(), pf.FisherTuneConfig(target_modules=["layers.0", "layers.1"],
                                                      init_selection="random", delta_min=fraction, delta_max=fraction))
    model.save_pretrained(tmp_path)
    size = os.path.getsize(tmp_path / "adapter_model.safetensors")
    k = pf.selection_summary(model).num_active
    n_per = 1024 * 1024
    ideal = sum(min(4 * a + 4 * a, n_per / 8 + 4 * a) for _, a in pf.selection_summary(model).per_tensor.values())
    assert k > 0 and size <= 1.10 * ideal, (size, ideal)
    sd = load_file(tmp_path / "adapter_model.safetensors")
    for i in range(2):
        layer = model.base_model.model.layers[i]
        flat = layer.active_indices("default").long().sort().values
        sizes = encoded_sizes(flat, n_per)
        chosen = next(k for k in ("ft_index", "ft_mask", "ft_gaps") if f"base_model.model.layers.{i}.{k}" in sd)
        assert {"ft_index": "index", "ft_mask": "mask", "ft_gaps": "gaps"}[chosen] == min(sizes, key=sizes.get)


def test_only_active_elements_are_written(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(MLP(), pf.FisherTuneConfig(target_modules=["lin1"], init_selection="random",
                                                     delta_min=0.1, delta_max=0.4, encoding="index"))
    layer = model.base_model.model.lin1
    assert layer.num_candidates("default") > layer.num_active("default")
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "adapter_model.safetensors")
    assert sd["base_model.model.lin1.ft_values"].numel() == layer.num_active("default")
    assert set(sd["base_model.model.lin1.ft_index"].tolist()) == set(layer.active_indices("default").tolist())


def test_model_card_has_fishertune_section(tmp_path):
    _, model = _peft(TinyViT, TEST_CASES[6][3])
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "## FisherTune adapter" in card and "δ_min = 0.2, δ_max = 0.4" in card
    active = pf.selection_summary(model).num_active
    assert f"selected elements: {active:,} of" in card
    for row in ("| q_proj (Linear) | 2 |", "| projection (Conv2d) | 1 |", "| norm1 (LayerNorm) | 2 |"):
        assert row in card
    model.save_pretrained(tmp_path)  # re-saving replaces, not duplicates, the section
    assert (tmp_path / "README.md").read_text().count("## FisherTune adapter") == 1


def test_state_dict_round_trip_resizes_candidate_lists():
    """A full state_dict (what a trainer checkpoint holds: every candidate, ranks included) loads into a fresh
    adapter of other sizes, and set_active_fraction keeps working (unlike a saved adapter file)."""
    _, model = _peft(MLP, TEST_CASES[0][3])
    fresh_base, cfg = _make(MLP, TEST_CASES[0][3], selection="none")
    fresh = get_peft_model(fresh_base, cfg)
    assert pf.selection_summary(fresh).num_candidates == 0
    fresh.load_state_dict(model.state_dict())
    assert pf.selection_summary(fresh).per_tensor == pf.selection_summary(model).per_tensor
    x = _inputs("mlp")
    assert torch.allclose(fresh(x), model(x))
    assert pf.set_active_fraction(fresh, 0.4).num_active == pf.set_active_fraction(model, 0.4).num_active


def test_merge_and_unload_with_container_modules_to_save():
    _, model = _peft(TinyViT, {"target_modules": ["q_proj"], "modules_to_save": ["backbone.embeddings"]})
    x = _inputs("vit")
    model.eval()
    with torch.no_grad():
        out = model(x)
        merged = model.merge_and_unload()
    assert not any(isinstance(m, FisherTuneLayer) for m in merged.modules())
    assert torch.allclose(merged(x), out, atol=1e-5)


def test_torch_compile_has_no_graph_break_and_matches_eager():
    import torch._dynamo as dynamo

    _, model = _peft(MLP, TEST_CASES[0][3])
    x = _inputs("mlp")
    dynamo.reset()
    explained = dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    dynamo.reset()
    compiled = torch.compile(model)
    out = compiled(x)
    out.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    eager = model(x)
    eager.pow(2).mean().backward()
    assert torch.allclose(out, eager, atol=1e-5)
    for n, g in grads.items():
        assert torch.allclose(g, dict(model.named_parameters())[n].grad, atol=1e-5), n
    dynamo.reset()
