"""What a training run writes from its final evaluation (training/run_outputs.py): results.{md,csv,json} with the
class x domain tables in percent, written by EvaluationTable.write as scripts/evaluate.py writes them; the pictures
of predictions in pictures/ and TensorBoard; data.eval_protocol in a run (the preset's transform and TTA)."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from script_modules import load_script
from test_trainer import tiny_config

from peft_fishertune.training import ConfigError, load_config, run_experiment

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_GTA = ROOT / "configs" / "fishertune_dinov2-l_mask2former_gta2citybddmap_512x512_bs4.yaml"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster on the shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _script(name: str):
    return load_script(f"scripts/{name}.py", f"{name}_script")


def _run(raw, **kw):
    return run_experiment(load_config(copy.deepcopy(raw)), **kw)


def _tensorboard_tags(logdir: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, list[str]] = {"images": [], "scalars": []}
    for events in logdir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        for k in tags:
            tags[k] += acc.Tags()[k]
    return tags


def test_results_files_are_the_per_class_tables_evaluate_py_writes(synth, tmp_path, capsys):
    out = tmp_path / "run"
    raw = tiny_config(synth, out, stages=(1, 1, 2), eval_strategy="steps", eval_steps=2,
                      report_to=["tensorboard"], pictures_per_domain=2)
    result = _run(raw)
    printed = capsys.readouterr().out
    # the printed final table has the class x domain IoU table and names the protocol
    assert "final evaluation, mIoU / aAcc / mAcc (%): fishertune, protocol custom: slide 64/48" in printed
    assert "| class (IoU %) | clean | fog | avg |" in printed and "| traffic light |" in printed
    md = (out / "results.md").read_text()
    assert md.startswith("final evaluation, mIoU / aAcc / mAcc (%): fishertune, protocol custom: slide 64/48, "
                         "test scale 128x64, no TTA")
    for line in ("| metric | clean | fog | avg |", "| class (IoU %) | clean | fog | avg |",
                 "| class (Acc %) | clean | fog | avg |",
                 "avg = mean of the per-domain mIoUs (as the papers average) over 2 target domains"):
        assert line in md, line
    rows = list(csv.reader((out / "results.csv").read_text().splitlines()))
    assert rows[0] == ["metric", "class", "clean", "fog", "avg"]
    assert [r[0] for r in rows[1:]] == ["IoU"] * 19 + ["Acc"] * 19 + ["mIoU", "aAcc", "mAcc", "images"]
    saved = json.loads((out / "results.json").read_text())
    ev = saved["evaluation"]
    assert ev["units"] == "percent" and ev["protocol"] == "custom: slide 64/48, test scale 128x64, no TTA"
    assert ev["mean_definition"].startswith("avg = mean of the per-domain mIoUs")
    assert saved["table"] == pytest.approx(result.table) and set(result.table) == {"clean", "fog"}
    fog = ev["domains"]["fog"]
    assert fog["mIoU"] == pytest.approx(result.table["fog"]) and len(fog["per_class_iou"]) == 19
    assert all(v is None or 0 <= v <= 100 for v in fog["per_class_iou"].values())
    assert 0 <= fog["aAcc"] <= 100 and 0 <= fog["mAcc"] <= 100
    assert ev["mean_mIoU"] == pytest.approx((result.table["clean"] + result.table["fog"]) / 2)
    assert saved["settings"]["eval_protocol"] == "custom" and saved["warnings"] == []
    # periodic evaluations log aAcc and mAcc beside mIoU
    logged = [r for r in csv.DictReader(open(out / "log.csv")) if r.get("eval_mIoU")]
    assert logged and all(r["eval_aAcc"] and r["eval_mAcc"] and r["eval_fog_mAcc"] for r in logged)
    # pictures: a PNG per target domain, and in TensorBoard under pictures/<domain>
    assert set(result.pictures) == {"clean", "fog"} and saved["pictures"] == result.pictures
    from PIL import Image

    pic = Image.open(out / "pictures" / "fog.png")
    assert pic.mode == "RGB" and pic.size[0] > 4 * 320  # four columns of 320 px tiles
    assert {"pictures/clean", "pictures/fog"} <= set(_tensorboard_tags(out / "runs")["images"])
    # scripts/evaluate.py on the saved adapter writes the same numbers into the same files
    ev_out = tmp_path / "eval"
    rc = _script("evaluate").main(["--model", str(out / "base_model"), "--adapter", str(out / "adapter"),
                                   "--dataset", f"fog=cityscapes:{synth / 'fog'}:val", "--window", "64",
                                   "--stride", "48", "--test-scale", "128", "64", "--output-dir", str(ev_out)])
    assert rc == 0
    theirs = json.loads((ev_out / "results.json").read_text())["evaluation"]["domains"]["fog"]
    assert theirs.keys() == fog.keys() and theirs["images"] == fog["images"] == 2
    for key in ("mIoU", "aAcc", "mAcc"):
        assert theirs[key] == pytest.approx(fog[key], abs=1e-6)
    assert [theirs["per_class_iou"][c] is None for c in theirs["per_class_iou"]] == \
        [fog["per_class_iou"][c] is None for c in fog["per_class_iou"]]
    assert [v for v in theirs["per_class_iou"].values() if v is not None] == pytest.approx(
        [v for v in fog["per_class_iou"].values() if v is not None], abs=1e-6)


def test_a_picture_failure_warns_and_keeps_the_results(synth, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "pictures").write_text("a file where the pictures folder goes")  # a real failure: no folder there
    result = _run(tiny_config(synth, out, stages=(1, 1, 1), pictures_per_domain=1))
    printed = capsys.readouterr().out
    assert "warning: could not write pictures/: FileExistsError" in printed
    saved = json.loads((out / "results.json").read_text())
    assert any(w.startswith("pictures/: FileExistsError") for w in saved["warnings"]) and saved["pictures"] == {}
    assert "| class (IoU %) |" in (out / "results.md").read_text() and result.table
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_pictures_per_domain_zero_writes_none_and_negative_is_refused(synth, tmp_path):
    raw = tiny_config(synth, tmp_path / "run", stages=(1, 1, 1), pictures_per_domain=0)
    result = _run(raw)
    assert result.pictures == {} and not (tmp_path / "run" / "pictures").exists()
    raw["training"]["pictures_per_domain"] = -1
    with pytest.raises(ConfigError, match=r"pictures_per_domain=-1: expected an integer >= 0"):
        load_config(raw)


# ----------------------------------------------------------------------------------------- data.eval_protocol


def _protocol_config(synth, out, protocol, **training):
    raw = tiny_config(synth, out, stages=(1, 1, 1), **training)
    for key in ("test_scale", "eval_mode", "window", "stride"):
        raw["data"].pop(key)
    raw["data"]["eval_protocol"] = protocol
    return raw


def test_a_run_evaluates_with_the_protocols_transform_and_tta(synth, tmp_path, capsys):
    """soma-tta: the image as loaded (128x64 here), slide 512/341, 6 scales x flip; the table names it, and the
    numbers are evaluate.py --protocol soma-tta's on the saved adapter (so the trainer used the preset's TTA)."""
    out = tmp_path / "run"
    result = _run(_protocol_config(synth, out, "soma-tta", pictures_per_domain=1))
    want = "soma-tta: slide 512/341, image as loaded, TTA scales 0.5, 0.75, 1, 1.25, 1.5, 1.75 + flip"
    assert f"protocol {want}" in capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    assert saved["evaluation"]["protocol"] == want and saved["settings"]["eval_protocol"] == "soma-tta"
    assert saved["settings"]["test_scale"] == {"clean": None, "fog": None}
    assert (out / "results.md").read_text().splitlines()[0].endswith(f"protocol {want}")
    ev_out = tmp_path / "eval"
    rc = _script("evaluate").main(["--model", str(out / "base_model"), "--adapter", str(out / "adapter"),
                                   "--dataset", f"fog=cityscapes:{synth / 'fog'}:val", "--protocol", "soma-tta",
                                   "--output-dir", str(ev_out)])
    assert rc == 0
    theirs = json.loads((ev_out / "results.json").read_text())["evaluation"]
    assert theirs["protocol"] == want
    assert theirs["domains"]["fog"]["mIoU"] == pytest.approx(result.table["fog"], abs=1e-6)
    # without TTA the number differs: the preset's TTA was in the trainer's evaluation
    ev_plain = tmp_path / "eval_plain"
    rc = _script("evaluate").main(["--model", str(out / "base_model"), "--adapter", str(out / "adapter"),
                                   "--dataset", f"fog=cityscapes:{synth / 'fog'}:val", "--window", "512",
                                   "--stride", "341", "--test-scale", "128", "64", "--output-dir", str(ev_plain)])
    assert rc == 0
    plain = json.loads((ev_plain / "results.json").read_text())["evaluation"]["domains"]["fog"]
    assert plain["aAcc"] != pytest.approx(theirs["domains"]["fog"]["aAcc"], abs=1e-9)


@pytest.mark.parametrize("data, match", [
    ({"eval_protocol": "reinn"},
     r"data.eval_protocol='reinn' is not a known protocol; expected one of \['rein', 'rein-1024', 'soma', "),
    ({"eval_protocol": "rein", "test_scale": [2048, 1024]},
     r"data.eval_protocol='rein' sets .* but the config also gives data.test_scale=\[2048, 1024\] \(the "
     r"protocol's: clean 1024x512, fog 1024x512\)"),
    ({"eval_protocol": "soma", "window": [256, 256], "eval_mode": "whole"},
     r"data.eval_mode='whole' \(the protocol's: 'slide'\); data.window=\[256, 256\] \(the protocol's: \[512, 512\]\)"),
])
def test_eval_protocol_is_checked_at_config_time(synth, tmp_path, data, match):
    raw = _protocol_config(synth, tmp_path / "run", "rein")
    raw["data"].update(data)
    with pytest.raises(ConfigError, match=match):
        load_config(raw)


def test_eval_protocol_accepts_agreeing_keys_and_null_drops_a_bases_value(synth, tmp_path):
    raw = _protocol_config(synth, tmp_path / "run", "rein")
    raw["data"].update(test_scale=[1024, 512], window=[512, 512], stride=[341, 341], eval_mode="slide")
    cfg = load_config(raw)  # the same numbers as the preset: not a contradiction
    assert cfg.data.eval_protocol == "rein"
    # a shipped config (its base sets test_scale 1024x512) switched to SoMA's protocol: the base's key must go
    with pytest.raises(ConfigError, match=r"data.test_scale=\[1024, 512\] \(the protocol's: cityscapes 2048x1024"):
        load_config(SHIPPED_GTA, {"data.eval_protocol": "soma", "training.use_cpu": "true"}, check_paths=False)
    cfg = load_config(SHIPPED_GTA, {"data.eval_protocol": "soma", "data.test_scale": "null",
                                    "training.use_cpu": "true"}, check_paths=False)
    assert cfg.data.test_scale is None and cfg.data.eval_protocol == "soma"
    # without a protocol, the custom defaults fill what the config leaves out
    plain = load_config(SHIPPED_GTA, {"data.test_scale": "null", "training.use_cpu": "true"}, check_paths=False)
    assert (plain.data.test_scale, plain.data.eval_mode, plain.data.window) == ([1024, 512], "slide", [512, 512])


def test_quick_yaml_shrinks_a_config_with_a_protocol(tmp_path):
    import yaml

    own = tmp_path / "soma_run.yaml"
    own.write_text(yaml.safe_dump({"_base_": str(SHIPPED_GTA), "data": {"eval_protocol": "soma", "test_scale": None}}))
    assert load_config(own, {"training.use_cpu": "true"}, check_paths=False).data.eval_protocol == "soma"
    quick = load_config([own, ROOT / "configs" / "quick.yaml"], {"training.use_cpu": "true"}, check_paths=False)
    assert quick.data.eval_protocol is None and quick.data.test_scale == [256, 128]


def test_train_script_exits_2_naming_the_protocols(synth, tmp_path, capsys):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_protocol_config(synth, tmp_path / "run", "somaa")))
    assert _script("train").main(["--config", str(path)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("config error: data.eval_protocol='somaa' is not a known protocol; expected one of")
    assert "'soma-tta'" in last and not (tmp_path / "run").exists()
