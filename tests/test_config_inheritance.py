"""Config inheritance (issue 24 point 5): `_base_:` files merged key by key (mappings merged, lists replaced, the
including file wins), loops refused; the shipped paper configs share their model / pipeline / protocol base;
`configs/quick.yaml` shrinks any config in one extra file name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from script_modules import load_script

from peft_fishertune.training.config import ConfigError, load_config, merge, read_config_file, read_configs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PAPER = sorted(p for p in CONFIGS.glob("*_512x512_bs4.yaml"))
SHIPPED = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "quick.yaml")


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_merge_rules():
    base = {"a": {"x": 1, "y": [1, 2], "z": {"deep": 1, "keep": 2}}, "b": 1}
    update = {"a": {"y": [3], "z": {"deep": 9}}, "c": None}
    assert merge(base, update) == {"a": {"x": 1, "y": [3], "z": {"deep": 9, "keep": 2}}, "b": 1, "c": None}
    assert merge(base, {"a": {"_delete_": True, "x": 5}}) == {"a": {"x": 5}, "b": 1}
    assert base == {"a": {"x": 1, "y": [1, 2], "z": {"deep": 1, "keep": 2}}, "b": 1}  # inputs untouched


def test_base_files_merge_in_order_relative_to_the_including_file(tmp_path):
    _write(tmp_path / "bases" / "model.yaml", {"model": {"backbone": "dinov2", "decoder": "mask2former",
                                                         "decoder_config": {"num_queries": 100, "hidden_dim": 256}},
                                               "data": {"crop_size": [512, 512], "window": [512, 512]}})
    _write(tmp_path / "bases" / "data.yaml", "_base_: model.yaml\n"  # relative to bases/, not to the cwd
                                            "data: {crop_size: [256, 256], eval: [{name: a}, {name: b}]}\n")
    top = _write(tmp_path / "runs" / "run.yaml",
                 "_base_: [../bases/data.yaml]\n"
                 "model: {decoder_config: {num_queries: 8}}\n"
                 "data: {eval: [{name: c}]}\n")
    raw = read_config_file(top)
    assert raw == {"model": {"backbone": "dinov2", "decoder": "mask2former",
                             "decoder_config": {"num_queries": 8, "hidden_dim": 256}},  # merged key by key
                   "data": {"crop_size": [256, 256], "window": [512, 512],  # a later base wins over an earlier one
                            "eval": [{"name": "c"}]}}  # lists replace
    # a list of bases: later bases win over earlier ones, the file over both
    two = _write(tmp_path / "bases" / "two.yaml", "_base_: [data.yaml, model.yaml]\n")
    assert read_config_file(two)["data"]["crop_size"] == [512, 512]


@pytest.mark.parametrize("layout,match", [
    ({"a.yaml": "_base_: a.yaml\n"}, r"config inheritance loops: .*a.yaml -> .*a.yaml \(a file cannot be its own"),
    ({"a.yaml": "_base_: b.yaml\n", "b.yaml": "_base_: [c.yaml]\n", "c.yaml": "_base_: a.yaml\n"},
     r"config inheritance loops: .*a.yaml -> .*b.yaml -> .*c.yaml -> .*a.yaml"),
    ({"a.yaml": "_base_: missing.yaml\n"}, r"a.yaml: _base_ file '.*missing.yaml' does not exist \(a _base_ path is "
                                          r"relative to the file that names it\)"),
    ({"a.yaml": "_base_: 3\n"}, r"_base_=3: expected a file name or a list of file names"),
    ({"a.yaml": "_base_: b.yaml\n", "b.yaml": "- a list\n"}, r"b.yaml: the top level must be a mapping"),
])
def test_bad_inheritance_is_refused_naming_the_files(tmp_path, layout, match):
    for name, text in layout.items():
        _write(tmp_path / name, text)
    with pytest.raises(ConfigError, match=match):
        read_config_file(tmp_path / "a.yaml")


def test_a_diamond_is_not_a_loop(tmp_path):
    _write(tmp_path / "root.yaml", {"data": {"crop_size": [1, 1]}})
    _write(tmp_path / "l.yaml", "_base_: root.yaml\n")
    _write(tmp_path / "r.yaml", "_base_: root.yaml\n")
    assert read_config_file(_write(tmp_path / "top.yaml", "_base_: [l.yaml, r.yaml]\n")) == {"data": {"crop_size": [1, 1]}}


def test_paper_configs_share_one_base_for_model_data_pipeline_and_protocol():
    assert len(PAPER) >= 3
    resolved = {p.name: read_configs(p)[0] for p in PAPER}
    protocol = ("crop_size", "base_scale", "test_scale", "eval_mode", "window", "stride")
    first = next(iter(resolved.values()))
    for name, raw in resolved.items():
        assert "_base_" in yaml.safe_load(( CONFIGS / name).read_text()), name  # written once, in the base
        assert {k: raw["data"][k] for k in protocol} == {k: first["data"][k] for k in protocol}, name
        assert raw["model"]["model_name_or_path"] == "facebook/dinov2-large" and raw["model"]["decoder"] == "mask2former"
    gta = [raw for name, raw in resolved.items() if "gta2citybddmap" in name]
    assert len(gta) == 2 and gta[0]["data"] == gta[1]["data"]  # FisherTune and Rein: the same data, to the key


def test_paper_configs_as_before_inheritance():
    """The values the three files held before they shared a base (spot checks of each section)."""
    gta = read_configs(CONFIGS / "fishertune_dinov2-l_mask2former_gta2citybddmap_512x512_bs4.yaml")[0]
    assert gta["data"]["train"] == {"name": "gta5", "root": "data/gta5", "split": "all"}
    assert [e["name"] for e in gta["data"]["eval"]] == ["cityscapes", "bdd100k", "mapillary"]
    assert gta["data"]["stride"] == [341, 341] and gta["training"]["stage3_steps"] == 28000
    assert gta["training"]["bf16"] is True and gta["training"]["eval_steps"] == 8000
    assert gta["method"]["selection_update_steps"] == 100
    acdc = read_configs(CONFIGS / "fishertune_dinov2-l_mask2former_city2acdc_512x512_bs4.yaml")[0]
    assert [e.get("condition") for e in acdc["data"]["eval"]] == ["fog", "night", "rain", "snow"]
    assert "eval_strategy" not in acdc["training"] and acdc["training"]["save_steps"] == 4000
    rein = read_configs(CONFIGS / "rein_dinov2-l_mask2former_gta2citybddmap_512x512_bs4.yaml")[0]
    assert rein["model"]["decoder_config"] == {"num_queries": 100, "replace_query_feat": True}
    assert rein["training"]["stage1_steps"] == 40000 and rein["training"]["lr_scheduler_kwargs"]["power"] == 0.9


@pytest.mark.parametrize("config", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_quick_yaml_shrinks_every_shipped_config(config):
    quick = load_config([config, CONFIGS / "quick.yaml"], {"training.use_cpu": "true"}, check_paths=False)
    full = load_config(config, {"training.use_cpu": "true"}, check_paths=False)
    t = quick.training
    assert (t.stage1_steps, t.stage2_steps, t.stage3_steps, t.max_steps) == (4, 2, 4, 10)
    assert t.per_device_train_batch_size == 2 and t.save_strategy.value == "no" and t.eval_strategy.value == "no"
    assert quick.data.crop_size == [128, 128] and quick.data.window == [128, 128]
    assert all(e.max_images == 4 for e in quick.data.eval)
    # the model, the datasets and the method stay the config's
    assert quick.model == full.model and quick.data.train == full.data.train
    assert [e.root for e in quick.data.eval] == [e.root for e in full.data.eval]
    assert quick.method.name == full.method.name and quick.method.fishertune == full.method.fishertune
    assert quick.source == f"{config} + {CONFIGS / 'quick.yaml'}"


def test_quick_yaml_as_a_base_line(tmp_path):
    own = _write(tmp_path / "smoke.yaml", f"_base_: [{CONFIGS / 'demo.yaml'}, {CONFIGS / 'quick.yaml'}]\n")
    cfg = load_config(own, check_paths=False)
    assert cfg.training.stage3_steps == 4 and cfg.model.model_name_or_path == "standin:demo"


def test_train_script_takes_several_config_files(tmp_path):
    train = load_script("scripts/train.py", "train_script")
    demo, quick = str(CONFIGS / "demo.yaml"), str(CONFIGS / "quick.yaml")
    for argv in (["--config", demo, quick, "--training.seed", "3"],
                 ["--config", demo, "--training.seed", "3", "--config", quick],
                 ["--config=" + demo, "--config", quick, "--training.seed", "3"]):
        script, overrides = train.parse_command_line(argv)
        assert script.config == [demo, quick] and overrides == {"training.seed": "3"}, argv
