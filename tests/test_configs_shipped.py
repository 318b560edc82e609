"""Every config in configs/ runs as shipped through scripts/train.py, for a few steps per stage: only the model is
swapped for a tiny random-init one, the dataset roots point at fixture trees in the official layouts, and the
output goes to a temporary folder. Everything else (crop and test sizes, sliding window, batch size, bf16, data
workers, save / eval strategy, the method and its FisherTuneConfig) is the file's own, read through its `_base_`
files. `configs/quick.yaml` is not a config of its own (it shrinks another one): tests/test_config_inheritance.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import fixtures_data as fx
import pytest
from script_modules import load_script

from peft_fishertune.training.config import read_configs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "quick.yaml")

TINY_MODEL = [
    "--model.model_name_or_path", "null",
    "--model.tiny_backbone", '{"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, '
                             '"intermediate_size": 64, "patch_size": 16, "image_size": 64}',
    "--model.decoder_config", '{"feature_size": 32, "mask_feature_size": 32, "hidden_dim": 32, "num_queries": 8, '
                              '"decoder_layers": 2, "dim_feedforward": 64, "encoder_layers": 1, '
                              '"encoder_feedforward_dim": 64, "num_attention_heads": 2, "train_num_points": 256}',
    "--model.pyramid_channels", "16",
]
FEW_STEPS = ["--training.stage1_steps", "1", "--training.stage2_steps", "1", "--training.stage3_steps", "2"]


def _train_script():
    return load_script("scripts/train.py", "train_script")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return fx.make_official_roots(tmp_path_factory.mktemp("official"))


def test_there_are_paper_configs():
    names = [p.name for p in CONFIGS]
    assert "demo.yaml" in names and sum(n.startswith("fishertune_") for n in names) >= 2


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_runs(config, roots, tmp_path):
    raw, _ = read_configs(config)
    data = raw["data"]
    # point every dataset at the fixture tree of its name (the demo's synthetic domains are all Cityscapes layout)
    where = ["--data.train.root", str(roots[data["train"]["name"]])]
    for i, entry in enumerate(data["eval"]):
        where += [f"--data.eval.{i}.root", str(roots[entry["name"]])]
    if data.get("synthetic"):
        where += ["--data.synthetic", "null"]
    out = tmp_path / "run"
    argv = ["--config", str(config), *TINY_MODEL, *where, *FEW_STEPS, "--training.output_dir", str(out),
            "--training.use_cpu", "true"]  # this machine has no GPU (the paper configs ask for bf16)
    if raw["training"].get("eval_strategy", "no") != "no":
        # periodic evaluation as shipped: make it happen within the few steps
        argv += ["--training.eval_steps", "2"]
    if raw["method"]["name"] == "rein":  # its tokens are linked one for one to the tiny decoder's 8 queries
        # (the file's replace_query_feat: true stays: a mapping override merges into the file's decoder_config)
        argv += ["--method.rein", json.dumps({"token_length": 8, "query_dims": 32})]  # the tiny decoder's width
    if raw["method"].get("selection_update_steps", 1) > 1:  # δ(t) must grow within the 2 tuning steps
        argv += ["--method.selection_update_steps", "1"]
    rc = _train_script().main(argv)
    assert rc == 0
    _check_run(out, data, selects=raw["method"]["name"] != "rein")


def _check_run(out: Path, data: dict, selects: bool = True) -> None:
    results = json.loads((out / "results.json").read_text())
    labels = [e.get("label") or (f"{e['name']}/{e['condition']}" if e.get("condition") else e["name"])
              for e in data["eval"]]
    extra = set(results["table"]) - set(labels)  # aggregates such as ACDC's four conditions together
    assert set(labels) <= set(results["table"]) and all(k.endswith("-all") for k in extra), sorted(results["table"])
    assert all(0.0 <= v <= 100.0 for v in results["table"].values())
    assert results["settings"]["stages"] == [1, 1, 2]
    assert (out / "adapter" / "adapter_config.json").is_file()
    if selects:
        assert results["selection"]["num_active"] > 0
    else:  # Rein: no element selection; its adapter is a REIN adapter
        assert results["selection"] is None
        assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "REIN"
        # the test's decoder_config override merged into the file's: Rein's replace_query_feat kept (was dropped)
        decoder = json.loads((out / "base_model" / "segmentation_config.json").read_text())["decoder_config"]
        assert decoder["replace_query_feat"] is True and decoder["num_queries"] == 8
    assert os.path.isfile(out / "base_model" / "segmentation_config.json")  # random-init: kept beside the adapter
