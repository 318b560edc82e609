"""`make demo`: the `standin:<preset>` backbones (resolve, cache, reuse, load), the demo config, and the report
the demo ends with, on a real (tiny) run that goes through the resolver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from script_modules import load_script

from peft_fishertune.standin import (
    STANDIN_PRESETS,
    is_standin_ref,
    resolve_standin,
    standin_cache_dir,
    standin_preset,
)
from peft_fishertune.standin.pretrain import INFO_NAME
from peft_fishertune.training import load_config, run_experiment
from peft_fishertune.training.experiment import build_base_model

ROOT = Path(__file__).resolve().parents[1]
demo_report = load_script("scripts/demo_report.py", "demo_report_script").demo_report


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("PEFT_FISHERTUNE_CACHE", str(root))
    return root


def test_quick_preset_resolves_caches_and_loads(cache, capsys):
    assert resolve_standin("facebook/dinov2-small") == "facebook/dinov2-small"  # not a preset: unchanged
    assert not is_standin_ref(None) and is_standin_ref("standin:quick")
    with pytest.raises(FileNotFoundError, match="not cached"):
        resolve_standin("standin:quick", build=False)

    path = Path(resolve_standin("standin:quick"))
    assert path == standin_cache_dir("quick") and path.parent == cache / "standin"
    assert "pretraining it now" in capsys.readouterr().out
    info = json.loads((path / INFO_NAME).read_text())
    assert info["settings"] == standin_preset("quick").to_dict()

    # a second resolve reuses the checkpoint (same file, not rewritten) and says so
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_standin("standin:quick") == str(path)
    assert "using the cached checkpoint" in capsys.readouterr().out
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime

    # the experiment's model builder goes through the resolver and loads the pretrained weights
    cfg = load_config(
        {"model": {"backbone": "dinov2", "model_name_or_path": "standin:quick", "decoder": "linear"},
         "data": {"train": {"name": "cityscapes", "root": str(cache), "split": "train"},
                  "eval": [{"name": "cityscapes", "root": str(cache), "split": "val"}]},
         "method": {"name": "fishertune"},
         "training": {"stage1_steps": 1, "stage2_steps": 1, "stage3_steps": 1}},
        check_paths=False,
    )
    seg = build_base_model(cfg)
    saved = load_file(str(path / "model.safetensors"))
    loaded = seg.backbone.model.state_dict()
    assert torch.equal(loaded["embeddings.patch_embeddings.projection.weight"],
                       saved["embeddings.patch_embeddings.projection.weight"])
    assert torch.equal(loaded["encoder.layer.3.mlp.fc2.weight"], saved["encoder.layer.3.mlp.fc2.weight"])


def test_presets_get_their_own_directory_per_settings(cache):
    assert set(STANDIN_PRESETS) >= {"demo", "default", "quick"}
    dirs = {name: standin_cache_dir(name) for name in STANDIN_PRESETS}
    assert len(set(dirs.values())) == len(dirs)
    assert dirs["demo"].name.startswith("demo-") and dirs["demo"].parent == cache / "standin"
    with pytest.raises(ValueError, match=r"unknown stand-in VFM preset 'dino'.*standin:demo"):
        resolve_standin("standin:dino")
    # the demo preset is the budget of `make demo`: much smaller than the benchmark's stand-in
    demo, full = standin_preset("demo"), standin_preset("default")
    assert demo.steps * demo.batch_size < full.steps * full.batch_size / 4


def test_concurrent_resolvers_pretrain_once(cache):
    code = "from peft_fishertune.standin import resolve_standin; print('PATH', resolve_standin('standin:quick'))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    paths = {line.split(" ", 1)[1] for out, _ in outs for line in out.splitlines() if line.startswith("PATH ")}
    assert paths == {str(standin_cache_dir("quick"))}
    assert sum("pretraining it now" in out for out, _ in outs) == 1  # the other one waited and reused it


def test_demo_config_is_valid_and_uses_the_demo_standin():
    cfg = load_config(ROOT / "configs" / "demo.yaml", check_paths=False)
    assert cfg.model.model_name_or_path == "standin:demo" and cfg.model.tiny_backbone is None
    pre = standin_preset("demo")
    assert cfg.model.backbone == "dinov2"
    for key in ("crop_size", "window", "test_scale"):
        assert all(v % pre.patch_size == 0 for v in getattr(cfg.data, key)), key
    # the demo trains on one style and tests on all others, each named in the table
    train_root = os.path.abspath(cfg.data.train.root)
    targets = [e for e in cfg.data.eval if os.path.abspath(e.root) != train_root]
    assert len(targets) == len(cfg.data.eval) - 1 >= 4
    assert not str(cfg.training.output_dir).startswith(str(Path.home() / ".cache"))


def test_a_run_on_a_standin_preset_ends_with_the_report(cache, tmp_path):
    """demo.yaml as shipped, shrunk (quick stand-in, tiny data, a few steps): the resolver builds the stand-in, the
    run trains through all three stages, and the report names the table, the gap and where everything went."""
    out = tmp_path / "run"
    data = tmp_path / "data"
    overrides = {
        "model.model_name_or_path": "standin:quick",
        "data.synthetic.root": str(data), "data.synthetic.num_images": {"train": 4, "val": 2},
        "data.synthetic.size": [128, 64], "data.synthetic.styles": ["clean", "fog"],
        "data.train.root": str(data / "clean"),
        "data.eval": [{"name": "cityscapes", "root": str(data / "clean"), "split": "val", "label": "clean (source)"},
                      {"name": "cityscapes", "root": str(data / "fog"), "split": "val", "label": "fog"}],
        "data.crop_size": [32, 32], "data.base_scale": [128, 64], "data.test_scale": [128, 64],
        "data.window": [64, 64], "data.stride": [48, 48],
        "training.output_dir": str(out), "training.stage1_steps": 2, "training.stage2_steps": 1,
        "training.stage3_steps": 2, "training.per_device_train_batch_size": 2, "training.report_to": [],
        "training.disable_tqdm": True, "training.logging_steps": 1,
    }
    config_path = ROOT / "configs" / "demo.yaml"
    result = run_experiment(load_config(config_path, overrides))
    assert set(result.table) == {"clean (source)", "fog"}
    report = demo_report(str(config_path), overrides)
    lines = report.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| clean (source) | fog | targets avg |"))
    cells = [float(c) for c in lines[header + 2].strip("| ").split(" | ")]
    assert cells[:2] == [round(result.table["clean (source)"], 1), round(result.table["fog"], 1)]
    gap = round(result.table["clean (source)"] - result.table["fog"], 1)
    assert f"a domain gap of {gap:.1f} points" in report
    assert f"adapter:    {out / 'adapter'}" in report and (out / "adapter").is_dir()
    assert f"base model: {standin_cache_dir('quick')} (stand-in VFM standin:quick)" in report
    assert f"results:    {out / 'results.json'}" in report
