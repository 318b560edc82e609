"""Defaults that work without naming modules: FisherTuneConfig() per architecture, ReinConfig() on plain
transformers backbones, and the DR perturbation / cost note on token inputs (issue 21, deliverable 4)."""

from __future__ import annotations

import logging
import re
import warnings

import pytest
import torch
import transformers as T
from peft import get_peft_model
from torch import nn

import peft_fishertune as pf
from peft_fishertune.tuner.targets import TARGET_MODULES, default_target_modules

H = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
VIS = dict(image_size=32, patch_size=8)
TXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
           vocab_size=100)
SWIN = dict(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2,
            out_features=["stage1", "stage2", "stage3", "stage4"])


def _vit():
    return T.ViTForImageClassification(T.ViTConfig(**H, intermediate_size=64, **VIS, num_labels=3))


def _clip_text_vision():
    return T.CLIPModel(T.CLIPConfig(text_config=dict(**H, intermediate_size=64),
                                    vision_config=dict(**H, intermediate_size=64, **VIS)))


def _siglip():
    return T.SiglipModel(T.SiglipConfig(text_config=dict(**H, intermediate_size=64),
                                        vision_config=dict(**H, intermediate_size=64, **VIS)))


def _sam_vision():
    return T.SamVisionModel(T.SamVisionConfig(**H, mlp_dim=64, **VIS, output_channels=16, global_attn_indexes=[1],
                                              window_size=2))


def _mask2former():
    return T.Mask2FormerForUniversalSegmentation(T.Mask2FormerConfig(
        backbone_config=T.SwinConfig(**SWIN), hidden_dim=32, feature_size=32, mask_feature_size=32,
        encoder_feedforward_dim=64, dim_feedforward=64, decoder_layers=2, encoder_layers=1, num_queries=4,
        num_labels=3))


# (model_type, builder, the blocks' prefix (regex), the Linear leaves targeted inside each block)
ATTN_MLP = r"(attention\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(fc1|fc2))"
CASES = [
    ("vit", _vit, r"vit\.layers\.\d+\.", ATTN_MLP),
    ("dinov2", lambda: T.Dinov2ForImageClassification(T.Dinov2Config(**H, mlp_ratio=2, **VIS, num_labels=3)),
     r"dinov2\.encoder\.layer\.\d+\.", ATTN_MLP),
    ("dinov2_with_registers", lambda: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**H, mlp_ratio=2, **VIS)),
     r"encoder\.layer\.\d+\.", ATTN_MLP),
    ("dinov3_vit", lambda: T.DINOv3ViTModel(T.DINOv3ViTConfig(**H, intermediate_size=64, **VIS, use_gated_mlp=True)),
     r"model\.layer\.\d+\.", r"(attention\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"),
    ("clip", _clip_text_vision, r"(text|vision)_model\.encoder\.layers\.\d+\.",
     r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"),
    ("clip_vision_model", lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**H, intermediate_size=64, **VIS)),
     r"encoder\.layers\.\d+\.", r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"),
    ("siglip", _siglip, r"(text|vision)_model\.encoder\.layers\.\d+\.",
     r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"),
    ("siglip_vision_model", lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**H, intermediate_size=64, **VIS)),
     r"encoder\.layers\.\d+\.", r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"),
    ("sam_vision_model", _sam_vision, r"vision_encoder\.layers\.\d+\.", r"(attn\.(qkv|proj)|mlp\.(lin1|lin2))"),
    ("bert", lambda: T.BertForSequenceClassification(T.BertConfig(**H, intermediate_size=64, vocab_size=100,
                                                                   num_labels=2)),
     r"bert\.encoder\.layer\.\d+\.",
     r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"),
    ("llama", lambda: T.LlamaForCausalLM(T.LlamaConfig(**TXT)), r"model\.layers\.\d+\.",
     r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"),
    ("mistral", lambda: T.MistralForCausalLM(T.MistralConfig(**TXT)), r"model\.layers\.\d+\.",
     r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"),
    ("qwen2", lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**TXT)), r"model\.layers\.\d+\.",
     r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"),
    ("mask2former", _mask2former, r"model\.pixel_level_module\.encoder\.swin\.encoder\.layers\.\d+\.blocks\.\d+\.",
     ATTN_MLP),
]


@pytest.mark.parametrize("model_type, build, block, leaves", CASES, ids=[c[0] for c in CASES])
def test_default_target_modules_wrap_exactly_the_block_linears(model_type, build, block, leaves):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build()
    assert model.config.model_type == model_type
    want = {n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and re.fullmatch(block + leaves, n)}
    assert want, "the expectation matched no layer: the architecture's names changed"
    pm = get_peft_model(model, pf.FisherTuneConfig())
    got = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, pf.FisherTuneLayer)}
    assert got == want
    assert pm.peft_config["default"].target_modules is not None  # saved with the adapter
    # every wrapped layer is a Linear: q/k/v/o/MLP only, no head, pooler, embedding or projection
    assert all(type(m.get_base_layer()) is nn.Linear for m in pm.modules() if isinstance(m, pf.FisherTuneLayer))


