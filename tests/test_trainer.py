"""The staged trainer end to end on tiny models and synthetic data: all three stages, resume equivalence,
a real 2-process run, baselines, and config errors that stop a run before training starts."""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file

from peft_fishertune.training import ConfigError, load_config, run_experiment

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(synth, out, *, decoder="linear", method="fishertune", stages=(2, 2, 3), **training):
    model = {"backbone": "dinov2", "decoder": decoder, "pyramid_channels": 16,
             "tiny_backbone": {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
                               "intermediate_size": 64, "patch_size": 8, "image_size": 64}}
    if decoder == "mask2former":
        model["decoder_config"] = {"feature_size": 32, "mask_feature_size": 32, "hidden_dim": 32, "num_queries": 8,
                                   "decoder_layers": 2, "dim_feedforward": 64, "encoder_layers": 1,
                                   "encoder_feedforward_dim": 64, "num_attention_heads": 2, "train_num_points": 256}
    return {
        "model": model,
        "data": {
            "train": {"name": "cityscapes", "root": str(synth / "clean"), "split": "train"},
            "eval": [{"name": "cityscapes", "root": str(synth / "clean"), "split": "val", "label": "clean"},
                     {"name": "cityscapes", "root": str(synth / "fog"), "split": "val", "label": "fog"}],
            "crop_size": [64, 64], "base_scale": [128, 64], "test_scale": [128, 64],
            "eval_mode": "slide", "window": [64, 64], "stride": [48, 48],
        },
        "method": {"name": method, "fishertune": {"delta_min": 0.02, "delta_max": 0.2, "fisher_mode": "batch"}},
        "training": {"output_dir": str(out), "stage1_steps": stages[0], "stage2_steps": stages[1],
                     "stage3_steps": stages[2], "per_device_train_batch_size": 2, "backbone_lr": 1e-3,
                     "decoder_lr": 1e-3, "logging_steps": 1, "use_cpu": True, "report_to": [],
                     "disable_tqdm": True, "seed": 0, **training},
    }


def _run(raw, **kw):
    return run_experiment(load_config(copy.deepcopy(raw)), **kw)


def test_tiny_demo_runs_all_three_stages(synth, tmp_path, capsys):
    raw = tiny_config(synth, tmp_path / "run", decoder="mask2former")
    result = _run(raw)
    # the selection line reports how much the DR term weighs: λ = 0.5 is half the score mass by construction
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("stage 3: selected"))
    assert "λ=0.5: ΔF term 0.50 of the score mass" in line, line
    assert 0.0 <= float(line.split(" in the top ")[0].rsplit(", ", 1)[1]) <= 1.0
    assert set(result.table) == {"clean", "fog"}
    assert all(0.0 <= v <= 100.0 for v in result.table.values())
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    stages = [int(r["stage"]) for r in rows if r.get("loss")]
    assert stages == [1, 1, 2, 2, 3, 3, 3]
    deltas = [float(r["delta"]) for r in rows if r.get("loss") and r.get("delta")]
    assert deltas[0] == pytest.approx(0.02) and deltas[-1] == pytest.approx(0.2) and deltas == sorted(deltas)
    # the selection ended at δ_max of the targeted elements
    assert result.selection["num_active"] == result.selection["num_candidates"]
    assert result.selection["active_fraction"] == pytest.approx(0.2, abs=1e-3)
    # the saved adapter reloads onto the saved base model and reproduces the trained model
    from peft_fishertune.models import SegmentationModel

    base = SegmentationModel.from_pretrained(str(tmp_path / "run" / "base_model"))
    loaded = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    trained = PeftModel.from_pretrained(SegmentationModel.from_pretrained(str(tmp_path / "run" / "base_model")),
                                        result.adapter_dir).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(pixel_values=x).logits, trained(pixel_values=x).logits)
        with loaded.disable_adapter():
            frozen = loaded(pixel_values=x).logits
    # the adapter changed the backbone: outputs differ from the same decoder on the frozen backbone
    assert not torch.allclose(frozen, trained(pixel_values=x).logits)
    assert "## FisherTune adapter" in (Path(result.adapter_dir) / "README.md").read_text()


