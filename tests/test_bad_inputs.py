"""Bad input on the data side (issue 22): every case refused or warned when the dataset is built, naming the file
and the likely cause, through the API (`load_dgss_dataset`), the experiment's data build (`scripts/train.py`) and
`scripts/predict.py`. Trees are written in the datasets' documented layouts (tests/fixtures_data.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import fixtures_data as fx
import numpy as np
import pytest
import yaml
from PIL import Image
from script_modules import load_script

from peft_fishertune.data import DatasetFileError, checks, load_dgss_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test's check cache lives in its own folder (and never inside a dataset)."""
    monkeypatch.setenv(checks.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(checks.LABEL_CHECK_ENV, raising=False)


def _script(name: str):
    return load_script(f"scripts/{name}.py", f"{name}_script_bad_inputs")


# ------------------------------------------------------------------------------------------------ label plausibility


@pytest.mark.parametrize("split", ["train", "val"])
def test_trainids_under_cityscapes_labelids_name_is_refused(tmp_path, split):
    labels = fx.make_cityscapes_scenes(tmp_path, split=split, n=3, encoding="trainIds", name="labelIds")
    with pytest.raises(DatasetFileError) as err:
        load_dgss_dataset("cityscapes", tmp_path, split=split)
    msg = str(err.value)
    assert "look like trainIds" in msg and "not one pixel of the label IDs 19..33" in msg
    assert "84% of the pixels would become ignore" in msg  # the issue's ~82 % symptom, measured on the sample
    assert all(lp.name in msg for lp in labels) and "preprocessed copy" in msg
    # the same scenes stored as label IDs load without a word (no false alarm), and map to the scene's trainIds
    ok = tmp_path / "ok"
    fx.make_cityscapes_scenes(ok, split=split, n=3, encoding="labelIds")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dgss_dataset("cityscapes", ok, split=split)
    np.testing.assert_array_equal(np.asarray(ds[0]["label"]), fx.street_trainids(seed=0))


def test_trainids_under_gta5_names_is_refused_and_the_check_can_be_relaxed(tmp_path, monkeypatch):
    labels = fx.make_gta5_scenes(tmp_path, n=4, encoding="trainIds")
    with pytest.raises(DatasetFileError, match=r"gta5 \(all, labelIds\): the label files look like trainIds") as err:
        load_dgss_dataset("gta5", tmp_path)
    assert labels[0].name in str(err.value) and "label_check='warn'" in str(err.value)
    with pytest.warns(UserWarning, match="look like trainIds"):
        assert len(load_dgss_dataset("gta5", tmp_path, label_check="warn")) == 4
    monkeypatch.setenv(checks.LABEL_CHECK_ENV, "off")  # the switch a config run can use without a new field
    assert len(load_dgss_dataset("gta5", tmp_path)) == 4
    with pytest.raises(ValueError, match="label_check='loud'"):
        load_dgss_dataset("gta5", tmp_path, label_check="loud")


def test_all_ignore_training_labels_are_refused(tmp_path):
    labels = fx.make_cityscapes_scenes(tmp_path, split="train", n=3)
    for lp in labels:
        fx.write_label(lp, np.zeros((32, 64), np.uint8))  # label ID 0 = unlabeled everywhere
    with pytest.raises(DatasetFileError) as err:
        load_dgss_dataset("cityscapes", tmp_path, split="train")
    msg = str(err.value)
    assert "every pixel of the 3 label files sampled evenly from 3 maps to ignore" in msg
    assert "loss 0.0" in msg and "zero gradients" in msg and labels[1].name in msg
    # an evaluation set of all-ignore labels (e.g. withheld test labels) is loaded, with a warning: mIoU would be NaN
    val = tmp_path / "v"
    for lp in fx.make_cityscapes_scenes(val, split="val", n=2):
        fx.write_label(lp, np.zeros((32, 64), np.uint8))
    with pytest.warns(UserWarning, match="its mIoU would be NaN"):
        assert len(load_dgss_dataset("cityscapes", val, split="val")) == 2


def test_training_set_with_implausible_ignore_fraction_warns_naming_files(tmp_path):
    labels = fx.make_cityscapes_scenes(tmp_path, split="train", n=4)
    raw = fx.street_labelids(seed=3)
    raw[: 24] = 0  # 3/4 of the mask unlabeled (coarse annotation, wrong label folder, ...)
    for lp in labels[:3]:
        fx.write_label(lp, raw)
    with pytest.warns(UserWarning, match=r"62% of the pixels of the 4 label files sampled .* map to ignore") as rec:
        assert len(load_dgss_dataset("cityscapes", tmp_path, split="train")) == 4
    msg = str(rec[0].message)
    assert all(f"{lp.name}: 81% ignore" in msg for lp in labels[:3]) and labels[3].name not in msg
    assert "coarse or partial annotations" in msg


def test_labelids_under_a_trainids_name_is_refused_when_built(tmp_path):
    # an ACDC copy whose *_gt_labelTrainIds.png hold Cityscapes label IDs
    fx.make_acdc(tmp_path, conditions=("fog",), per=2, labels=("labelTrainIds",))
    for lp in (tmp_path / "gt/fog/val").rglob("*_gt_labelTrainIds.png"):
        fx.write_label(lp, fx.street_labelids())
    with pytest.raises(DatasetFileError) as err:
        load_dgss_dataset("acdc", tmp_path, split="val", condition="fog", verify="none")
    msg = str(err.value)
    assert "hold raw values [20, 21, 23, 24, 26]" in msg and "are Cityscapes label IDs, not trainIds" in msg
    assert "_gt_labelTrainIds.png" in msg


def test_the_sample_is_spread_over_the_set_and_cached(tmp_path, monkeypatch):
    assert checks.sample_indices(5) == [0, 1, 2, 3, 4]
    idx = checks.sample_indices(24966)
    assert len(idx) == checks.SAMPLE_SIZE and idx[0] == 0 and idx[-1] == 24965
    fx.make_gta5_scenes(tmp_path, n=3)
    calls = []
    real = checks.label_facts
    monkeypatch.setattr(checks, "label_facts", lambda p: calls.append(p) or real(p))
    load_dgss_dataset("gta5", tmp_path)
    assert len(calls) == 3
    load_dgss_dataset("gta5", tmp_path)
    assert len(calls) == 3  # second build: (size, mtime) unchanged, nothing decoded
    cache_files = list((tmp_path / "cache" / "data_checks").glob("*.json"))
    assert len(cache_files) == 1 and json.loads(cache_files[0].read_text())["root"] == str(tmp_path)
    assert not any("data_checks" in str(p) or p.suffix == ".json" for p in tmp_path.rglob("*")
                   if "cache" not in p.parts)  # nothing written inside the dataset
    # labels replaced by trainIds are seen at once (their size/mtime changed)
    for i in (1, 2, 3):
        fx.write_label(tmp_path / "labels" / f"{i:05d}.png", fx.street_trainids(seed=i), palette=True)
    with pytest.raises(DatasetFileError, match="look like trainIds"):
        load_dgss_dataset("gta5", tmp_path)


# ------------------------------------------------------------------------------------------------ Cityscapes fallback


def test_cityscapes_with_only_label_train_ids_reads_them_as_train_ids(tmp_path):
    labels = fx.make_cityscapes_scenes(tmp_path, split="val", n=3, encoding="trainIds", name="labelTrainIds")
    with pytest.warns(UserWarning, match=r"cityscapes: no \*_gtFine_labelIds.png label file exists for the 3 images; "
                                         r"reading the 3 \*_gtFine_labelTrainIds.png files instead, as trainIds") as rec:
        ds = load_dgss_dataset("cityscapes", tmp_path, split="val")
    assert len([w for w in rec if "labelTrainIds" in str(w.message)]) == 1  # said once, not per file
    assert ds.with_format(None)[0]["label"]["path"] == str(labels[0])
    for i in range(3):  # the values are used as trainIds directly (no label-ID mapping)
        np.testing.assert_array_equal(np.asarray(ds[i]["label"]), fx.street_trainids(seed=i))
    # a copy mixing both: the labelIds are read, the images without one are named with the reason
    fx.write_label(Path(str(labels[0]).replace("labelTrainIds", "labelIds")), fx.street_labelids(seed=0))
    with pytest.raises(DatasetFileError, match=r"2 of 3 images have no label file[\s\S]*2 of them have a "
                                               r"\*_gtFine_labelTrainIds.png instead: this copy mixes"):
        load_dgss_dataset("cityscapes", tmp_path, split="val")


# ------------------------------------------------------------------------------------------------ evaluation sets


def _corrupt(kind: str, root: Path, label: Path, image: Path) -> tuple[Path, str]:
    """Damage one file of a Cityscapes val tree; returns (the file, what the error must say)."""
    if kind == "truncated_image":
        data = image.read_bytes()
        image.write_bytes(data[: len(data) * 2 // 3])
        return image, "truncated|Truncated"
    if kind == "truncated_label":
        data = label.read_bytes()
        label.write_bytes(data[: len(data) // 2])
        return label, "truncated|Truncated|broken|error"
    if kind == "label_16bit":
        Image.fromarray(fx.street_labelids().astype(np.uint16) * 300).save(label)
        return label, "16/32-bit mask"
    if kind == "label_rgb":
        Image.fromarray(np.stack([fx.street_labelids()] * 3, -1)).save(label)  # e.g. a *_color.png copied over
        return label, "colour/multi-channel"
    if kind == "label_size":
        fx.write_label(label, fx.street_labelids(h=16, w=64))
        return label, "differ in size"
    if kind == "label_values":
        raw = fx.street_labelids()
        raw[0, :3] = 40
        fx.write_label(label, raw)
        return label, r"raw values \[40\]"
    raise ValueError(kind)


EVAL_FAULTS = ["truncated_image", "truncated_label", "label_16bit", "label_rgb", "label_size", "label_values"]


@pytest.mark.parametrize("kind", EVAL_FAULTS)
def test_evaluation_set_is_verified_when_built(tmp_path, kind):
    labels = fx.make_cityscapes_scenes(tmp_path, split="val", n=3)
    image = Path(str(labels[1]).replace("gtFine", "leftImg8bit", 1).replace("_gtFine_labelIds", "_leftImg8bit"))
    bad, cause = _corrupt(kind, tmp_path, labels[1], image)
    ds = load_dgss_dataset("cityscapes", tmp_path, split="val", verify="none", label_check="off")  # the old default
    assert len(ds) == 3  # loads; the fault would surface at the final evaluation
    with pytest.raises(DatasetFileError) as err:
        load_dgss_dataset("cityscapes", tmp_path, split="val")  # default for an evaluation split: verify in full
    msg = str(err.value)
    assert bad.name in msg, msg
    assert re.search(cause, msg), msg


def test_full_verification_is_cached(tmp_path, monkeypatch):
    labels = fx.make_cityscapes_scenes(tmp_path, split="val", n=3)
    calls = []
    for fn in ("image_facts", "label_facts"):
        real = getattr(checks, fn)
        monkeypatch.setattr(checks, fn, lambda p, real=real: calls.append(p) or real(p))
    import peft_fishertune.data.loading as loading

    monkeypatch.setattr(loading, "image_facts", checks.image_facts)
    monkeypatch.setattr(loading, "label_facts", checks.label_facts)
    load_dgss_dataset("cityscapes", tmp_path, split="val")
    assert len(calls) == 6  # 3 images + 3 labels decoded once (the label check reuses the labels' histograms)
    load_dgss_dataset("cityscapes", tmp_path, split="val")
    assert len(calls) == 6
    # a file truncated after it was verified is decoded again and caught
    image = Path(str(labels[2]).replace("gtFine", "leftImg8bit", 1).replace("_gtFine_labelIds", "_leftImg8bit"))
    image.write_bytes(image.read_bytes()[:200])
    with pytest.raises(DatasetFileError, match=image.name):
        load_dgss_dataset("cityscapes", tmp_path, split="val")
    assert calls[-1] == str(image)


# ------------------------------------------------------------------------------------------------ scripts/train.py


def _tiny_config(tmp_path, train_root, eval_root) -> Path:
    raw = {
        "model": {"backbone": "dinov2", "decoder": "linear", "pyramid_channels": 8,
                  "tiny_backbone": {"hidden_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2,
                                    "intermediate_size": 32, "patch_size": 8, "image_size": 32}},
        "data": {"train": {"name": "cityscapes", "root": str(train_root), "split": "train"},
                 "eval": [{"name": "cityscapes", "root": str(eval_root), "split": "val"}],
                 "crop_size": [16, 16], "base_scale": [64, 32], "test_scale": [64, 32], "eval_mode": "slide",
                 "window": [16, 16], "stride": [16, 16]},
        "method": {"name": "fishertune", "fishertune": {"delta_min": 0.05, "delta_max": 0.2, "fisher_mode": "batch"}},
        "training": {"output_dir": str(tmp_path / "out"), "stage1_steps": 1, "stage2_steps": 1, "stage3_steps": 1,
                     "per_device_train_batch_size": 2, "use_cpu": True, "report_to": [], "disable_tqdm": True,
                     "logging_steps": 1, "dataloader_num_workers": 0, "seed": 0},
    }
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _train_env(tmp_path) -> dict:
    env = {**os.environ, checks.CACHE_ENV: str(tmp_path / "cache")}
    env.pop(checks.LABEL_CHECK_ENV, None)
    return env


def test_train_script_stops_at_the_data_build_naming_the_file(tmp_path):
    train_root, eval_root = tmp_path / "cs_train", tmp_path / "cs_val"
    labels = fx.make_cityscapes_scenes(train_root, split="train", n=3, encoding="trainIds")
    fx.make_cityscapes_scenes(eval_root, split="val", n=2)
    cfg = _tiny_config(tmp_path, train_root, eval_root)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(cfg)],
                          capture_output=True, text=True, timeout=240, env=_train_env(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]  # like a config error
    block = proc.stderr[proc.stderr.rindex("data error: "):]  # the message is the last thing printed
    assert block.startswith("data error: cityscapes (train, labelIds): the label files look like trainIds")
    assert labels[0].name in block and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "base_model").exists()  # stopped before the model was built


def _train_main(cfg: Path, capsys, *overrides) -> tuple[int, str]:
    rc = _script("train").main(["--config", str(cfg), *overrides])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("kind", EVAL_FAULTS + ["train_all_ignore"])
def test_train_script_checks_the_data_before_the_first_step(tmp_path, kind, capsys):
    """Every evaluation-set fault the issue found at the final evaluation (rc 1, hours later) and all-ignore
    training labels (loss 0.0 at every step) stop scripts/train.py while its data is built: exit 2, the message
    last, before the model is built."""
    train_root, eval_root = tmp_path / "cs_train", tmp_path / "cs_val"
    train_labels = fx.make_cityscapes_scenes(train_root, split="train", n=2)
    labels = fx.make_cityscapes_scenes(eval_root, split="val", n=3)
    if kind == "train_all_ignore":
        for lp in train_labels:
            fx.write_label(lp, np.zeros((32, 64), np.uint8))
        bad, cause = train_labels[0], "maps to ignore"
    else:
        image = Path(str(labels[1]).replace("gtFine", "leftImg8bit", 1).replace("_gtFine_labelIds", "_leftImg8bit"))
        bad, cause = _corrupt(kind, eval_root, labels[1], image)
    rc, err = _train_main(_tiny_config(tmp_path, train_root, eval_root), capsys)
    assert rc == 2, err[-3000:]
    block = err[err.rindex("data error: "):]
    assert bad.name in block and re.search(cause, block), block
    assert "Traceback" not in err
    out = tmp_path / "out"
    assert not (out / "base_model").exists() and not (out / "adapter").exists()
    assert (out / "train.log").read_text().rstrip().endswith(block.rstrip().splitlines()[-1])


def test_experiment_data_build_verifies_evaluation_sets(tmp_path):
    from peft_fishertune.training import load_config
    from peft_fishertune.training.config import DatasetEntry
    from peft_fishertune.training.experiment import build_data

    assert DatasetEntry(name="cityscapes", root=".").verify == "auto"  # was 'none': faults waited for the end
    train_root, eval_root = tmp_path / "cs_train", tmp_path / "cs_val"
    fx.make_cityscapes_scenes(train_root, split="train", n=2)
    lbl = fx.make_cityscapes_scenes(eval_root, split="val", n=2)[1]
    img = Path(str(lbl).replace("gtFine", "leftImg8bit", 1).replace("_gtFine_labelIds", "_leftImg8bit"))
    img.write_bytes(img.read_bytes()[:-400])  # a truncated evaluation image (its header reads fine)
    raw = yaml.safe_load(_tiny_config(tmp_path, train_root, eval_root).read_text())
    with pytest.raises(DatasetFileError, match=r"cityscapes \(val\): 1 faulty files \(verify='full'\)[\s\S]*"
                                               + img.name):
        build_data(load_config(raw), 4, 0)  # the default (verify: auto) decodes every evaluation file
    raw["data"]["eval"][0]["verify"] = "none"
    train, evals = build_data(load_config(raw), 4, 0)  # asked for: the fault waits for the final evaluation
    assert len(evals) == 1


# ------------------------------------------------------------------------------------------------ scripts/predict.py


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from peft_fishertune.models import build_segmentation_model, tiny_backbone_config

    d = tmp_path_factory.mktemp("model")
    cfg = tiny_backbone_config("dinov2", hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                               intermediate_size=32, patch_size=8, image_size=32)
    build_segmentation_model("dinov2", backbone_config=cfg, decoder="linear", pyramid_channels=8).save_pretrained(d)
    return d


def _adapter_on_another_decoder(path: Path) -> Path:
    from peft import get_peft_model

    import peft_fishertune as pf
    from peft_fishertune.models import build_segmentation_model, tiny_backbone_config

    cfg = tiny_backbone_config("dinov2", hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                               intermediate_size=32, patch_size=8, image_size=32)
    seg = build_segmentation_model("dinov2", backbone_config=cfg, decoder="upernet", pyramid_channels=8)
    get_peft_model(seg, pf.FisherTuneConfig(target_modules=["q_proj"], modules_to_save=["decode_head"])
                   ).save_pretrained(path)
    return path


def _predict(args, capsys) -> tuple[int, str, str]:
    rc = _script("predict").main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_predict_mirrors_the_tree_and_never_overwrites(tmp_path, tiny_model, capsys):
    src = tmp_path / "in"
    fx.write_image(src / "a" / "0001.png", h=32, w=48, seed=1)
    fx.write_image(src / "b" / "0001.png", h=32, w=48, seed=2)
    fx.write_image(src / "b" / "deep" / "x.jpg", h=24, w=40, seed=3, fmt="JPEG")
    out = tmp_path / "pred"
    common = ["--model", tiny_model, "--window", 16, "--stride", 16, "--test-scale", 48, 32]
    rc, stdout, err = _predict([*common, "--images", src, "--out", out, "--label-ids"], capsys)
    assert rc == 0, err
    assert "wrote 3 predictions" in stdout
    for rel, size in (("a/0001", (48, 32)), ("b/0001", (48, 32)), ("b/deep/x", (40, 24))):
        tid = Image.open(out / "trainIds" / f"{rel}.png")
        assert tid.mode == "L" and tid.size == size
        t = np.asarray(tid)
        assert t.max() <= 18
        lid = np.asarray(Image.open(out / "labelIds" / f"{rel}.png"))
        np.testing.assert_array_equal(lid, np.vectorize(fx.TRAIN_TO_CITYSCAPES_ID.get)(t))
        ov = Image.open(out / "overlay" / f"{rel}.png")
        assert ov.mode == "RGB" and ov.width > size[0]  # the legend sits right of the image
    # a second run refuses before loading the model, naming a file; --overwrite replaces
    rc, _, err = _predict([*common, "--images", src, "--out", out], capsys)
    assert rc == 2 and "already holds 6 of the files" in err and "--overwrite" in err and err.count("\n") == 1
    rc, stdout, err = _predict([*common, "--images", src, "--out", out, "--overwrite"], capsys)
    assert rc == 0 and "wrote 3 predictions" in stdout
    # predictions written inside the input folder are not read back as inputs on a rerun
    rc, stdout, err = _predict([*common, "--images", src, "--out", src / "pred", "--no-overlay"], capsys)
    assert rc == 0 and "wrote 3 predictions (trainIds)" in stdout
    rc, stdout, err = _predict([*common, "--images", src, "--out", src / "pred2", "--no-overlay"], capsys)
    assert rc == 0 and "wrote 3 predictions" in stdout


def test_predict_bad_input_gives_one_line_and_exit_2(tmp_path, tiny_model, capsys):
    src = tmp_path / "in"
    fx.write_image(src / "ok.png", h=32, w=48)
    common = ["--window", 16, "--stride", 16, "--test-scale", 48, 32, "--out", tmp_path / "o"]

    def refused(args, names, cause):
        rc, _, err = _predict([*common, *args], capsys)
        assert rc == 2, (" ".join(str(x) for x in args), err)
        assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
        assert names in err and cause in err, err

    refused(["--model", tiny_model, "--images", tmp_path / "missing"], "--images", "does not exist")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("x")
    refused(["--model", tiny_model, "--images", tmp_path / "empty"], "empty", "holds no image files")
    bad = src / "deep" / "broken.png"
    fx.write_image(bad, h=32, w=48)
    bad.write_bytes(bad.read_bytes()[:120])  # header intact, data cut
    refused(["--model", tiny_model, "--images", src], "broken.png", "cannot read image file")
    bad.unlink()
    refused(["--model", tmp_path / "nomodel", "--images", src], "nomodel", "not a directory")
    (tmp_path / "emptymodel").mkdir()
    refused(["--model", tmp_path / "emptymodel", "--images", src], "emptymodel", "segmentation_config.json not found")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "segmentation_config.json").write_text("{not json")
    refused(["--model", tmp_path / "garbage", "--images", src], "garbage/segmentation_config.json", "cannot read")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "segmentation_config.json").write_text((tiny_model / "segmentation_config.json").read_text())
    (tmp_path / "noweights" / "model.safetensors").write_bytes(b"\0" * 16)
    refused(["--model", tmp_path / "noweights", "--images", src], "noweights", "cannot load the model")
    refused(["--model", tiny_model, "--images", src, "--stride", 32], "--stride", "gaps")
    (tmp_path / "file_out").write_text("x")
    refused(["--model", tiny_model, "--images", src, "--out", tmp_path / "file_out"], "file_out", "not a folder")
    refused(["--model", tiny_model, "--images", src, "--label-ids", "--num-labels", 7], "--label-ids", "19")
    refused(["--model", tiny_model, "--images", src, "--num-labels", 7], "--num-labels=7", "predicts 19 classes")
    other = _adapter_on_another_decoder(tmp_path / "adapter")
    refused(["--model", tiny_model, "--adapter", other, "--images", src], str(other),
            "this FisherTune adapter was trained with another decoder: decoder kind: the adapter was saved with "
            "decoder='upernet', this model has decoder='linear'")
    twins = tmp_path / "twins"
    fx.write_image(twins / "x.png", h=32, w=48)
    fx.write_image(twins / "x.jpg", h=32, w=48, fmt="JPEG")
    refused(["--model", tiny_model, "--images", twins], "x.jpg", "would both be written as x.png")
    assert not (tmp_path / "o").exists()  # nothing was written by any refused run


def test_predict_cli_exit_code_and_no_traceback(tmp_path):
    src = tmp_path / "in"
    fx.write_image(src / "x.png")
    src.joinpath("x.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict.py"), "--model", str(tmp_path),
                           "--images", str(src), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: cannot read image file {src / 'x.png'}: "
                                                + proc.stderr.split(": ", 2)[-1].strip()]
    assert "Traceback" not in proc.stderr
