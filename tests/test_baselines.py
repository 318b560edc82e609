"""The PEFT baselines of the method table (supertuning, shira, dora, soma, peft, magnitude) train through
scripts/train.py on a tiny model: what trains and how much, and that the saved adapter reloads onto the saved base
model with the trained model's outputs. SoMA's init (minor singular components, residual base) and the errors of
`method.peft_config` are checked on the wrapped model directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from script_modules import load_script

from peft_fishertune.training import ConfigError
from peft_fishertune.training.config import MethodSection

ROOT = Path(__file__).resolve().parents[1]
TINY = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64,
        "patch_size": 8, "image_size": 64}
DELTA_MAX = 0.2


def _train_script():
    return load_script("scripts/train.py", "train_script")


def _config(synth, out, method, peft_config=None) -> dict:
    m = {"name": method, "fishertune": {"delta_min": 0.02, "delta_max": DELTA_MAX, "fisher_mode": "batch"}}
    if peft_config is not None:
        m["peft_config"] = peft_config
    return {
        "model": {"backbone": "dinov2", "decoder": "linear", "pyramid_channels": 16, "tiny_backbone": TINY},
        "data": {"train": {"name": "cityscapes", "root": str(synth / "clean"), "split": "train"},
                 "eval": [{"name": "cityscapes", "root": str(synth / "fog"), "split": "val", "label": "fog",
                           "max_images": 1}],
                 "crop_size": [64, 64], "base_scale": [128, 64], "test_scale": [128, 64],
                 "eval_mode": "slide", "window": [64, 64], "stride": [48, 48]},
        "method": m,
        "training": {"output_dir": str(out), "stage1_steps": 1, "stage2_steps": 1, "stage3_steps": 2,
                     "per_device_train_batch_size": 2, "backbone_lr": 1e-2, "decoder_lr": 1e-3, "logging_steps": 1,
                     "use_cpu": True, "report_to": [], "disable_tqdm": True, "seed": 0, "save_merged_model": True},
    }


def _tiny_segmentor(seed=0):
    from peft_fishertune.models import build_segmentation_model, tiny_backbone_config

    torch.manual_seed(seed)
    return build_segmentation_model("dinov2", backbone_config=tiny_backbone_config("dinov2", **TINY),
                                    decoder="linear", num_labels=19, pyramid_channels=16)


def _targets(seg):
    mods = dict(seg.named_modules())
    return {t: tuple(mods[t].weight.shape) for t in seg.fisher_target_modules(("linear",))}


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=x).logits


PEFT_LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("method", ["supertuning", "shira", "dora", "soma", "peft", "magnitude"])
def test_baseline_trains_through_train_script_and_reloads(synth, tmp_path, method):
    from peft_fishertune.models import SegmentationModel
    from peft_fishertune.training.baselines import shira_rank, soma_start_block

    out = tmp_path / method
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_config(synth, out, "fishertune", PEFT_LORA if method == "peft" else None)))
    assert _train_script().main(["--config", str(cfg), "--method.name", method]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["method"] == method and 0.0 <= results["table"]["fog"] <= 100.0
    sd = load_file(out / "adapter" / "adapter_model.safetensors")
    base = SegmentationModel.from_pretrained(str(out / "base_model"))
    shapes = _targets(base)
    numel = sum(m * n for m, n in shapes.values())

    def keys(part):
        return {k: v for k, v in sd.items() if part in k}

    if method == "supertuning":  # int(δ_max · numel) entries of every targeted weight, trained
        values = keys("supertuning_values")
        assert len(values) == len(shapes)
        assert sum(v.numel() for v in values.values()) == sum(int(m * n * (1 - (1 - DELTA_MAX))) for m, n in shapes.values())
        assert all(v.abs().sum() > 0 for v in values.values())
    elif method == "shira":  # r·(m+n) per weight, r matched to δ_max of the targeted elements
        r = shira_rank(list(shapes.values()), DELTA_MAX)
        values = keys("shira_weight")
        total = sum(v.numel() for v in values.values())
        assert total == sum(r * (m + n) for m, n in shapes.values())
        assert abs(total - DELTA_MAX * numel) <= 0.5 * sum(m + n for m, n in shapes.values())
        assert all(v.abs().sum() > 0 for v in values.values())
    elif method == "dora":
        assert len(keys("lora_magnitude_vector")) == len(shapes) and len(keys("lora_B")) == len(shapes)
        assert all(v.abs().sum() > 0 for v in keys("lora_B").values())
    elif method == "soma":  # a plain LoRA of rank 2r over the pretrained base, blocks from round(8/24 · 4) = 1 on
        conf = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert conf["r"] == 32 and conf["lora_alpha"] == 32 and conf["peft_type"] == "LORA"
        assert json.loads((out / "adapter" / "soma.json").read_text())["rank"] == 16
        start = soma_start_block(4)
        adapted = {k.split(".lora_A")[0] for k in keys("lora_A")}
        assert start == 1 and len(adapted) == 6 * 3
        assert all(f".layer.{b}." not in k for k in adapted for b in range(start))
        assert len([k for k in sd if k.endswith("base_layer.bias")]) == 18  # the adapted layers' biases train
    elif method == "peft":  # exactly the layers the YAML names, inside the backbone
        assert {k.split(".")[-3] for k in keys("lora_A")} == {"q_proj", "v_proj"}
        assert len(keys("lora_A")) == 8 and all(v.shape[0] == 4 for v in keys("lora_A").values())
    elif method == "magnitude":  # FisherTune's selection with |w| scores: the active set is the top |w| (global)
        from peft_fishertune.tuner.storage import decode_layer

        by_layer: dict[str, dict] = {}
        for k, t in sd.items():
            if ".ft_" in k:
                layer, suffix = k.rsplit(".", 1)
                by_layer.setdefault(layer, {})[suffix] = t
        weights = dict(base.named_parameters())
        chosen, rest = [], []
        for layer, ts in by_layer.items():
            name = layer.replace("base_model.model.", "") + ".weight"
            flat, _ = decode_layer(layer, ts, tuple(weights[name].shape))
            w = weights[name].detach().abs().flatten()
            mask = torch.zeros_like(w, dtype=torch.bool)
            mask[flat] = True
            chosen.append(w[mask])
            rest.append(w[~mask])
        chosen, rest = torch.cat(chosen), torch.cat(rest)
        assert results["selection"]["num_active"] == chosen.numel() > 0
        assert chosen.min() >= rest.max()
    # save -> load: the adapter on the saved base model gives the trained model's outputs (merged_model/ was
    # written from the trained model in memory)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    merged = _logits(SegmentationModel.from_pretrained(str(out / "merged_model")), x)
    loaded = _logits(PeftModel.from_pretrained(base, str(out / "adapter")), x)
    assert torch.allclose(loaded, merged, atol=1e-4), (loaded - merged).abs().max()
    assert not torch.allclose(_logits(SegmentationModel.from_pretrained(str(out / "base_model")), x), merged,
                              atol=1e-4), "the run must have changed the model"


def test_soma_init_is_the_minor_components_and_keeps_the_output(tmp_path):
    from peft_fishertune.training.baselines import soma_targets
    from peft_fishertune.training.methods import get_method

    seg = _tiny_segmentor()
    x = torch.randn(1, 3, 64, 64)
    before = _logits(seg, x)
    pretrained = {n: m.weight.detach().clone() for n, m in seg.named_modules() if n in soma_targets(seg)}
    model, config = get_method("soma").wrap(seg, MethodSection(name="soma"), ("linear",))
    assert config.r == 16 and config.lora_alpha == 16 and len(pretrained) == 18
    assert torch.allclose(_logits(model, x), before, atol=1e-5)  # W_res + s·B A = W
    for name, w in pretrained.items():
        layer = model.get_submodule("base_model.model." + name)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        minor = U[:, -16:] @ torch.diag(S[-16:]) @ Vh[-16:]
        assert torch.allclose(b @ a, minor, atol=1e-5)  # the 16 smallest singular triplets, not the largest
        assert torch.allclose(a, torch.sqrt(S[-16:])[:, None] * Vh[-16:], atol=1e-5)
        assert torch.allclose(layer.get_base_layer().weight, w - minor, atol=1e-5)
        assert layer.get_base_layer().bias.requires_grad
    # blocks before round(8/24 · 4) = 1 are untouched
    assert not any(".layer.0." in n for n in model.soma_init)
    # save -> load into a fresh SoMA model (a resumed run) and onto the pretrained base (any PEFT loader)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    trained = _logits(model, x)
    model.save_pretrained(str(tmp_path / "ad"))
    onto_base = PeftModel.from_pretrained(_tiny_segmentor(), str(tmp_path / "ad"))
    assert torch.allclose(_logits(onto_base, x), trained, atol=1e-5)
    again, _ = get_method("soma").wrap(_tiny_segmentor(), MethodSection(name="soma"), ("linear",))
    again.load_adapter(str(tmp_path / "ad"), "default")
    for n, p in again.named_parameters():  # the trained biases come back too
        if "lora_" in n or "base_layer.bias" in n:
            assert torch.equal(p, dict(model.named_parameters())[n]), n
    assert torch.allclose(_logits(again, x), trained, atol=1e-5)
    other, _ = get_method("soma").wrap(_tiny_segmentor(seed=1), MethodSection(name="soma"), ("linear",))
    with pytest.raises(ValueError, match="trained from other base weights"):
        other.load_adapter(str(tmp_path / "ad"), "default")


def test_shira_layers_get_their_own_support_and_the_matched_rank():
    from peft_fishertune.training.baselines import shira_rank
    from peft_fishertune.training.methods import get_method

    seg = _tiny_segmentor()
    shapes = list(_targets(seg).values())
    model, config = get_method("shira").wrap(seg, MethodSection(name="shira", fishertune={"delta_max": 0.1}),
                                             ("linear",))
    assert config.r == shira_rank(shapes, 0.1) == round(0.1 * sum(m * n for m, n in shapes)
                                                        / sum(m + n for m, n in shapes))
    q = [m for n, m in model.named_modules() if n.endswith("attention.q_proj")]
    k = [m for n, m in model.named_modules() if n.endswith("attention.k_proj")]
    supports = {tuple(m.shira_indices["default"].flatten().tolist()) for m in q + k}
    assert len(supports) == len(q + k)  # peft's random_mask would give all 8 same-shaped layers one support


def test_supertuning_sparsity_follows_delta_max():
    from peft_fishertune.training.methods import get_method

    model, config = get_method("supertuning").wrap(_tiny_segmentor(), MethodSection(
        name="supertuning", fishertune={"delta_max": 0.05}, peft_config={"select_top": False}), ("linear",))
    assert config.sparsity == pytest.approx(0.95) and config.select_top is False
    layer = next(m for n, m in model.named_modules() if n.endswith("layer.0.mlp.fc1"))
    w = layer.get_base_layer().weight.detach().abs().flatten()
    idx = layer.supertuning_indices["default"].long()
    assert idx.numel() == int(w.numel() * 0.05 + 1e-9)
    assert w[idx].max() <= w[~torch.isin(torch.arange(w.numel()), idx)].min()  # select_top=False: the smallest


@pytest.mark.parametrize("method,peft_config,match", [
    ("peft", None, r"method.name='peft' needs method.peft_config"),
    ("peft", {"r": 4}, r"method.peft_config.peft_type is missing"),
    ("peft", {"peft_type": "NOPE"}, r"peft_type='NOPE' is not a PEFT method; expected one of \[.*'LORA'"),
    ("peft", {"peft_type": "LORA", "rank": 4}, r"\['rank'\] are not fields of LoraConfig"),
    ("peft", {"peft_type": "LORA", "target_modules": ["nope_proj"]}, r"'nope_proj' names no module of the backbone"),
    ("peft", {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}, r"prompt-learning"),
    ("peft", {"peft_type": "LORA", "r": 0}, r"method.peft_config \(LoraConfig\)"),
    ("fishertune", {"peft_type": "LORA"}, r"method.peft_config is set but method.name='fishertune' does not read"),
    ("soma", {"r": 4}, r"method.name='soma' builds its own LoRA config"),
    ("shira", {"peft_type": "LORA"}, r"peft_type='LORA', but method.name='shira' builds a ShiraConfig"),
    ("dora", {"alpha": 3}, r"\['alpha'\] are not fields of LoraConfig \(method.name='dora'\)"),
])
def test_peft_config_errors_name_the_field(method, peft_config, match):
    from peft_fishertune.training.methods import get_method

    with pytest.raises(ConfigError, match=match):
        get_method(method).wrap(_tiny_segmentor(), MethodSection(name=method, peft_config=peft_config), ("linear",))


def test_peft_short_target_names_stay_in_the_backbone():
    from peft.tuners.tuners_utils import BaseTunerLayer

    from peft_fishertune.training.methods import get_method

    seg = _tiny_segmentor()
    model, config = get_method("peft").wrap(seg, MethodSection(name="peft", peft_config={
        "peft_type": "IA3", "target_modules": ["fc2"], "feedforward_modules": []}), ("linear",))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    assert len(wrapped) == 4 and all(".backbone." in n and n.endswith("mlp.fc2") for n in wrapped)
    assert config.modules_to_save == ["decode_head"]


@pytest.mark.parametrize("method,peft_config,match", [
    ("peft", None, r"needs method.peft_config"),
    ("peft", {"peft_type": "NOPE"}, r"is not a PEFT method"),
    ("peft", {"peft_type": "LORA", "rank": 4}, r"\['rank'\] are not fields of LoraConfig"),
    ("lora", {"r": 4}, r"method.name='lora' does not read it"),
    ("soma", {"r": 4}, r"method.name='soma' does not read it"),
    ("supertuning", {"sparse": 0.9}, r"\['sparse'\] are not fields of SupertuningConfig"),
])
def test_peft_config_is_checked_without_a_model(method, peft_config, match):
    from peft_fishertune.training.baselines import check_peft_config

    with pytest.raises(ConfigError, match=match):
        check_peft_config(MethodSection(name=method, peft_config=peft_config))
    check_peft_config(MethodSection(name="supertuning", peft_config={"select_top": False}))  # a field: accepted
    check_peft_config(MethodSection(name="peft", peft_config={"peft_type": "IA3", "target_modules": ["fc2"]}))


def test_soma_run_resumes_from_its_checkpoint(synth, tmp_path):
    """The checkpoint holds the rank-2r adapter over the pretrained base; resuming loads it back into the residual
    model (SomaPeftModel.load_adapter) and ends where the uninterrupted run ended."""
    train = _train_script().main
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_config(synth, tmp_path / "full", "soma")))
    assert train(["--config", str(cfg), "--training.save_strategy", "steps", "--training.save_steps", "2",
                  "--training.save_merged_model", "false"]) == 0
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 32 and (ckpt / "soma.json").is_file()
    assert train(["--config", str(cfg), "--training.output_dir", str(tmp_path / "resumed"),
                  "--training.save_merged_model", "false", "--resume_from_checkpoint", str(ckpt)]) == 0
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