def test_evaluate_and_predict_scripts_on_a_trained_run(synth, tmp_path):
    result = _run(tiny_config(synth, tmp_path / "run", stages=(1, 1, 2)))
    run = tmp_path / "run"
    common = ["--model", str(run / "base_model"), "--adapter", result.adapter_dir, "--window", "64", "--stride", "48",
              "--test-scale", "128", "64"]
    out_json = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), *common,
                           "--dataset", f"cityscapes:{synth / 'fog'}:val", "--json", str(out_json)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "slide 64/48, test scale 128x64" in proc.stdout
    evaluated = json.loads(out_json.read_text())
    (name, row), = evaluated.items()
    assert row["mIoU"] == pytest.approx(result.table["fog"], abs=1e-6)  # same numbers as the trainer's table
    preds = tmp_path / "preds"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict.py"), *common,
                           "--images", str(synth / "fog" / "leftImg8bit" / "val"), "--out", str(preds)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from PIL import Image

    files = sorted((preds / "trainIds").rglob("*.png"))  # the input tree mirrored (scripts/predict.py)
    assert len(files) == 2 and Image.open(files[0]).size == (128, 64) and Image.open(files[0]).mode == "L"
    assert len(list((preds / "overlay").rglob("*.png"))) == 2  # image blended with the prediction, and a legend
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--dataset", "cityscapes:x:val"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "exactly one of --model" in proc.stderr


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("stop_at", [3, 6], ids=["in-stage-2", "in-stage-3"])
def test_resume_gives_the_same_result(synth, tmp_path, stop_at):
    raw = tiny_config(synth, tmp_path / "full", stages=(2, 3, 3), save_strategy="steps", save_steps=1)
    _run(raw)
    ckpt = tmp_path / "full" / f"checkpoint-{stop_at}"
    assert (ckpt / "fishertune_state_rank0.pt").is_file()
    state = torch.load(ckpt / "fishertune_state_rank0.pt", weights_only=False)
    assert (state["estimator"] is not None) == (stop_at < 5)  # mid-stage-2 checkpoints carry the estimator
    assert (state["ft_state"]["selections"] == 1) == (stop_at >= 5)
    resumed = tiny_config(synth, tmp_path / "resumed", stages=(2, 3, 3), save_strategy="no")
    _run(resumed, resume_from_checkpoint=str(ckpt))
    a, b = _final_state(tmp_path / "full"), _final_state(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    assert json.loads((tmp_path / "full" / "results.json").read_text())["table"] == pytest.approx(
        json.loads((tmp_path / "resumed" / "results.json").read_text())["table"], abs=1e-6)


def test_two_process_run_has_identical_selections(synth, tmp_path):
    raw = tiny_config(synth, tmp_path / "ddp", stages=(1, 2, 2), save_strategy="steps", save_steps=2)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           str(ROOT / "scripts" / "train.py"), "--config", str(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sel = [json.loads((tmp_path / "ddp" / f"selection_rank{r}.json").read_text()) for r in (0, 1)]
    assert sel[0]["sha256"] == sel[1]["sha256"] and sel[0]["num_candidates"] > 0
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert results["settings"]["world_size"] == 2
    assert set(results["table"]) == {"clean", "fog"}
    # checkpoints written by both ranks, then marked complete and published once
    ckpt = tmp_path / "ddp" / "checkpoint-4"
    assert {"fishertune_complete.json", "fishertune_state_rank0.pt", "fishertune_state_rank1.pt",
            "rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in ckpt.iterdir()}
    assert not list((tmp_path / "ddp").glob("*.partial"))


@pytest.mark.parametrize("method", ["freeze", "full", "lora", "random", "fim", "drfim_empirical"])
def test_baselines_run_in_the_same_trainer(synth, tmp_path, method):
    from peft_fishertune.models import SegmentationModel

    raw = tiny_config(synth, tmp_path / method, method=method, stages=(1, 1, 2))
    result = _run(raw)
    assert set(result.table) == {"clean", "fog"}
    if method in ("random", "fim", "drfim_empirical"):
        assert result.selection["num_active"] > 0
        assert json.loads((tmp_path / method / "selection_rank0.json").read_text())["num_candidates"] > 0
    if method == "lora":
        sd = load_file(Path(result.adapter_dir) / "adapter_model.safetensors")
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in sd.items()), "LoRA B must have trained"
    if method in ("freeze", "full"):  # base_model/ is the model as built, before training
        initial = SegmentationModel.from_pretrained(str(tmp_path / method / "base_model")).backbone.state_dict()
        trained = SegmentationModel.from_pretrained(str(tmp_path / method / "model")).backbone.state_dict()
        changed = [k for k in initial if not torch.equal(initial[k], trained[k])]
        if method == "freeze":
            assert result.adapter_dir is None and result.selection is None and not changed
        else:
            assert len(changed) > len(initial) // 2, "full fine-tuning must move the backbone"


def _write(tmp_path, raw):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize("mutate,match", [
    (lambda r: r["model"].update(foo=1), r"model: unknown key\(s\) \['foo'\]"),
    (lambda r: r["training"].update(stage1_steps="ten"), r"training.stage1_steps='ten': expected an integer"),
    (lambda r: r["data"]["train"].update(root="/nonexistent/gta5"), r"data.train.root='/nonexistent/gta5' does not exist"),
    (lambda r: r["training"].update(max_steps=100), r"max_steps=100 does not equal .* = 7"),
    (lambda r: r["method"].update(name="adapterx"), r"method.name='adapterx' is not allowed"),
    (lambda r: r["method"]["fishertune"].update(delta_min=0.5), r"method.fishertune: .*delta_min=0.5 is larger than delta_max"),
    (lambda r: r["data"].update(crop_size=512), r"data.crop_size=512 has type int; expected list"),
    (lambda r: r.update(extra={}), r"unknown top-level key\(s\) \['extra'\]"),
    (lambda r: r["training"].pop("stage2_steps"), r"training.stage2_steps is required"),
])
def test_bad_config_fails_before_training(synth, tmp_path, mutate, match):
    raw = tiny_config(synth, tmp_path / "never")
    mutate(raw)
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path, raw))
    assert not (tmp_path / "never").exists()


