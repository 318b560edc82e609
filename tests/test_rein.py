"""Rein (CVPR 2024) as a PEFT method: PEFT's generic checks, the forward against the paper's formulas written out
here, identity at init, the query linking, and the trainable count at DINOv2-L size.

Tiny models are built from configs (random weights; nothing is downloaded).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers import Dinov2Config, Dinov2Model

import peft_fishertune  # noqa: F401  (registers REIN)
from peft_fishertune.models import build_segmentation_model, tiny_backbone_config, tiny_mask2former_config
from peft_fishertune.rein import (
    ReinConfig,
    ReinLayer,
    get_rein_segmentation_model,
    rein_decoder_config,
    rein_trainable_parameters,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKBONES = ["dinov2", "dinov2_registers", "dinov3", "clip", "sam"]
TOKENS = 8  # token_length = num_queries of the tiny decoder
QDIM = 32  # tiny decoder width


def _seg(backbone="dinov2", decoder="mask2former", replace_query_feat=True, seed=0):
    torch.manual_seed(seed)
    dc = tiny_mask2former_config(num_labels=3, **rein_decoder_config(TOKENS, replace_query_feat))
    seg = build_segmentation_model(backbone, backbone_config=tiny_backbone_config(backbone), num_labels=3,
                                   decoder=decoder, decoder_config=dc if decoder == "mask2former" else None,
                                   pyramid_channels=32)
    return seg.eval()


def _rein(seg, **kw):
    kw = {"token_length": TOKENS, "query_dims": QDIM, **kw}
    torch.manual_seed(1)
    return get_rein_segmentation_model(seg, kw).eval()


def _x(size=32, seed=0):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _frozen_base_logits(seg, x):
    # PEFT freezes every base parameter; with no parameter requiring grad, torch picks other attention kernels
    # (differences ~1e-7 in the decoder), so the base is computed in that same state
    flags = [p.requires_grad for p in seg.parameters()]
    for p in seg.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        out = seg(x).logits
    for p, f in zip(seg.parameters(), flags):
        p.requires_grad_(f)
    return out


# ------------------------------------------------------------------- generic PEFT checks
def test_save_load_state_and_outputs_equal(tmp_path):
    x = _x()
    pm = _rein(_seg(), init_weights=False)
    with torch.no_grad():
        out = pm(x).logits
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "REIN" and cfg["token_length"] == TOKENS
    assert (tmp_path / "README.md").is_file()  # the model card path (calls peft_type.value)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    shared = sorted(k for k in saved if ".rein_shared." in k)
    # the shared parameters once (not once per block), without the adapter name
    assert shared == [f"base_model.rein_shared.{n}" for n in (
        "merge.bias", "merge.weight", "mlp_delta_f.bias", "mlp_delta_f.weight", "mlp_token2feat.bias",
        "mlp_token2feat.weight", "scale", "transform.bias", "transform.weight")]
    assert sum(".rein_tokens_a" in k for k in saved) == 4  # one per block of the tiny 4-block backbone

    for low_mem in (False, True):
        loaded = PeftModel.from_pretrained(_seg(), tmp_path, low_cpu_mem_usage=low_mem).eval()
        a, b = get_peft_model_state_dict(pm), get_peft_model_state_dict(loaded)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
        with torch.no_grad():  # loaded for inference: nothing requires grad, other attention kernels (~1e-7)
            torch.testing.assert_close(loaded(x).logits, out, rtol=0, atol=1e-5)


def test_disable_gives_the_base_exactly_and_enable_restores():
    x = _x()
    seg = _seg()
    base = _frozen_base_logits(seg, x)
    pm = _rein(seg, init_weights=False)
    with torch.no_grad():
        on = pm(x).logits
        with pm.disable_adapter():
            off = pm(x).logits
        again = pm(x).logits
    assert not torch.allclose(on, base, atol=1e-3)
    assert torch.equal(off, base)
    assert torch.equal(again, on)


def test_unload_gives_the_base_model_and_merge_raises_clearly():
    x = _x()
    seg = _seg()
    base = _frozen_base_logits(seg, x)
    pm = _rein(seg, init_weights=False)
    for merge in (pm.merge_and_unload, pm.merge_adapter):
        with pytest.raises(NotImplementedError, match="Rein cannot be merged"):
            merge()
    layer = next(m for m in pm.modules() if isinstance(m, ReinLayer))
    with pytest.raises(NotImplementedError, match="Rein cannot be merged"):
        layer.merge()
    plain = pm.unload()
    assert not any(isinstance(m, ReinLayer) for m in plain.modules())
    assert not plain.decode_head._forward_pre_hooks  # the query link is removed with the adapter
    with torch.no_grad():  # the decoder is now the (untrained) trainable copy: other attention kernels (~1e-7)
        torch.testing.assert_close(plain(x).logits, base, rtol=0, atol=1e-5)


def test_two_adapters_delete_and_linking_needs_one_active(tmp_path):
    x = _x()
    seg = _seg()
    base = _frozen_base_logits(seg, x)
    pm = _rein(seg, init_weights=False)
    torch.manual_seed(5)
    pm.add_adapter("other", ReinConfig(token_length=TOKENS, query_dims=QDIM, init_weights=False,
                                       modules_to_save=["pyramid", "decode_head"]))
    tuner = pm.base_model
    assert set(tuner.rein_shared) == {"default", "other"}
    # the new adapter is not active, so not trainable
    assert not any(p.requires_grad for p in rein_trainable_parameters(pm, "other"))
    assert all(p.requires_grad for p in rein_trainable_parameters(pm, "default"))
    with torch.no_grad():
        one = pm(x).logits
        pm.set_adapter("other")
        two = pm(x).logits
    assert not torch.allclose(one, two, atol=1e-3)
    pm.set_adapter("default")
    pm.delete_adapter("other")
    assert set(tuner.rein_shared) == {"default"}
    assert not any(".other" in n for n, _ in pm.named_parameters())
    with torch.no_grad():
        assert torch.equal(pm(x).logits, one)
    pm.delete_adapter("default")
    assert not any(isinstance(p, nn.Parameter) and "rein_" in n for n, p in pm.named_parameters())
    with torch.no_grad():  # nothing left: blocks pass through, the decoder uses its own queries
        torch.testing.assert_close(pm.base_model.model(x).logits, base, rtol=0, atol=1e-6)


def test_two_active_adapters_cannot_both_link_their_tokens():
    x = _x()
    seg = _seg()
    pm = get_peft_model(seg, ReinConfig(token_length=TOKENS, query_dims=QDIM))  # no modules_to_save: one decoder
    pm.add_adapter("other", ReinConfig(token_length=TOKENS, query_dims=QDIM))
    pm.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match=r"adapters \['default', 'other'\] are active together"):
        pm(x)


def test_two_active_adapters_without_linking_differ_from_one():
    x = _x()
    seg = _seg(decoder="linear")
    pm = _rein(seg, init_weights=False)  # linear decoder: linking off by default
    assert pm.peft_config["default"].link_token_to_query is False
    torch.manual_seed(7)
    pm.add_adapter("b", ReinConfig(token_length=TOKENS, init_weights=False, link_token_to_query=False))
    with torch.no_grad():
        one = pm(x).logits
        pm.base_model.set_adapter(["default", "b"])
        both = pm(x).logits
    assert not torch.allclose(one, both, atol=1e-3)


def test_plain_vit_with_explicit_blocks():
    """Models without a backbone adapter: the blocks by name, the prefix given."""
    torch.manual_seed(0)
    vit = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                   image_size=28, patch_size=7)).eval()
    x = _x(28)
    with torch.no_grad():
        base = vit(pixel_values=x).last_hidden_state
    pm = get_peft_model(vit, ReinConfig(target_modules=r"encoder\.layer\.\d+", num_prefix_tokens=1,
                                        link_token_to_query=False, init_weights=False, token_length=4, rank=2))
    layers = [m for m in pm.modules() if isinstance(m, ReinLayer)]
    assert [m.layer_index for m in layers] == [0, 1, 2] and all(m.dim == 32 for m in layers)
    with torch.no_grad():
        out = pm(pixel_values=x).last_hidden_state
    assert not torch.allclose(out, base, atol=1e-3)
    with pm.disable_adapter(), torch.no_grad():
        assert torch.equal(pm(pixel_values=x).last_hidden_state, base)


# --------------------------------------------------------------- the formulas, written out
def _rein_formula(h, A, B, W1, b1, W2, b2, s, num_prefix):
    """Rein after one block, from the paper / issue 13: h (B, P + N, C) -> same shape."""
    T = A @ B if B is not None else A  # (m, C)
    C = T.shape[1]
    cls, f = h[:, :num_prefix], h[:, num_prefix:]
    attn = torch.softmax(torch.einsum("bnc,mc->bnm", f, T) / math.sqrt(C), dim=-1)
    value = T[1:] @ W1.T + b1  # mlp_token2feat(T[1:])
    delta = torch.einsum("bnm,mc->bnc", attn[:, :, 1:], value)
    f = f + s * ((delta + f) @ W2.T + b2)  # mlp_delta_f(Δ + f)
    return torch.cat([cls, f], dim=1)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_forward_equals_the_formulas_on_every_backbone(backbone):
    x = _x(64 if backbone == "sam" else 32)
    seg = _seg(backbone)
    with torch.no_grad():
        base_feats = seg.backbone(x)
    pm = _rein(seg, init_weights=False)
    adapter = pm.base_model.model.backbone
    layers = [m for m in pm.modules() if isinstance(m, ReinLayer)]
    assert [m.base_layer for m in layers] == [b.base_layer for b in adapter.blocks]  # every block, in order
    sh = pm.base_model.rein_shared["default"]
    W1, b1 = sh.mlp_token2feat.weight, sh.mlp_token2feat.bias
    W2, b2 = sh.mlp_delta_f.weight, sh.mlp_delta_f.bias
    with torch.no_grad():
        hidden, ctx = adapter.embed(adapter.pad_to_patch_multiple(x))
        P = ctx.get("num_prefix", 0)  # the adapter's own token layout
        want = []
        for i, layer in enumerate(layers):
            assert layer.num_prefix == P
            hidden = adapter.run_block(layer.base_layer, hidden, ctx)
            A, B = layer.rein_tokens_a["default"], layer.rein_tokens_b["default"]
            if hidden.ndim == 4:  # SAM's (B, h, w, C) grid
                b, gh, gw, c = hidden.shape
                hidden = _rein_formula(hidden.reshape(b, gh * gw, c), A, B, W1, b1, W2, b2, sh.scale, 0)
                hidden = hidden.reshape(b, gh, gw, c)
            else:
                hidden = _rein_formula(hidden, A, B, W1, b1, W2, b2, sh.scale, P)
            if i in adapter.out_indices:
                want.append(adapter.to_map(hidden, ctx))
        got = adapter(x)
    assert len(got) == len(want) == 4
    for g, w, b in zip(got, want, base_feats):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        assert (g - b).abs().max() > 1e-2  # Rein changed the features: the comparison means something


def test_full_token_variant_equals_the_formulas():
    seg = _seg()
    pm = _rein(seg, init_weights=False, rank=None)
    layer = next(m for m in pm.modules() if isinstance(m, ReinLayer))
    assert "default" not in layer.rein_tokens_b and layer.rein_tokens_a["default"].shape == (TOKENS, 32)
    sh = pm.base_model.rein_shared["default"]
    h = torch.randn(2, 1 + 16, 32)
    with torch.no_grad():
        got = layer.refine(h, "default")
        want = _rein_formula(h, layer.rein_tokens_a["default"], None, sh.mlp_token2feat.weight,
                             sh.mlp_token2feat.bias, sh.mlp_delta_f.weight, sh.mlp_delta_f.bias, sh.scale, 1)
    torch.testing.assert_close(got, want)


def test_linked_queries_equal_the_formula_and_reach_the_decoder():
    x = _x()
    pm = _rein(_seg(), init_weights=False)
    tuner = pm.base_model
    sh = tuner.rein_shared["default"]
    layers = tuner.rein_layers()
    with torch.no_grad():
        T = torch.stack([l.rein_tokens_a["default"] @ l.rein_tokens_b["default"] for l in layers])  # (L, m, C)
        t = T @ sh.transform.weight.T + sh.transform.bias  # (L, m, Q)
        mx, mean, last = t.max(0).values, t.mean(0), t[-1]
        # per channel q: [max_q, mean_q, last_q] side by side (the reference's flatten order)
        cat = torch.stack([mx, mean, last], dim=-1).reshape(TOKENS, 3 * QDIM)
        want = cat @ sh.merge.weight.T + sh.merge.bias
        got = tuner.linked_queries()
    torch.testing.assert_close(got, want)
    assert got.shape == (TOKENS, QDIM)

    # the decoder receives them: passing them explicitly gives the same output as the hook
    seg = tuner.model
    with torch.no_grad():
        feats = seg.pyramid(seg.backbone(x))
        head = seg.decode_head.modules_to_save["default"]
        hooked = seg.decode_head(feats)
        explicit = head(feats, queries=got)
        own = head(feats, queries=None)
    torch.testing.assert_close(hooked[0][-1], explicit[0][-1])
    assert not torch.allclose(hooked[0][-1], own[0][-1], atol=1e-4)

    # gradients reach every block's tokens through the decoder (the linking) and the shared layers
    pm.train()
    out = pm(x, labels=torch.randint(0, 3, (2, 32, 32)))
    out.loss.backward()
    for p in rein_trainable_parameters(pm):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_decoder_with_its_own_queries_passed_in_is_unchanged():
    """The linked-query path re-implements transformers' module: fed the learned queries it must agree."""
    dec = _seg(replace_query_feat=False).decode_head
    feats = [torch.randn(1, 32, s, s) for s in (32, 16, 8, 4)]
    with torch.no_grad():
        c0, m0 = dec(feats)
        c1, m1 = dec(feats, queries=dec.transformer_module.queries_embedder.weight)
        c2, m2 = dec(feats, queries=dec.transformer_module.queries_embedder.weight.expand(1, -1, -1))
    for a, b in ((c0, c1), (m0, m1), (c0, c2), (m0, m2)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="queries must be"):
        dec(feats, queries=torch.zeros(TOKENS, 7))


