"""The experiment config: typed sections, overrides typed by their field, and every config mistake reported before
anything is built (issue 11 points 7-11, issue 14 point 4)."""

from __future__ import annotations

import json
from pathlib import Path

import fixtures_data as fx
import pytest
import yaml
from script_modules import load_script

from peft_fishertune.data import DatasetFileError
from peft_fishertune.training import ConfigError, load_config
from peft_fishertune.training.config import parse_overrides
from peft_fishertune.training.experiment import _load
from peft_fishertune.training.trainer import FisherTuneTrainingArguments

ROOT = Path(__file__).resolve().parents[1]
GTA_CONFIG = ROOT / "configs" / "fishertune_dinov2-l_mask2former_gta2citybddmap_512x512_bs4.yaml"


def _script(name: str):
    return load_script(f"scripts/{name}.py", f"{name}_script")


@pytest.fixture(scope="module")
def cs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    fx.make_cityscapes(root, split="train")
    fx.make_cityscapes(root, split="val")
    return root


def tiny(cs, out) -> dict:
    return {
        "model": {"backbone": "dinov2", "decoder": "linear", "pyramid_channels": 8,
                  "tiny_backbone": {"hidden_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2,
                                    "intermediate_size": 32, "patch_size": 8, "image_size": 32}},
        "data": {"train": {"name": "cityscapes", "root": str(cs), "split": "train"},
                 "eval": [{"name": "cityscapes", "root": str(cs), "split": "val", "label": "source"}],
                 "crop_size": [16, 16], "base_scale": [80, 16], "test_scale": [80, 16], "eval_mode": "slide",
                 "window": [16, 16], "stride": [16, 16]},
        "method": {"name": "fishertune", "fishertune": {"delta_min": 0.05, "delta_max": 0.2, "fisher_mode": "batch"}},
        "training": {"output_dir": str(out), "stage1_steps": 1, "stage2_steps": 1, "stage3_steps": 1,
                     "per_device_train_batch_size": 2, "use_cpu": True, "report_to": [], "disable_tqdm": True,
                     "logging_steps": 1, "dataloader_num_workers": 0, "seed": 0},
    }