def test_train_script_reports_config_errors_and_overrides(synth, tmp_path):
    raw = tiny_config(synth, tmp_path / "never")
    path = _write(tmp_path, raw)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(path),
                           "--training.stage3_steps", "oops"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config error: training.stage3_steps='oops': expected an integer" in proc.stderr
    cfg = load_config(path, {"model.decoder": "mask2former", "data.crop_size": [32, 32]})
    assert cfg.model.decoder == "mask2former" and cfg.data.crop_size == [32, 32]


def test_bf16_and_gradient_checkpointing_through_all_stages(synth, tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    calls = []
    original = mu.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(mu, "checkpoint", counting)  # what activation_checkpointing_enable binds
    raw = tiny_config(synth, tmp_path / "bf16", stages=(1, 1, 2), bf16=True, activation_checkpointing=True,
                      activation_checkpointing_kwargs={"use_reentrant": False})
    result = _run(raw)
    assert result.selection["num_active"] > 0
    assert all(0.0 <= v <= 100.0 for v in result.table.values())
    rows = list(csv.DictReader(open(tmp_path / "bf16" / "log.csv")))
    losses = [float(r["loss"]) for r in rows if r.get("loss")]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert calls, "activation checkpointing must have been active"


@pytest.mark.parametrize("decoder", ["linear", "mask2former"])
def test_rein_row_trains_rein_and_the_decoder_from_the_first_step(synth, tmp_path, decoder):
    """method.name: rein — Rein's parameters and the decoder train from step 0; the base backbone never moves;
    the saved adapter is a REIN adapter holding Rein's (trained) tokens; with Mask2Former the queries are linked."""
    from peft_fishertune.models import SegmentationModel
    from peft_fishertune.rein import get_rein_segmentation_model

    out = tmp_path / decoder
    raw = tiny_config(synth, out, decoder=decoder, method="rein", stages=(3, 0, 0))
    raw["method"] = {"name": "rein", "rein": {"token_length": 8, "rank": 4}}
    result = _run(raw)
    assert set(result.table) == {"clean", "fog"}
    adapter = Path(result.adapter_dir)
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "REIN"
    saved = load_file(adapter / "adapter_model.safetensors")
    # the same base wrapped as the trainer wraps it (query linking follows the decoder)
    base = SegmentationModel.from_pretrained(str(out / "base_model"))
    fresh = get_rein_segmentation_model(base, {"token_length": 8, "rank": 4})
    reloaded = PeftModel.from_pretrained(SegmentationModel.from_pretrained(str(out / "base_model")), str(adapter))
    scale = [v for k, v in saved.items() if k.endswith("rein_shared.scale") or k.endswith(".scale")]
    assert scale and all(float(s.reshape(-1)[0]) != 1e-3 for s in scale), "Rein's scale s must have trained"
    # the frozen backbone weights are the base model's, bit for bit
    base_sd = SegmentationModel.from_pretrained(str(out / "base_model")).backbone.state_dict()
    trained_bb = reloaded.base_model.model.backbone
    for name, p in trained_bb.named_parameters():
        key = name.replace(".base_layer", "")
        if key in base_sd:
            assert torch.equal(p.detach(), base_sd[key]), f"{name} moved although the backbone is frozen"
    assert fresh.peft_config["default"].link_token_to_query == (decoder == "mask2former")


def test_the_prior_pull_uses_the_training_set_size(synth, tmp_path):
    """Eq. 7 sums the likelihood over the N training samples; the trainer's loss is a mean, so its pull is
    γ/(N·τ²)·Σδ²/2 with N = the distinct training images (6 here), not the literal γ/τ²."""
    from peft_fishertune.fisher import prior_pull_loss
    from peft_fishertune.training.experiment import build_data, build_model, build_trainer, training_arguments

    cfg = load_config(copy.deepcopy(tiny_config(synth, tmp_path / "run", stages=(1, 1, 2))))
    args = training_arguments(cfg)
    model, ft_config = build_model(cfg)
    train, evals = build_data(cfg, 8, 0)
    trainer = build_trainer(cfg, model, ft_config, train, evals, args)
    assert trainer._prior_num_samples() == 6
    trainer.train()
    literal = float(prior_pull_loss(model, num_samples=1).detach())  # the literal scale γ/τ², said explicitly
    assert literal > 0
    assert float(prior_pull_loss(model, num_samples=trainer._prior_num_samples()).detach()) == pytest.approx(
        literal / 6, rel=1e-5)
