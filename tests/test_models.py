"""Segmentation models: backbone registry, pyramid, decoders, PEFT wrapping.

Every model is tiny and built from a config (no downloads)."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from torch import nn

from peft_fishertune.models import (
    BACKBONES,
    DECODERS,
    SegmentationModel,
    build_backbone,
    build_segmentation_model,
    get_backbone_class,
    tiny_backbone_config,
    tiny_mask2former_config,
)
from peft_fishertune.models.backbones.base import default_out_indices
from peft_fishertune.models.mask2former import labels_to_mask_targets, semantic_from_queries

NUM_LABELS = 5
HF_BACKBONES = sorted(n for n, c in BACKBONES.items() if c.requires is None)


def _timm_skip_reason() -> str | None:
    try:
        import timm  # noqa: F401
    except Exception as err:  # ImportError, or torchvision failing inside timm
        return f"EVA02 needs timm, which does not import here: {err!r}"
    return None


def backbone_params():
    out = []
    for name in sorted(BACKBONES):
        marks = []
        if BACKBONES[name].requires == "timm" and _timm_skip_reason():
            marks.append(pytest.mark.skip(reason=_timm_skip_reason()))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def make_model(backbone="dinov2", decoder="mask2former", **kw) -> SegmentationModel:
    torch.manual_seed(0)
    return build_segmentation_model(
        backbone,
        backbone_config=kw.pop("backbone_config", tiny_backbone_config(backbone)),
        decoder=decoder,
        num_labels=NUM_LABELS,
        pyramid_channels=32,
        decoder_config=tiny_mask2former_config(NUM_LABELS) if decoder == "mask2former" else None,
        upernet_hidden_size=32,
        **kw,
    )


def make_batch(b=2, h=45, w=61, ignore_rows=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, h, w, generator=g)
    y = torch.randint(0, NUM_LABELS, (b, h, w), generator=g)
    y[:, :ignore_rows] = 255
    return {"pixel_values": x, "labels": y}


# ------------------------------------------------------------------ backbones
def test_default_out_indices_evenly_spaced():
    assert default_out_indices(24) == (5, 11, 17, 23)
    assert default_out_indices(12) == (2, 5, 8, 11)
    assert default_out_indices(40) == (9, 19, 29, 39)


@pytest.mark.parametrize("name", backbone_params())
def test_backbone_features_padded_and_pyramid_strides(name):
    model = make_model(name)
    bb = model.backbone
    p = bb.patch_size
    h, w = 3 * p + 5, 4 * p + 1  # not multiples of the patch size
    with torch.no_grad():
        feats = bb(torch.randn(2, 3, h, w))
        pyr = model.pyramid(feats)
    grid = (math.ceil(h / p), math.ceil(w / p))
    assert len(feats) == 4
    assert all(tuple(f.shape) == (2, bb.embed_dim, *grid) for f in feats)
    # features come from 4 different blocks
    assert all(not torch.allclose(a, b) for i, a in enumerate(feats) for b in feats[i + 1 :])
    assert model.pyramid.strides == (p / 4, p / 2, p, 2 * p)
    expected = [(grid[0] * 4, grid[1] * 4), (grid[0] * 2, grid[1] * 2), grid, (math.ceil(grid[0] / 2), math.ceil(grid[1] / 2))]
    assert [tuple(f.shape[-2:]) for f in pyr] == expected
    assert all(f.shape[:2] == (2, 32) for f in pyr)


@pytest.mark.parametrize("name", HF_BACKBONES)
def test_backbone_from_pretrained_local_dir(name, tmp_path):
    cls = get_backbone_class(name)
    torch.manual_seed(1)
    hf_model = cls.model_class(cls.tiny_config())
    hf_model.save_pretrained(tmp_path)
    model = build_segmentation_model(
        name, model_name_or_path=str(tmp_path), decoder="linear", num_labels=NUM_LABELS
    )
    loaded = dict(model.backbone.model.named_parameters())
    saved = dict(hf_model.named_parameters())
    assert loaded, "no backbone parameters"
    for k, v in loaded.items():
        assert torch.equal(v, saved[k]), k
    out = model(**make_batch(h=2 * model.backbone.patch_size + 3, w=17))
    assert out.logits.shape == (2, NUM_LABELS, 2 * model.backbone.patch_size + 3, 17)


def test_pruning_drops_unused_blocks_and_head():
    cfg = tiny_backbone_config("dinov2", num_hidden_layers=6)
    bb = build_backbone("dinov2", config=cfg, out_indices=(0, 1, 2, 3))
    assert len(bb.blocks) == 4 and bb.num_layers == 6
    assert bb.model.layernorm is None
    full = build_backbone("dinov2", config=cfg, out_indices=(0, 1, 2, 3), prune=False)
    full.load_state_dict(bb.state_dict(), strict=False)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert all(torch.allclose(a, b) for a, b in zip(bb(x), full(x)))
    # every backbone parameter reaches the output (no unused parameters for DDP)
    model = make_model("dinov2")
    model(**make_batch()).loss.backward()
    missing = [n for n, p in model.backbone.named_parameters() if p.grad is None]
    assert not missing


# ------------------------------------------------------------------- decoders
@pytest.mark.parametrize("name", HF_BACKBONES)
def test_mask2former_logits_and_loss_every_backbone(name):
    model = make_model(name)
    batch = make_batch()
    out = model(**batch)
    assert out.logits.shape == (2, NUM_LABELS, 45, 61)
    assert torch.isfinite(out.loss)
    assert {"loss_mask", "loss_dice", "loss_cross_entropy"} <= set(out.loss_components)


@pytest.mark.parametrize("decoder", DECODERS)
def test_decoders_loss_backward_reaches_decoder_and_backbone(decoder):
    model = make_model("dinov2", decoder)
    out = model(**make_batch())
    assert out.logits.shape == (2, NUM_LABELS, 45, 61)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for part in model.decoder_module_names():
        grads = [p.grad for p in getattr(model, part).parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), part
    bb = [p.grad for p in model.backbone.parameters()]
    assert all(g is not None for g in bb) and any(g.abs().sum() > 0 for g in bb)

    frozen = make_model("dinov2", decoder)
    frozen.set_backbone_trainable(False)
    frozen(**make_batch()).loss.backward()
    assert all(p.grad is None for p in frozen.backbone.parameters())
    assert any(p.grad is not None for p in frozen.decode_head.parameters())


def test_mask2former_semantic_logits_match_definition():
    model = make_model("dinov2").eval()
    x = make_batch(h=32, w=40)["pixel_values"]
    with torch.no_grad():
        feats = model.pyramid(model.backbone(x))
        class_logits, mask_logits = model.decode_head(feats)
        out = model(pixel_values=x).logits
    cl, ml = class_logits[-1], mask_logits[-1]
    assert cl.shape == (2, 8, NUM_LABELS + 1) and ml.shape[-2:] == feats[0].shape[-2:]
    manual = torch.zeros(2, NUM_LABELS, *ml.shape[-2:])
    probs = cl.softmax(-1)
    for k in range(NUM_LABELS):
        manual[:, k] = (probs[:, :, k, None, None] * ml.sigmoid()).sum(1)
    assert torch.allclose(semantic_from_queries(cl, ml), manual, atol=1e-6)
    expected = nn.functional.interpolate(manual, size=(32, 40), mode="bilinear", align_corners=False)
    assert torch.allclose(out, expected, atol=1e-5)
    assert out.min() >= 0 and out.max() <= 1


def test_mask2former_targets_and_ignore():
    labels = torch.tensor([[[0, 0, 255], [3, 3, 255]], [[255, 255, 255], [255, 255, 255]]])
    masks, classes = labels_to_mask_targets(labels, num_labels=4)
    assert classes[0].tolist() == [0, 3] and masks[0].shape == (2, 2, 3)
    assert masks[0][:, :, 2].sum() == 0  # ignore pixels are in no mask
    assert classes[1].numel() == 0 and masks[1].shape == (0, 2, 3)
    with pytest.raises(ValueError, match=r"class ids \[7\] outside \[0, 4\)"):
        labels_to_mask_targets(torch.full((1, 2, 2), 7), num_labels=4)

    model = make_model("dinov2")
    batch = make_batch(ignore_rows=20)
    batch["labels"][1] = 255  # one image entirely unlabeled
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    bad = make_batch()
    bad["labels"][0, 10, 10] = NUM_LABELS
    with pytest.raises(ValueError, match="outside"):
        model(**bad)


def test_linear_head_cross_entropy_ignores_255():
    model = make_model("dinov2", "linear").eval()
    batch = make_batch(ignore_rows=10)
    with torch.no_grad():
        out = model(**batch)
    valid = batch["labels"] != 255
    logp = out.logits.log_softmax(1)
    manual = -logp.gather(1, batch["labels"].clamp(max=NUM_LABELS - 1)[:, None])[:, 0][valid].mean()
    assert torch.allclose(out.loss, manual, atol=1e-5)
    with torch.no_grad():
        all_ignored = model(pixel_values=batch["pixel_values"], labels=torch.full_like(batch["labels"], 255))
    assert all_ignored.loss.item() == 0.0


# ------------------------------------------------------- structure / PEFT API
@pytest.mark.parametrize("name", HF_BACKBONES)
def test_fisher_targets_are_block_linears(name):
    model = make_model(name)
    targets = model.fisher_target_modules()
    mods = dict(model.named_modules())
    block_ids = {id(m) for b in model.backbone.blocks for m in b.modules()}
    assert targets and all(isinstance(mods[t], nn.Linear) and id(mods[t]) in block_ids for t in targets)
    # every block Linear is a candidate, and nothing outside the backbone
    assert len(targets) == sum(isinstance(m, nn.Linear) for b in model.backbone.blocks for m in b.modules())
    more = model.fisher_target_modules(("linear", "patch_embed", "norm"))
    assert set(targets) < set(more)
    assert any(isinstance(mods[t], nn.Conv2d) for t in more) and any(isinstance(mods[t], nn.LayerNorm) for t in more)
    with pytest.raises(ValueError, match="kinds"):
        model.fisher_target_modules(("attention",))


def _check_groups(model: SegmentationModel):
    groups = model.param_groups(backbone_lr=1e-5, decoder_lr=1e-4, weight_decay=0.05)
    assert [g["name"] for g in groups] == ["backbone/decay", "backbone/no_decay", "decoder/decay", "decoder/no_decay"]
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == len(trainable)
    assert set(ids) == {id(p) for p in trainable}
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    for g in groups:
        in_backbone = [id(p) in backbone_ids for p in g["params"]]
        assert all(in_backbone) if g["name"].startswith("backbone") else not any(in_backbone)
        assert g["lr"] == (1e-5 if g["name"].startswith("backbone") else 1e-4)
        assert g["weight_decay"] == (0.05 if g["name"].endswith("/decay") else 0.0)
    torch.optim.AdamW(groups)  # accepted as is (empty groups included)
    return groups


@pytest.mark.parametrize("decoder", DECODERS)
def test_param_groups_cover_trainable_params_once(decoder):
    model = make_model("dinov2", decoder)
    groups = _check_groups(model)
    nwd = model.no_weight_decay()
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["name"].endswith("/decay") for p in g["params"]}
    assert not decayed & nwd
    assert "backbone.model.embeddings.position_embeddings" in nwd and "backbone.model.embeddings.cls_token" in nwd
    assert "backbone.model.encoder.layer.0.attention.q_proj.weight" in decayed
    assert "backbone.model.encoder.layer.0.attention.q_proj.bias" in nwd
    assert "backbone.model.encoder.layer.0.norm1.weight" in nwd
    if decoder == "mask2former":
        assert "decode_head.transformer_module.queries_embedder.weight" in nwd  # nn.Embedding
        assert any("cross_attn.in_proj_weight" in n for n in decayed)  # nn.MultiheadAttention
    model.set_backbone_trainable(False)
    groups = _check_groups(model)
    assert not groups[0]["params"] and not groups[1]["params"]
    with pytest.raises(ValueError, match="backbone_lr"):
        model.param_groups(backbone_lr=-1)


def test_peft_lora_wraps_exactly_the_decoder_modules():
    model = make_model("dinov2", "mask2former")
    targets = model.fisher_target_modules()
    cfg = peft.LoraConfig(r=2, target_modules=targets, modules_to_save=model.decoder_module_names())
    pm = peft.get_peft_model(model, cfg)
    base = pm.base_model.model
    wrapped = [n for n, m in base.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"]
    assert sorted(wrapped) == ["decode_head", "pyramid"]
    assert base.fisher_target_modules() == targets  # same names after wrapping
    out = pm(**make_batch())
    assert out.logits.shape == (2, NUM_LABELS, 45, 61)
    out.loss.backward()
    groups = _check_groups(base)
    assert len(groups[0]["params"]) == 2 * len(targets)  # lora_A + lora_B per target
    assert all(p.grad is not None for g in groups for p in g["params"])


def test_peft_fishertune_wraps_and_trains():
    from peft_fishertune import FisherTuneConfig

    model = make_model("dinov2", "mask2former")
    targets = model.fisher_target_modules()
    cfg = FisherTuneConfig(
        target_modules=targets, modules_to_save=model.decoder_module_names(), init_selection="random", delta_min=0.05
    )
    pm = peft.get_peft_model(model, cfg)
    base = pm.base_model.model
    assert base.fisher_target_modules() == targets
    pm(**make_batch()).loss.backward()
    groups = _check_groups(base)
    backbone = groups[0]["params"] + groups[1]["params"]
    assert backbone and all(p.grad is not None for p in backbone)
    assert all(not p.requires_grad for n, p in base.backbone.named_parameters() if n.endswith("base_layer.weight"))


def test_gradient_checkpointing_passthrough():
    model = make_model("dinov2", "linear")
    ref = model(**make_batch())
    ref.loss.backward()
    g_ref = model.backbone.blocks[0].mlp.fc1.weight.grad.clone()
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    out = model(**make_batch())
    out.loss.backward()
    assert torch.allclose(out.logits, ref.logits, atol=1e-6)
    assert torch.allclose(model.backbone.blocks[0].mlp.fc1.weight.grad, g_ref, atol=1e-6)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_segmentation_model_save_load_roundtrip(tmp_path):
    model = make_model("dinov2_registers", "mask2former").eval()
    model.save_pretrained(tmp_path)
    again = SegmentationModel.from_pretrained(str(tmp_path)).eval()
    x = make_batch()["pixel_values"]
    with torch.no_grad():
        assert torch.allclose(model(x).logits, again(x).logits)


# --------------------------------------------------------------------- errors
def test_clear_errors():
    with pytest.raises(ValueError, match="backbone='vit' is not registered"):
        build_segmentation_model("vit", backbone_config=tiny_backbone_config("dinov2"))
    with pytest.raises(ValueError, match="decoder='fcn'"):
        make_model("dinov2", "fcn")
    with pytest.raises(ValueError, match="exactly one of model_name_or_path"):
        build_segmentation_model("dinov2")
    with pytest.raises(TypeError, match="expects a Dinov2Config"):
        build_segmentation_model("dinov2", backbone_config=tiny_backbone_config("clip"))
    with pytest.raises(ValueError, match="out_indices"):
        build_backbone("dinov2", config=tiny_backbone_config("dinov2"), out_indices=(0, 2, 1, 3))
    with pytest.raises(ValueError, match="out_indices"):
        build_backbone("dinov2", config=tiny_backbone_config("dinov2"), out_indices=(0, 1, 2, 9))
    model = make_model("dinov2", "linear")
    with pytest.raises(ValueError, match=r"labels must have shape \(B, H, W\)"):
        model(pixel_values=torch.randn(1, 3, 16, 16), labels=torch.zeros(1, 8, 8, dtype=torch.long))


def test_eva02_without_timm_raises_naming_the_extra():
    if _timm_skip_reason() is None:
        pytest.skip("timm imports here; the missing-timm error path cannot be exercised")
    with pytest.raises(ImportError, match=r"peft-fishertune\[timm\]"):
        build_backbone("eva02", config=tiny_backbone_config("eva02"))


def test_activation_checkpointing_with_frozen_backbone_under_peft():
    model = make_model("dinov2", "linear")
    cfg = peft.LoraConfig(r=2, target_modules=model.fisher_target_modules(), modules_to_save=model.decoder_module_names())
    pm = peft.get_peft_model(model, cfg)
    pm.activation_checkpointing_enable()  # what Trainer(activation_checkpointing=True) calls
    assert pm.base_model.model.is_gradient_checkpointing
    pm(**make_batch()).loss.backward()
    lora = [p for n, p in pm.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)


@pytest.mark.parametrize("decoder", DECODERS)
def test_bf16_autocast_forward_backward(decoder):
    model = make_model("dinov2", decoder)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**make_batch())
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.decode_head.parameters() if p.requires_grad)