def _write(tmp_path, raw, name="c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p


# ------------------------------------------------------------------------------------------------ typing


def test_training_section_is_typed_with_the_run_defaults(cs, tmp_path):
    raw = tiny(cs, tmp_path / "o")
    for k in ("report_to", "disable_tqdm", "logging_steps"):
        raw["training"].pop(k)
    args = load_config(raw).training
    assert isinstance(args, FisherTuneTrainingArguments)
    # defaults of a FisherTune run live in the dataclass, not in setdefault calls
    assert args.lr_scheduler_type.value == "polynomial" and args.lr_scheduler_kwargs == {"power": 1.0, "lr_end": 0.0}
    assert args.save_strategy.value == "no" and args.remove_unused_columns is False
    assert args.report_to == ["tensorboard"]
    assert args.max_steps == 3 and args.learning_rate == args.decoder_lr == 1e-4 and args.backbone_lr == 1e-5


def test_command_line_overrides_are_typed_by_their_field(cs, tmp_path):
    raw = tiny(cs, tmp_path / "o")
    raw["data"]["eval"].append({"name": "cityscapes", "root": str(cs), "split": "val", "label": "second"})
    path = _write(tmp_path, raw)
    script, overrides = _script("train").parse_command_line([
        "--config", str(path),
        "--training.backbone_lr", "1e-5", "--training.save_strategy", "no", "--training.decoder_lr=3e-4",
        "--training.per_device_train_batch_size", "3", "--training.bf16", "false", "--training.report_to", "none",
        "--training.lr_scheduler_kwargs", '{"power": 2.0}',
        "--data.eval.1.root", str(tmp_path), "--data.eval.1.split", "test", "--data.photometric", "no",
        "--data.crop_size", "[32, 32]", "--model.pyramid_channels", "32",
        "--method.fishertune.delta_max", "0.5", "--method.fishertune.schedule", "cosine",
    ])
    assert script.config == [str(path)]
    cfg = load_config(path, overrides, check_paths=False)
    t = cfg.training
    assert t.backbone_lr == 1e-5 and isinstance(t.backbone_lr, float)
    assert t.save_strategy.value == "no"  # the string "no", not YAML's False
    assert t.learning_rate == 3e-4 and t.per_device_train_batch_size == 3 and t.bf16 is False and t.report_to == []
    assert t.lr_scheduler_kwargs == {"power": 2.0}
    # an indexed override changes one eval entry and nothing else
    assert [(e.root, e.split, e.label) for e in cfg.data.eval] == [(str(cs), "val", "source"),
                                                                   (str(tmp_path), "test", "second")]
    assert cfg.data.photometric is False and cfg.data.crop_size == [32, 32] and cfg.model.pyramid_channels == 32
    assert cfg.method.fishertune["delta_max"] == 0.5 and cfg.method.fishertune["schedule"] == "cosine"
    assert cfg.resolved["data"]["eval"][1]["root"] == str(tmp_path)  # the config as run
    again = load_config(yaml.safe_load(yaml.safe_dump(cfg.resolved)), check_paths=False)  # plain YAML, round trip
    assert again.training.backbone_lr == 1e-5 and again.training.save_strategy.value == "no"
    assert again.data.eval[1].split == "test" and again.method.fishertune == cfg.method.fishertune


@pytest.mark.parametrize("override,match", [
    (["--training.per_device_train_batch_size", "four"], r"training.per_device_train_batch_size='four': expected an integer"),
    (["--training.backbone_lr", "fast"], r"training.backbone_lr='fast': expected a number"),
    (["--training.save_strategy", "sometimes"], r"training.save_strategy='sometimes': expected one of \['no', 'steps'"),
    (["--training.warmup_stepz", "3"], r"training.warmup_stepz: unknown training argument; did you mean"),
    (["--model.num_labels", "19.5"], r"model.num_labels='19.5': expected an integer"),
    (["--data.photometric", "maybe"], r"data.photometric='maybe': expected true or false"),
    (["--method.fishertune.delta_max", "lots"], r"method.fishertune.delta_max='lots': expected a number"),
    (["--method.fishertune.schedule", "step"], r"method.fishertune.schedule='step': expected one of"),
    (["--method.fishertune.nonsense", "1"], r"method.fishertune has no key 'nonsense'; allowed: \[.*'delta_max'"),
    (["--data.eval.3.root", "x"], r"data.eval has 1 entries \(indices 0..0\)"),
    (["--data.eval.first.root", "x"], r"data.eval is a list; expected an index"),
    (["--data.crop_size", "[1, 2"], r"data.crop_size='\[1, 2': not a valid YAML"),
    (["--optimizer.lr", "1"], r"section one of"),
])
def test_bad_overrides_name_the_field(cs, tmp_path, override, match):
    path = _write(tmp_path, tiny(cs, tmp_path / "o"))
    with pytest.raises(ConfigError, match=match):
        load_config(path, parse_overrides(override))


def test_yaml_files_use_yaml12_scalars(cs, tmp_path):
    raw = tiny(cs, tmp_path / "o")
    text = yaml.safe_dump(raw) + ""
    text = text.replace("training:\n", "training:\n  save_strategy: no\n  backbone_lr: 1e-5\n  weight_decay: 5e-2\n")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    t = load_config(path).training
    assert t.save_strategy.value == "no" and t.backbone_lr == 1e-5 and t.weight_decay == 0.05


# ------------------------------------------------------------------------------------------------ config errors


def _mutations(tmp_path):
    nonmodel = tmp_path / "not_a_model"
    nonmodel.mkdir(exist_ok=True)
    (nonmodel / "weights.bin").write_bytes(b"")
    clip = tmp_path / "clip_model"
    clip.mkdir(exist_ok=True)
    (clip / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    empty = tmp_path / "empty_root"
    empty.mkdir(exist_ok=True)

    def hub(path):
        def f(r):
            r["model"].pop("tiny_backbone")
            r["model"]["model_name_or_path"] = str(path)
        return f

    return dict(case[:1] + (case[1:],) for case in [
        ("backbone", lambda r: r["model"].update(backbone="dinov9"), r"model.backbone='dinov9' is not registered"),
        ("decoder", lambda r: r["model"].update(decoder="segformer"), r"model.decoder='segformer' is not allowed"),
        ("dataset", lambda r: r["data"]["train"].update(name="gta"), r"data.train.name='gta' is not a registered dataset"),
        ("split", lambda r: r["data"]["eval"][0].update(split="validation"),
         r"data.eval\[0\].split='validation' is not a split of cityscapes"),
        ("condition", lambda r: r["data"]["eval"].append({"name": "acdc", "root": str(empty), "condition": "haze"}),
         r"data.eval\[1\].condition='haze' is not a condition of acdc"),
        ("layout", lambda r: r["data"]["eval"].append({"name": "bdd100k", "root": str(empty)}),
         r"data.eval\[1\]: bdd100k: neither images/10k/val[\s\S]*Expected:"),
        ("missing root", lambda r: r["data"]["train"].update(root=str(tmp_path / "nowhere")), r"does not exist"),
        ("missing model", hub(tmp_path / "no_such_dir"), r"does not exist \(neither a local checkpoint directory nor"),
        ("non-model dir", hub(nonmodel), r"holds no config.json: not a model checkpoint"),
        ("other model", hub(clip), r"holds a 'clip_vision_model' model, but model.backbone='dinov2'"),
        ("offline hub id", hub("nobody-here/no-such-model"),
         r"is a hub id, but the hub is offline[\s\S]*--local-dir[\s\S]*--model.model_name_or_path"),
        ("no eval", lambda r: r["data"].update(eval=[]), r"data.eval is empty"),
        ("train split", lambda r: r["data"]["train"].pop("split"), r"data.train.split is required"),
        ("same name", lambda r: r["data"]["eval"].append(dict(r["data"]["eval"][0], root=str(empty))),
         r"data.eval\[1\] and data.eval\[0\] have the same display name 'source'[\s\S]*label:"),
        ("on_fault", lambda r: r["data"]["train"].update(on_fault="ignore"), r"data.train.on_fault='ignore'"),
        ("verify", lambda r: r["data"]["train"].update(verify="deep"), r"data.train.verify='deep'"),
        ("size_mismatch", lambda r: r["data"]["eval"][0].update(size_mismatch="crop"), r"size_mismatch='crop'"),
        # issue 22: facts that used to fail after the model was built, or never
        ("delta never grows", lambda r: (r["training"].update(stage3_steps=4), r["method"].update(selection_update_steps=4)),
         r"method.selection_update_steps=4 is not smaller than the 4 training.stage3_steps: δ\(t\) .* never grow"),
        ("stride > window", lambda r: r["data"].update(stride=[24, 16]),
         r"data.stride=\[24, 16\] is larger than data.window=\[16, 16\] \(height\)"),
        ("batch 0", lambda r: r["training"].update(per_device_train_batch_size=0),
         r"training.per_device_train_batch_size=0 must be >= 1"),
        ("accumulation 0", lambda r: r["training"].update(gradient_accumulation_steps=0),
         r"training.gradient_accumulation_steps=0 must be >= 1"),
        ("alternating lora", lambda r: (r.update(method={"name": "lora"}), r["training"].update(alternate_steps=1)),
         r"training: alternate_steps=1: alternating execution needs a method that estimates"),
        ("rein coupling", lambda r: (r.update(method={"name": "rein", "rein": {"token_length": 4, "query_dims": 64}}),
                                     r["model"].update(decoder="mask2former",
                                                       decoder_config={"num_queries": 8, "hidden_dim": 32})),
         r"couples these settings:\n  - model.decoder_config.num_queries must equal method.rein.token_length=4 "
         r"\(now 8\)[\s\S]*\n  - method.rein.query_dims=64 must equal the decoder's width "
         r"model.decoder_config.hidden_dim=32[\s\S]*\n  - model.decoder_config.replace_query_feat is not true"),
        ("shallow tiny backbone", lambda r: r["model"]["tiny_backbone"].update(num_hidden_layers=2),
         r"model.tiny_backbone.num_hidden_layers=2: the decoder reads feature maps from 4 different blocks"),
        ("misspelt tiny key", lambda r: r["model"]["tiny_backbone"].update(num_hidden_layer=8),
         r"model.tiny_backbone: \['num_hidden_layer'\] are not fields of Dinov2Config \(they would be ignored\)"),
        ("out_indices", lambda r: r["model"].update(out_indices=[0, 1, 2, 9]),
         r"model.out_indices=\[0, 1, 2, 9\]: the tiny backbone has 4 blocks"),
    ])


CASES = ["backbone", "decoder", "dataset", "split", "condition", "layout", "missing root", "missing model",
         "non-model dir", "other model", "offline hub id", "no eval", "train split", "same name", "on_fault", "verify",
         "size_mismatch", "delta never grows", "stride > window", "batch 0", "accumulation 0", "alternating lora",
         "rein coupling", "shallow tiny backbone", "misspelt tiny key", "out_indices"]


@pytest.mark.parametrize("name", CASES)
def test_config_errors_come_before_anything_is_built(cs, tmp_path, capsys, name):
    cases = _mutations(tmp_path)
    assert sorted(cases) == sorted(CASES)
    mutate, match = cases[name]
    raw = tiny(cs, tmp_path / "never")
    mutate(raw)
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError, match=match):
        load_config(path)
    assert _script("train").main(["--config", str(path)]) == 2, name
    assert "config error:" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()  # no output folder, no base model: nothing was built


def test_selection_update_steps_below_the_tuning_steps_is_allowed(cs, tmp_path):
    raw = tiny(cs, tmp_path / "o")
    raw["training"]["stage3_steps"] = 4
    raw["method"]["selection_update_steps"] = 3  # δ(t) is recomputed at tuning step 3: it grows
    assert load_config(raw).method.selection_update_steps == 3
    raw["training"]["stage3_steps"] = 1
    raw["method"]["selection_update_steps"] = 1  # one tuning step: nothing to grow, and 1 is the finest setting
    load_config(raw)
    raw["data"]["eval_mode"] = "whole"  # no sliding window: the stride is not read
    raw["data"]["stride"] = [32, 32]
    load_config(raw)


def test_selection_update_steps_defaults_to_the_scaled_interval(cs, tmp_path):
    """Left out (or null), method.selection_update_steps is None: the trainer's schedule recomputes δ(t) every
    max(1, tuning steps // 1000) steps (tests/test_any_model.py); 0 is refused, naming the default."""
    from peft_fishertune.trainer.schedule import update_interval

    raw = tiny(cs, tmp_path / "o")
    raw["method"].pop("selection_update_steps", None)
    assert load_config(raw).method.selection_update_steps is None
    raw["method"]["selection_update_steps"] = None
    assert load_config(raw).method.selection_update_steps is None
    assert update_interval(28000) == 28 and update_interval(4) == 1
    raw["method"]["selection_update_steps"] = 0
    with pytest.raises(ConfigError, match=r"method.selection_update_steps=0 must be >= 1, or null for the default"):
        load_config(raw)


def test_rein_linking_needs_mask2former(cs, tmp_path):
    raw = tiny(cs, tmp_path / "o")  # a linear decoder
    raw["method"] = {"name": "rein", "rein": {"token_length": 8, "link_token_to_query": True}}
    with pytest.raises(ConfigError, match=r"link_token_to_query: true needs model.decoder: mask2former \(now 'linear'\)"):
        load_config(raw)
    for link in (None, False):  # None: linked exactly with Mask2Former; here not linked, nothing to couple
        raw["method"]["rein"]["link_token_to_query"] = link
        load_config(raw)


def test_rein_alone_warns_about_replace_query_feat(cs, tmp_path):
    raw = tiny(cs, tmp_path / "o")
    raw["method"] = {"name": "rein", "rein": {"token_length": 8}}
    raw["model"].update(decoder="mask2former", decoder_config={"num_queries": 8})
    with pytest.warns(UserWarning, match="replace_query_feat is not true"):
        load_config(raw)
    raw["model"]["decoder_config"]["replace_query_feat"] = True
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(raw)


def test_mapping_overrides_merge_into_the_files_mapping(cs, tmp_path):
    """issue 22: `--model.decoder_config '{...}'` replaced the whole mapping and silently dropped Rein's
    replace_query_feat. Mappings merge key by key (at any depth), lists replace, `_delete_: true` replaces."""
    raw = tiny(cs, tmp_path / "o")
    raw["model"]["decoder_config"] = {"num_queries": 100, "replace_query_feat": True}
    raw["data"]["synthetic"] = {"root": str(tmp_path / "syn"), "num_images": {"train": 48, "val": 8}}
    path = _write(tmp_path, raw)
    cfg = load_config(path, parse_overrides([
        "--model.decoder_config", '{"num_queries": 8, "hidden_dim": 32}',
        "--data.synthetic", '{"num_images": {"val": 2}}',
        "--method.fishertune", '{"delta_max": 0.5}',
        "--data.crop_size", "[32, 32]",
    ]), check_paths=False)
    assert cfg.model.decoder_config == {"num_queries": 8, "replace_query_feat": True, "hidden_dim": 32}
    assert cfg.data.synthetic == {"root": str(tmp_path / "syn"), "num_images": {"train": 48, "val": 2}}
    assert cfg.method.fishertune == {"delta_min": 0.05, "delta_max": 0.5, "fisher_mode": "batch"}
    assert cfg.data.crop_size == [32, 32]
    assert cfg.resolved["model"]["decoder_config"]["replace_query_feat"] is True  # the config as run keeps it
    # the same through the API (a mapping value, not text)
    cfg = load_config(path, {"model.decoder_config": {"hidden_dim": 32}}, check_paths=False)
    assert cfg.model.decoder_config == {"num_queries": 100, "replace_query_feat": True, "hidden_dim": 32}
    cfg = load_config(path, parse_overrides(["--model.decoder_config", '{"_delete_": true, "hidden_dim": 32}']),
                      check_paths=False)
    assert cfg.model.decoder_config == {"hidden_dim": 32}
    cfg = load_config(path, parse_overrides(["--model.decoder_config", "null"]), check_paths=False)
    assert cfg.model.decoder_config is None


def _run_script(args: list[str], launcher: list[str] | None = None, timeout: float = 300):
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = (launcher or [sys.executable]) + [str(ROOT / "scripts" / "train.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_config_error_exits_2_with_the_message_last(cs, tmp_path):
    raw = tiny(cs, tmp_path / "never")
    raw["data"]["stride"] = [24, 24]
    path = _write(tmp_path, raw)
    done = _run_script(["--config", str(path)])
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("config error: data.stride=[24, 24] is larger than")
    assert not (tmp_path / "never").exists()
    # a malformed override is a config error too (was a raw traceback)
    done = _run_script(["--config", str(path), "--data.stride"])
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == \
        "config error: override '--data.stride' has no value"


def test_config_error_under_accelerate_launch(cs, tmp_path):
    """Our process exits 2 with the message as its last line; accelerate's simple launcher then raises its own
    CalledProcessError (rc 1) naming exit status 2, unless launched with -q, which leaves our message last."""
    import shutil
    import sys

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed beside this python")
    raw = tiny(cs, tmp_path / "never")
    raw["training"]["per_device_train_batch_size"] = 0
    path = _write(tmp_path, raw)
    message = "config error: training.per_device_train_batch_size=0 must be >= 1"
    done = _run_script(["--config", str(path)], [accelerate, "launch", "--num_processes", "1", "--cpu"])
    assert done.returncode != 0 and message in done.stderr.splitlines()
    assert "returned non-zero exit status 2" in done.stderr  # our process's own exit code
    done = _run_script(["--config", str(path)], [accelerate, "launch", "-q", "--num_processes", "1", "--cpu"])
    assert done.returncode != 0 and done.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "never").exists()


def test_empty_eval_from_the_command_line(cs, tmp_path):
    path = _write(tmp_path, tiny(cs, tmp_path / "o"))
    with pytest.raises(ConfigError, match="data.eval is empty"):
        load_config(path, parse_overrides(["--data.eval", "[]"]))


def test_bf16_on_cpu_names_the_fix(cs, tmp_path):
    raw = tiny(cs, tmp_path / "o")
    raw["training"].update(bf16=True, use_cpu=False)
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bf16 is allowed")
    with pytest.raises(ConfigError, match=r"training: .*bf16.*--training.use_cpu true"):
        load_config(raw)


# ------------------------------------------------------------------------------------------------ data options


def test_data_fault_options_are_set_from_the_config(tmp_path):
    root = tmp_path / "cs"
    labels = fx.make_cityscapes(root, split="train")
    fx.make_cityscapes(root, split="val")
    labels[1].unlink()  # an image without its label
    raw = tiny(root, tmp_path / "o")
    with pytest.raises(DatasetFileError, match="1 of 4 images have no label"):
        _load(load_config(raw).data.train)
    raw["data"]["train"].update(on_fault="skip", verify="full", unknown_label="ignore", size_mismatch="resize_label")
    entry = load_config(raw).data.train
    assert entry.loader_options() == {"split": "train", "condition": None, "on_fault": "skip", "verify": "full",
                                      "unknown_label": "ignore", "size_mismatch": "resize_label"}
    with pytest.warns(UserWarning, match="no label file"):
        assert len(_load(entry)) == 3
    # verify="full", on_fault="skip" also drops a truncated image (its header reads fine)
    img = root / "leftImg8bit" / labels[2].relative_to(root / "gtFine").parent / \
        labels[2].name.replace("_gtFine_labelIds", "_leftImg8bit")
    img.write_bytes(img.read_bytes()[: len(img.read_bytes()) // 2])
    with pytest.warns(UserWarning, match=img.name):
        assert len(_load(entry)) == 2


def test_gta5_paper_config_trains_on_all_images_without_split_mat(tmp_path):
    roots = fx.make_official_roots(tmp_path)
    assert not (roots["gta5"] / "split.mat").exists()
    overrides = {"data.train.root": str(roots["gta5"]), "data.eval.0.root": str(roots["cityscapes"]),
                 "data.eval.1.root": str(roots["bdd100k"]), "data.eval.2.root": str(roots["mapillary"]),
                 "model.model_name_or_path": "null", "model.tiny_backbone": "{}", "training.use_cpu": "true"}
    cfg = load_config(GTA_CONFIG, overrides)
    assert cfg.data.train.name == "gta5" and cfg.data.train.split == "all"
    assert len(_load(cfg.data.train)) == 4  # every image of the tree


# ------------------------------------------------------------------------------------------------ evaluate.py


def test_evaluate_with_config_loads_the_base_the_adapter_was_trained_on(cs, tmp_path, capsys):
    from peft_fishertune.training import run_experiment

    out = tmp_path / "run"
    raw = tiny(cs, out)
    path = _write(tmp_path, raw)
    result = run_experiment(load_config(path))
    evaluate = _script("evaluate").main
    args = ["--config", str(path), "--adapter", result.adapter_dir, "--dataset", f"cityscapes:{cs}:val",
            "--window", "16", "--stride", "16", "--test-scale", "80", "16", "--json", str(tmp_path / "e.json")]
    assert evaluate(args) == 0
    assert "saved by the run beside the adapter" in capsys.readouterr().err
    (row,) = json.loads((tmp_path / "e.json").read_text()).values()
    assert row["mIoU"] == pytest.approx(result.table["source"], abs=1e-6)  # the trainer's own number
    # without the saved base, a random-init config is refused (rebuilding it would give other weights)
    (out / "base_model").rename(tmp_path / "moved")
    assert evaluate(args) == 2
    assert "random-init backbone" in capsys.readouterr().err


def test_help_lists_every_section_field(capsys):
    with pytest.raises(SystemExit) as exit_:
        _script("train").parse_command_line(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for key in ("--config", "--model.backbone", "--model.model_name_or_path", "--data.eval ", "--data.train.on_fault",
                "--data.train.verify", "--method.fishertune.<field>", "--training.stage1_steps",
                "--training.backbone_lr", "--training.lr_scheduler_type (SchedulerType | str, default 'polynomial')"):
        assert key in out, key
