"""Bad input through the command lines (issue 22, deliver 2 and 4): config faults stop `scripts/train.py` at config
time (exit 2, `config error: ...` last, nothing created), data faults under `accelerate launch` too, and
`scripts/evaluate.py` reports faulty evaluation files and a misspelt split in one line with exit 2 before it loads
a model. The data-side cases through the API and the in-process `train.py` are in tests/test_bad_inputs.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import fixtures_data as fx
import numpy as np
import pytest
import yaml
from PIL import Image
from script_modules import load_script

from peft_fishertune.data import checks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(checks.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(checks.LABEL_CHECK_ENV, raising=False)


def _script(name: str):
    return load_script(f"scripts/{name}.py", f"{name}_script_bad_inputs_cli")


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("cs")
    fx.make_cityscapes_scenes(root / "train", split="train", n=2)
    fx.make_cityscapes_scenes(root / "val", split="val", n=2)
    return root


def _raw(trees, out) -> dict:
    return {
        "model": {"backbone": "dinov2", "decoder": "linear", "pyramid_channels": 8,
                  "tiny_backbone": {"hidden_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2,
                                    "intermediate_size": 32, "patch_size": 8, "image_size": 32}},
        "data": {"train": {"name": "cityscapes", "root": str(trees / "train"), "split": "train"},
                 "eval": [{"name": "cityscapes", "root": str(trees / "val"), "split": "val"}],
                 "crop_size": [16, 16], "base_scale": [64, 32], "test_scale": [64, 32], "eval_mode": "slide",
                 "window": [16, 16], "stride": [16, 16]},
        "method": {"name": "fishertune", "fishertune": {"delta_min": 0.05, "delta_max": 0.2, "fisher_mode": "batch"}},
        "training": {"output_dir": str(out), "stage1_steps": 1, "stage2_steps": 1, "stage3_steps": 4,
                     "per_device_train_batch_size": 2, "use_cpu": True, "report_to": [], "disable_tqdm": True,
                     "logging_steps": 1, "dataloader_num_workers": 0, "seed": 0},
    }


def _rein(raw):
    raw["method"] = {"name": "rein", "rein": {"token_length": 4, "query_dims": 16}}
    raw["model"].update(decoder="mask2former", decoder_config={"num_queries": 8, "hidden_dim": 32})


# (what the user wrote, the overrides, what the last line must say); each was silent, late or a traceback
CONFIG_FAULTS = {
    "batch 0": ({}, ["--training.per_device_train_batch_size", "0"],
                "training.per_device_train_batch_size=0 must be >= 1"),
    "accumulation 0": ({}, ["--training.gradient_accumulation_steps", "0"], "gradient_accumulation_steps=0"),
    "stride > window": ({}, ["--data.stride", "[24, 16]"], "data.stride=[24, 16] is larger than data.window"),
    "short stage 3": ({}, ["--method.selection_update_steps", "4"],
                      "method.selection_update_steps=4 is not smaller than the 4 training.stage3_steps"),
    "peft_config field": ({"method": {"name": "supertuning", "peft_config": {"sparse": 0.9}}}, [],
                          "method.peft_config: ['sparse'] are not fields of SupertuningConfig"),
    "peft_config stray": ({"method": {"name": "lora", "peft_config": {"r": 4}}}, [],
                          "method.name='lora' does not read it"),
    "peft without config": ({"method": {"name": "peft"}}, [], "method.name='peft' needs method.peft_config"),
    "rein coupling": ("rein", [], "couples these settings"),
    "alternating lora": ({"method": {"name": "lora"}}, ["--training.alternate_steps", "1"],
                         "alternating execution needs a method that estimates"),
    "verify misspelt": ({}, ["--data.eval.0.verify", "ful"],
                        "data.eval[0].verify='ful' is not allowed; expected one of ['auto', 'none', 'headers', 'full']"),
}


@pytest.mark.parametrize("case", list(CONFIG_FAULTS))
def test_train_script_refuses_config_faults_before_anything_is_built(trees, tmp_path, case, capsys):
    change, overrides, message = CONFIG_FAULTS[case]
    raw = _raw(trees, tmp_path / "never")
    if change == "rein":
        _rein(raw)
    else:
        for section, values in change.items():
            raw[section] = {**raw[section], **values} if section != "method" else values
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    rc = _script("train").main(["--config", str(cfg), *overrides])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    last = err[err.rindex("config error: "):]
    assert message in last, last
    assert "Traceback" not in err and not (tmp_path / "never").exists()  # nothing created, nothing built


def test_data_error_under_accelerate_launch_is_the_last_line(trees, tmp_path):
    """`accelerate launch -q`: our data error is the last thing printed (accelerate, without -q, adds its own
    CalledProcessError traceback and exit 1 around our exit 2: docs/training.md)."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed beside this python")
    val = tmp_path / "val"
    labels = fx.make_cityscapes_scenes(val, split="val", n=2)
    Image.fromarray(np.stack([fx.street_labelids()] * 3, -1)).save(labels[0])  # a *_color.png copied over
    raw = _raw(trees, tmp_path / "out")
    raw["data"]["eval"][0]["root"] = str(val)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {**os.environ, checks.CACHE_ENV: str(tmp_path / "cache")}
    proc = subprocess.run([accelerate, "launch", "-q", "--num_processes", "1", "--cpu",
                           str(ROOT / "scripts" / "train.py"), "--config", str(cfg)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode != 0
    block = proc.stderr[proc.stderr.rindex("data error: "):]
    assert labels[0].name in block and "colour/multi-channel" in block and "Traceback" not in proc.stderr
    assert block.rstrip().splitlines()[-1].endswith("docs/data.md)")  # nothing after our message
    assert not (tmp_path / "out" / "base_model").exists()


# ------------------------------------------------------------------------------------------------ evaluate.py


def _evaluate(args, capsys) -> tuple[int, str]:
    rc = _script("evaluate").main([str(a) for a in args])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("kind", ["truncated_image", "label_16bit", "label_values"])
def test_evaluate_script_refuses_faulty_files_before_loading_a_model(tmp_path, kind, capsys):
    labels = fx.make_cityscapes_scenes(tmp_path / "val", split="val", n=2)
    image = Path(str(labels[1]).replace("gtFine", "leftImg8bit", 1).replace("_gtFine_labelIds", "_leftImg8bit"))
    if kind == "truncated_image":
        bad = image
        image.write_bytes(image.read_bytes()[:-300])
    elif kind == "label_16bit":
        bad = labels[1]
        Image.fromarray(fx.street_labelids().astype(np.uint16) * 300).save(bad)
    else:
        bad, raw = labels[1], fx.street_labelids()
        raw[0, :3] = 40
        fx.write_label(bad, raw)
    rc, err = _evaluate(["--model", tmp_path / "no_model_needed", "--dataset", f"cityscapes:{tmp_path / 'val'}:val",
                         "--window", 16, "--stride", 16, "--test-scale", 64, 32], capsys)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    assert bad.name in err and "faulty files (verify='full')" in err


def test_evaluate_script_misspelt_split_and_condition(tmp_path, capsys):
    fx.make_cityscapes_scenes(tmp_path / "val", split="val", n=1)
    rc, err = _evaluate(["--model", tmp_path, "--dataset", f"cityscapes:{tmp_path / 'val'}:vall"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "split='vall'" in err and "val" in err
    rc, err = _evaluate(["--model", tmp_path, "--dataset", f"acdc:{tmp_path}:val:smog"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "condition='smog'" in err and "fog" in err
    rc, err = _evaluate(["--model", tmp_path, "--dataset", f"cityscapes:{tmp_path / 'nowhere'}:val"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "nowhere" in err