def test_default_targets_cover_the_issue_list():
    for t in ("vit", "dinov2", "dinov2_with_registers", "dinov3_vit", "clip", "clip_vision_model", "siglip",
              "siglip_vision_model", "sam", "sam_vision_model", "eva02", "bert", "llama", "mistral", "qwen2",
              "mask2former"):
        assert t in TARGET_MODULES


def test_default_targets_eva02_timm_names():
    """timm is not installed here: the EVA02 entry is checked on a module tree with timm's Eva names."""
    class Attn(nn.Module):
        def __init__(self, fused):
            super().__init__()
            if fused:
                self.qkv = nn.Linear(8, 24)
            else:
                self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.proj = nn.Linear(8, 8)

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1_g, self.fc1_x, self.fc2 = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

    class Block(nn.Module):
        def __init__(self, fused):
            super().__init__()
            self.attn, self.mlp = Attn(fused), Mlp()

    class Eva(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = nn.Module()
            self.patch_embed.proj = nn.Conv2d(3, 8, 4)
            self.blocks = nn.ModuleList([Block(True), Block(False)])
            self.head = nn.Linear(8, 3)

    model = nn.Module()
    model.timm_model = Eva()
    model.config = T.PretrainedConfig()
    model.config.model_type = "timm_wrapper"
    model.config.architecture = "eva02_base_patch14_224"
    pattern = default_target_modules(model)
    hits = {n for n, _ in model.named_modules() if isinstance(pattern, str) and re.fullmatch(pattern, n)}
    assert hits == {"timm_model.blocks.0.attn.qkv", "timm_model.blocks.0.attn.proj", "timm_model.blocks.0.mlp.fc1_g",
                    "timm_model.blocks.0.mlp.fc1_x", "timm_model.blocks.0.mlp.fc2",
                    "timm_model.blocks.1.attn.q_proj", "timm_model.blocks.1.attn.k_proj",
                    "timm_model.blocks.1.attn.v_proj", "timm_model.blocks.1.attn.proj",
                    "timm_model.blocks.1.mlp.fc1_g", "timm_model.blocks.1.mlp.fc1_x", "timm_model.blocks.1.mlp.fc2"}


def test_default_targets_segmentation_model():
    from peft_fishertune.models.segmentor import build_segmentation_model, tiny_backbone_config

    seg = build_segmentation_model(backbone="dinov2", backbone_config=tiny_backbone_config("dinov2"), decoder="linear",
                                   num_labels=3)
    want = set(seg.fisher_target_modules())
    pm = get_peft_model(seg, pf.FisherTuneConfig())
    got = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, pf.FisherTuneLayer)}
    assert got == want and got


def test_no_default_names_the_model_type_and_real_names():
    model = T.OPTForCausalLM(T.OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                                         vocab_size=100, word_embed_proj_dim=32))
    with pytest.raises(ValueError, match=r"no default for model_type 'opt'.*Give target_modules.*'q_proj'"):
        get_peft_model(model, pf.FisherTuneConfig())


# ----------------------------------------------------------------------------- text models: DR term and cost
def _llama():
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             num_key_value_heads=2, intermediate_size=64, vocab_size=100))
    return model