# ------------------------------------------------------------------------ identity at init
def test_near_identity_at_init_first_order_in_the_scale():
    """f <- f + s·mlp(...): with s = 1e-3 the features move by O(s), and tenfold s gives tenfold distance."""
    x = _x()
    seg = _seg()
    with torch.no_grad():
        base = torch.cat([f.flatten() for f in seg.backbone(x)])
    pm = _rein(seg)  # the reference init: s = 1e-3
    assert pm.base_model.rein_shared["default"].scale.item() == pytest.approx(1e-3)

    def rel_distance(s):
        with torch.no_grad():
            pm.base_model.rein_shared["default"].scale.fill_(s)
            out = torch.cat([f.flatten() for f in pm.base_model.model.backbone(x)])
        return float((out - base).norm() / base.norm())

    d3, d4 = rel_distance(1e-3), rel_distance(1e-4)
    assert 0 < d3 < 1e-2  # within 1 % of the base features
    assert 9.0 < d3 / d4 < 11.0  # first order in s: the refinement itself is O(1), only s makes it small


# --------------------------------------------------------------------- trainable count
def test_trainable_count_at_dinov2_large_matches_the_reference_arithmetic():
    """DINOv2-L (24 blocks, dim 1024) + Mask2Former (256 wide, 100 queries), on the meta device (no weights).

    Reference (w1oves/Rein, LoRAReins + link_token_to_query): per block A[100, 16] and B[16, 1024]; shared
    mlp_token2feat and mlp_delta_f Linear(1024, 1024) and the scalar scale; linking transform Linear(1024, 256) and
    merge Linear(768, 256). The decoder's Linear(256, 256) for replace_query_feat belongs to the head there too
    (querys2feat) and is counted with the decoder, not with Rein.
    """
    cfg = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       patch_size=14, image_size=518)
    with torch.device("meta"):
        seg = build_segmentation_model("dinov2", backbone_config=cfg, num_labels=19, decoder_config=rein_decoder_config())
    pm = get_rein_segmentation_model(seg)
    per_block = 100 * 16 + 16 * 1024
    shared = 2 * (1024 * 1024 + 1024) + 1
    linking = (1024 * 256 + 256) + (768 * 256 + 256)
    expected = 24 * per_block + shared + linking
    assert expected == 2_990_081
    rein = rein_trainable_parameters(pm)
    assert sum(p.numel() for p in rein) == expected
    assert all(p.requires_grad for p in rein)
    # the backbone is frozen: apart from Rein nothing under it trains
    rein_ids = {id(p) for p in rein}
    assert not any(p.requires_grad for p in seg.backbone.parameters() if id(p) not in rein_ids)
    head = seg.decode_head.modules_to_save["default"]
    assert head.query_feat_proj.weight.requires_grad and head.query_feat_proj.weight.numel() + 256 == 65_792
    # the learned query tables the linked queries replace are frozen (they would get no gradient)
    tm = head.transformer_module
    assert not tm.queries_embedder.weight.requires_grad and not tm.queries_features.weight.requires_grad


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw,match", [
    ({"token_length": 1}, "token_length"),
    ({"rank": 0}, "rank"),
    ({"query_dims": -1}, "query_dims"),
    ({"scale_init": float("nan")}, "scale_init"),
    ({"use_softmax": "yes"}, "use_softmax"),
    ({"target_modules": ["layer.0"]}, "num_prefix_tokens"),
])
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        ReinConfig(**kw)


def test_linking_checks_the_decoder():
    with pytest.raises(ValueError, match="token_length=5 must equal the decoder's num_queries=8"):
        get_rein_segmentation_model(_seg(), {"token_length": 5, "query_dims": QDIM})
    with pytest.raises(ValueError, match="query_dims=256 must equal the decoder's hidden_dim=32"):
        get_rein_segmentation_model(_seg(), {"token_length": TOKENS, "query_dims": 256})
    # without query_dims the linked queries take the decoder's width
    assert get_rein_segmentation_model(_seg(), {"token_length": TOKENS}).peft_config["default"].query_dims == 32
    with pytest.raises(ValueError, match="link_token_to_query"):
        get_rein_segmentation_model(_seg(decoder="linear"), {"token_length": TOKENS, "link_token_to_query": True})


def test_training_step_moves_rein_and_decoder_only():
    seg = _seg()
    pm = _rein(seg).train()
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    out = pm(_x(), labels=torch.randint(0, 3, (2, 32, 32)))
    out.loss.backward()
    opt.step()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p, before[n])}
    assert any("rein_tokens_a" in n for n in changed) and any("rein_shared" in n for n in changed)
    assert any("modules_to_save.default" in n for n in changed)
    backbone_base = {n for n, _ in pm.named_parameters() if ".backbone." in n and ".rein_" not in n}
    assert backbone_base and not (changed & backbone_base)
    assert not any("original_module" in n or "queries_embedder" in n for n in changed)