def _token_batches(n=2, b=3, seq=8):
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 100, (b, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


@pytest.mark.parametrize("estimator", ["empirical", "variational"])
def test_dr_perturbation_goes_on_the_input_embeddings_of_a_text_model(estimator, caplog):
    """The default config on LlamaForCausalLM: no pixel_values, so x' perturbs get_input_embeddings()'s output
    (it raised FisherInputError "input_key='pixel_values' is not in the batch"); the log says where."""
    from peft_fishertune.fisher import estimate_dr_fim

    model = get_peft_model(_llama(), pf.FisherTuneConfig(fisher_estimator=estimator, fisher_mode="batch"))
    model.train()
    with caplog.at_level(logging.INFO, logger="peft_fishertune.fisher"):
        result = estimate_dr_fim(model, _token_batches(), config=model.peft_config["default"], progress=False)
    where = result.metadata["perturbed_where"]
    assert "input embeddings 'base_model.model.model.embed_tokens'" in where
    assert sum("input embeddings" in r.getMessage() for r in caplog.records) == 1  # logged once
    assert result.metadata["dr_term"] and float(sum(d.sum() for d in result.delta_f.values())) > 0


def test_perturbation_without_input_or_embeddings_names_the_fix():
    from peft_fishertune.fisher import FeaturePerturbation, FisherInputError

    class NoEmbeddings(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

    pert = FeaturePerturbation(0)
    with pytest.raises(FisherInputError, match=r"input_key='pixel_values' is not in the batch.*set perturb_at"):
        with pert.applied(NoEmbeddings(), {"x": torch.randn(2, 4)}, 0):
            pass


def test_per_sample_on_tokens_warns_once_about_the_cost(caplog):
    from peft_fishertune.fisher import make_estimator

    model = get_peft_model(_llama(), pf.FisherTuneConfig(fisher_estimator="empirical", lambda_dr=0.0))
    model.train()
    est = make_estimator(model, model.peft_config["default"])
    with caplog.at_level(logging.WARNING, logger="peft_fishertune.fisher"):
        for batch in _token_batches(n=2, b=2):
            est.step(batch)
    est.release()
    notes = [r for r in caplog.records if "fisher_mode='per_sample' on token inputs" in r.getMessage()]
    assert len(notes) == 1 and "fisher_mode='batch'" in notes[0].getMessage()


# ----------------------------------------------------------------------------- ReinConfig() on plain backbones
REIN_CASES = [
    ("dinov2", lambda: T.Dinov2Model(T.Dinov2Config(**H, mlp_ratio=2, **VIS)), "encoder.layer", 1),
    ("dinov2_classifier", lambda: T.Dinov2ForImageClassification(T.Dinov2Config(**H, mlp_ratio=2, **VIS,
                                                                                 num_labels=3)),
     "dinov2.encoder.layer", 1),
    ("dinov2_with_registers", lambda: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(
        **H, mlp_ratio=2, **VIS, num_register_tokens=2)), "encoder.layer", 3),
    ("dinov3_vit", lambda: T.DINOv3ViTModel(T.DINOv3ViTConfig(**H, intermediate_size=64, **VIS,
                                                              num_register_tokens=2)), "model.layer", 3),
    ("clip_vision_model", lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**H, intermediate_size=64, **VIS)),
     "encoder.layers", 1),
    ("siglip_vision_model", lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**H, intermediate_size=64, **VIS)),
     "encoder.layers", 0),
    ("sam_vision_model", _sam_vision, "vision_encoder.layers", 0),
]


@pytest.mark.parametrize("name, build, blocks, prefix", REIN_CASES, ids=[c[0] for c in REIN_CASES])
def test_rein_default_finds_the_blocks_of_a_transformers_backbone(name, build, blocks, prefix):
    """ReinConfig() without target_modules on a plain transformers backbone (it raised "the model holds 0 ([])")."""
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    last = model.get_submodule(blocks)[-1]
    seen = []
    handle = last.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(pixel_values=x)
    handle.remove()
    pm = get_peft_model(model, pf.ReinConfig(token_length=4, rank=2, init_weights=False))
    layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if type(m).__name__ == "ReinLayer"}
    assert list(layers) == [f"{blocks}.{i}" for i in range(H["num_hidden_layers"])]
    assert {m.num_prefix for m in layers.values()} == {prefix}
    assert pm.peft_config["default"].link_token_to_query is False  # nothing to link to: resolved, saved so
    wrapped = layers[f"{blocks}.{H['num_hidden_layers'] - 1}"]
    for module in (wrapped.base_layer, wrapped):  # the block's own output, then Rein's refinement of it
        module.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        pm(pixel_values=x)
    plain, block, refined = seen
    assert plain.shape == refined.shape and not torch.allclose(plain, refined)  # Rein changes the features
    assert not torch.allclose(block[:, prefix:], refined[:, prefix:])  # the patch tokens are refined
    if prefix:  # the prefix tokens (CLS, registers) pass unchanged
        torch.testing.assert_close(block[:, :prefix], refined[:, :prefix], rtol=0, atol=0)


def test_rein_default_on_an_unknown_model_names_the_fix():
    model = T.BertModel(T.BertConfig(**H, intermediate_size=64, vocab_size=100))
    with pytest.raises(ValueError, match=r"holds 0 adapters.*no such backbone; give target_modules"):
        get_peft_model(model, pf.ReinConfig(token_length=4, rank=2))


def test_rein_link_token_to_query_true_on_a_plain_backbone_is_refused():
    model = T.Dinov2Model(T.Dinov2Config(**H, mlp_ratio=2, **VIS))
    with pytest.raises(ValueError, match="link_token_to_query"):
        get_peft_model(model, pf.ReinConfig(token_length=4, rank=2, link_token_to_query=True))