# --------------------------------------------------------------------------- the config
def test_paper_config_has_the_reference_recipe():
    path = os.path.join(ROOT, "configs", "rein_dinov2-l_mask2former_gta2citybddmap_512x512_bs4.yaml")
    from peft_fishertune.training.config import read_configs

    raw, _ = read_configs(path)  # the file with its _base_ files merged in, as train.py reads it
    tr, data, method, model = raw["training"], raw["data"], raw["method"], raw["model"]
    assert method["name"] == "rein"
    cfg = ReinConfig(**method["rein"])
    assert (cfg.token_length, cfg.rank, cfg.link_token_to_query) == (100, 16, True)
    assert model["decoder_config"] == rein_decoder_config()
    assert tr["decoder_lr"] == tr["backbone_lr"] == 1e-4 and tr["weight_decay"] == 0.05
    assert tr["stage1_steps"] + tr["stage2_steps"] + tr["stage3_steps"] == 40000 and tr["stage1_steps"] == 40000
    assert tr["per_device_train_batch_size"] == 4
    assert data["crop_size"] == [512, 512] and data["window"] == [512, 512] and data["stride"] == [341, 341]
    assert tr["lr_scheduler_type"] == "polynomial" and tr["lr_scheduler_kwargs"]["power"] == 0.9


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        pm = _rein(_seg(), init_weights=False).train()
        if ckpt:
            pm.base_model.model.activation_checkpointing_enable()
            assert pm.base_model.model.is_gradient_checkpointing
        torch.manual_seed(3)  # the loss samples points
        pm(_x(), labels=torch.randint(0, 3, (2, 32, 32), generator=torch.Generator().manual_seed(0))).loss.backward()
        grads.append([p.grad.clone() for p in rein_trainable_parameters(pm)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_trained_model_loads_for_inference(tmp_path):
    """The evaluate / predict scripts' loader: base model directory + Rein adapter, kept unmerged."""
    from peft_fishertune.training.trained_run import load_for_inference

    x = _x()
    seg = _seg()
    seg.save_pretrained(tmp_path / "base_model")  # decoder config (replace_query_feat) saved with it
    pm = _rein(seg, init_weights=False)
    pm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = pm(x).logits
    model = load_for_inference(str(tmp_path / "base_model"), adapter=str(tmp_path / "adapter"))
    assert any(isinstance(m, ReinLayer) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, want, rtol=0, atol=1e-5)


def test_param_groups_hold_rein_once_with_the_reference_decay_split():
    """What the trainer's optimizer sees: Rein under backbone/*, each parameter once; tokens and s without decay,
    the shared Linear weights with decay (the reference exempts learnable_tokens and reins.scale)."""
    pm = _rein(_seg())
    seg = pm.base_model.model
    groups = {g["name"]: g["params"] for g in seg.param_groups(1e-4, 1e-4, 0.05)}
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids))
    rein = rein_trainable_parameters(pm)
    backbone = groups["backbone/decay"] + groups["backbone/no_decay"]
    assert {id(p) for p in backbone} == {id(p) for p in rein}
    sh = pm.base_model.rein_shared["default"]
    decay = {id(p) for p in groups["backbone/decay"]}
    assert decay == {id(m.weight) for m in (sh.mlp_token2feat, sh.mlp_delta_f, sh.transform, sh.merge)}
    no_decay = {id(p) for p in groups["backbone/no_decay"]}
    assert id(sh.scale) in no_decay
    assert all(id(m.rein_tokens_a["default"]) in no_decay for m in pm.modules() if isinstance(m, ReinLayer))


def test_deepcopy_keeps_the_query_link_with_the_copy():
    import copy

    x = _x()
    pm = _rein(_seg(), init_weights=False)
    twin = copy.deepcopy(pm)
    with torch.no_grad():
        before = pm(x).logits
        assert torch.equal(twin(x).logits, before)
        for layer in twin.base_model.rein_layers():
            layer.rein_tokens_a["default"].mul_(3)
        assert torch.equal(pm(x).logits, before)  # the original's hook reads the original's tokens
        assert not torch.allclose(twin(x).logits, before, atol=1e-4)


def test_bf16_autocast_training_step():
    """The paper config trains with bf16 autocast: Rein stays float32, the step runs and reaches every parameter."""
    pm = _rein(_seg(), init_weights=False).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pm(_x(), labels=torch.randint(0, 3, (2, 32, 32)))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for p in rein_trainable_parameters(pm):
        assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all()
