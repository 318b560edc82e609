"""Loaders read each official layout and deliver exact trainIds; every fault path is clear."""

from __future__ import annotations

import datasets
import fixtures_data as fx
import numpy as np
import pytest
from PIL import Image

from peft_fishertune.data import (
    DatasetFileError,
    DatasetLayoutError,
    EvalTransform,
    get_spec,
    list_datasets,
    load_dgss_dataset,
    with_dgss_transform,
)

# name, writer(root), kwargs, expected number of pairs, raw table (raw -> trainId), fixture raw maker
CASES = [
    ("cityscapes", lambda r: fx.make_cityscapes(r), {"split": "val"}, 4, fx.CITYSCAPES_ID_TO_TRAIN, fx.labelid_raw),
    ("gta5", lambda r: fx.make_gta5(r), {}, 4, fx.CITYSCAPES_ID_TO_TRAIN, fx.labelid_raw),
    ("acdc", lambda r: fx.make_acdc(r), {"split": "val"}, 4, fx.TRAINID_VALUES, fx.trainid_raw),
    ("bdd100k", lambda r: fx.make_bdd100k(r), {}, 3, fx.TRAINID_VALUES, fx.trainid_raw),
    ("mapillary", lambda r: fx.make_mapillary(r), {"split": "val"}, 2, fx.MAPILLARY_EXPECTED, fx.mapillary_raw),
    ("foggy_zurich", lambda r: fx.make_foggy_zurich(r), {}, 2, fx.TRAINID_VALUES, fx.trainid_raw),
    ("dark_zurich", lambda r: fx.make_dark_zurich(r), {}, 2, fx.TRAINID_VALUES, fx.trainid_raw),
    ("foggy_driving", lambda r: fx.make_foggy_driving(r), {}, 3, fx.TRAINID_VALUES, fx.trainid_raw),
    ("nighttime_driving", lambda r: fx.make_nighttime_driving(r), {}, 2, fx.TRAINID_VALUES, fx.trainid_raw),
]


def test_registry_lists_all_issue_datasets():
    assert set(list_datasets()) >= {
        "gta5", "cityscapes", "acdc", "bdd100k", "mapillary",
        "foggy_zurich", "foggy_driving", "dark_zurich", "nighttime_driving",
    }


@pytest.mark.parametrize("name,writer,kwargs,n,table,raw", CASES, ids=[c[0] for c in CASES])
def test_layout_gives_exact_train_ids(tmp_path, name, writer, kwargs, n, table, raw):
    writer(tmp_path)
    ds = load_dgss_dataset(name, tmp_path, **kwargs)
    assert isinstance(ds, datasets.Dataset)
    assert len(ds) == n
    # paths only, lazy decode
    assert isinstance(ds.features["image"], datasets.Image) and isinstance(ds.features["label"], datasets.Image)
    assert ds.cache_files == []
    want = fx.expected(raw(), table)
    for i in range(len(ds)):
        sample = ds[i]
        assert sample["image"].mode == "RGB"
        assert sample["label"].mode == "L"
        assert sample["image"].size == sample["label"].size
        np.testing.assert_array_equal(np.asarray(sample["label"]), want)


def test_cityscapes_label_table_exhaustive():
    # the fixture uses every raw label id 0..33 and 255: check a few by name
    from peft_fishertune.data import CLASS_NAMES, ID_TO_TRAINID

    assert CLASS_NAMES[0] == "road" and CLASS_NAMES[10] == "sky" and CLASS_NAMES[18] == "bicycle"
    assert {k: v for k, v in ID_TO_TRAINID.items() if k >= 0} == {k: v for k, v in fx.CITYSCAPES_ID_TO_TRAIN.items() if k != 255}


def test_acdc_condition_selection(tmp_path):
    fx.make_acdc(tmp_path, per=2)
    fog = load_dgss_dataset("acdc", tmp_path, split="val", condition="fog")
    assert len(fog) == 2
    assert all("/rgb_anon/fog/" in p["path"] for p in fog.with_format(None)["image"])
    assert len(load_dgss_dataset("acdc", tmp_path, split="val")) == 8
    with pytest.raises(ValueError, match="condition='haze'"):
        load_dgss_dataset("acdc", tmp_path, condition="haze")
    with pytest.raises(ValueError, match="has no conditions"):
        fx.make_cityscapes(tmp_path / "cs")
        load_dgss_dataset("cityscapes", tmp_path / "cs", condition="fog")


def test_gta5_split_mat(tmp_path):
    fx.make_gta5(tmp_path)
    assert [p["path"][-9:] for p in load_dgss_dataset("gta5", tmp_path, split="train").with_format(None)["image"]] == [
        "00001.png", "00002.png"]
    assert len(load_dgss_dataset("gta5", tmp_path, split="test")) == 1
    (tmp_path / "split.mat").unlink()
    with pytest.raises(DatasetLayoutError, match="split.mat"):
        load_dgss_dataset("gta5", tmp_path, split="val")
    assert len(load_dgss_dataset("gta5", tmp_path, split="all")) == 4


def test_bdd100k_legacy_layout(tmp_path):
    fx.make_bdd100k(tmp_path, layout="seg")
    ds = load_dgss_dataset("bdd100k", tmp_path, split="val")
    assert len(ds) == 3
    np.testing.assert_array_equal(np.asarray(ds[0]["label"]), fx.trainid_raw())


def test_mapillary_v20_archive_uses_v12_masks(tmp_path):
    fx.make_mapillary(tmp_path, version="v2.0")
    ds = load_dgss_dataset("mapillary", tmp_path, split="val")
    assert "/v1.2/labels/" in ds.with_format(None)[0]["label"]["path"]
    np.testing.assert_array_equal(np.asarray(ds[0]["label"]), fx.expected(fx.mapillary_raw(), fx.MAPILLARY_EXPECTED))


def test_foggy_driving_dense_split(tmp_path):
    fx.make_foggy_driving(tmp_path, dense=2, coarse=3)
    assert len(load_dgss_dataset("foggy_driving", tmp_path)) == 5
    assert len(load_dgss_dataset("foggy_driving", tmp_path, split="test_dense")) == 2


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_wrong_root_prints_expected_layout(tmp_path, name):
    (tmp_path / "something_else").mkdir()
    with pytest.raises(DatasetLayoutError) as err:
        load_dgss_dataset(name, tmp_path)
    msg = str(err.value)
    assert "Expected:" in msg and get_spec(name).layout in msg and str(tmp_path) in msg
    with pytest.raises(DatasetLayoutError, match="root is not a folder"):
        load_dgss_dataset(name, tmp_path / "does_not_exist")


def test_bad_arguments_name_the_field(tmp_path):
    fx.make_cityscapes(tmp_path)
    with pytest.raises(ValueError, match="unknown dataset name='citiscapes'"):
        load_dgss_dataset("citiscapes", tmp_path)
    with pytest.raises(ValueError, match="split='validation'"):
        load_dgss_dataset("cityscapes", tmp_path, split="validation")
    with pytest.raises(ValueError, match="on_fault="):
        load_dgss_dataset("cityscapes", tmp_path, on_fault="ignore")
    with pytest.raises(ValueError, match="verify="):
        load_dgss_dataset("cityscapes", tmp_path, verify="all")
    with pytest.raises(ValueError, match="size_mismatch="):
        load_dgss_dataset("cityscapes", tmp_path, size_mismatch="crop")


def test_image_without_label_error_and_skip(tmp_path):
    labels = fx.make_cityscapes(tmp_path)
    labels[1].unlink()
    with pytest.raises(DatasetFileError) as err:
        load_dgss_dataset("cityscapes", tmp_path)
    assert "1 of 4 images have no label" in str(err.value) and labels[1].name in str(err.value)
    with pytest.warns(UserWarning, match=r"1 of 4 images have no label file[\s\S]*" + labels[1].name):
        ds = load_dgss_dataset("cityscapes", tmp_path, on_fault="skip")
    assert len(ds) == 3


def test_list_file_pointing_to_missing_image(tmp_path):
    fx.make_foggy_zurich(tmp_path)
    lst = tmp_path / "lists_file_names/RGB_testv2_filenames.txt"
    lst.write_text(lst.read_text().replace("frame_000001", "frame_000009"))
    with pytest.raises(DatasetFileError, match="frame_000009.png \\(image missing\\)"):
        load_dgss_dataset("foggy_zurich", tmp_path)


def test_list_files_of_different_length(tmp_path):
    fx.make_foggy_zurich(tmp_path, n=3)
    lst = tmp_path / "lists_file_names/gt_labelTrainIds_testv2_filenames.txt"
    lst.write_text("\n".join(lst.read_text().split("\n")[:2]))
    with pytest.raises(DatasetFileError, match="3 lines but .* has 2"):
        load_dgss_dataset("foggy_zurich", tmp_path)


def test_unreadable_file(tmp_path):
    labels = fx.make_cityscapes(tmp_path)
    rel = labels[0].relative_to(tmp_path / "gtFine")
    img_path = tmp_path / "leftImg8bit" / rel.parent / rel.name.replace("_gtFine_labelIds", "_leftImg8bit")
    assert img_path.is_file()
    img_path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = load_dgss_dataset("cityscapes", tmp_path, verify="none")  # found when decoded
    bad = [i for i, r in enumerate(ds.with_format(None)["image"]) if r["path"] == str(img_path)][0]
    with pytest.raises(DatasetFileError, match="cannot read image file .*" + img_path.name):
        ds[bad]
    with pytest.raises(DatasetFileError, match="1 faulty files[\\s\\S]*" + img_path.name):
        load_dgss_dataset("cityscapes", tmp_path, verify="headers")
    with pytest.warns(UserWarning, match=img_path.name):
        ds2 = load_dgss_dataset("cityscapes", tmp_path, verify="headers", on_fault="skip")
    assert len(ds2) == 3
    # an evaluation split is verified in full by default (verify="auto"), when it is loaded
    with pytest.raises(DatasetFileError, match="verify='full'[\\s\\S]*" + img_path.name):
        load_dgss_dataset("cityscapes", tmp_path)


def test_raw_value_outside_table(tmp_path):
    fx.make_acdc(tmp_path, conditions=("snow",))
    lbl = next((tmp_path / "gt/snow/val").rglob("*_gt_labelTrainIds.png"))
    raw = fx.trainid_raw()
    raw[0, 0] = 19
    raw[1, 1] = 200
    fx.write_label(lbl, raw)
    ds = load_dgss_dataset("acdc", tmp_path, condition="snow", verify="none", label_check="off")
    with pytest.raises(DatasetFileError, match=r"raw values \[19, 200\] \(2 pixels\)") as err:
        ds[0]
    assert lbl.name in str(err.value)
    ds = load_dgss_dataset("acdc", tmp_path, condition="snow", unknown_label="ignore", verify="none")
    with pytest.warns(UserWarning, match=lbl.name):
        got = np.asarray(ds[0]["label"])
    assert got[0, 0] == 255 and got[1, 1] == 255 and got[0, 1] == raw[0, 1]
    with pytest.raises(DatasetFileError, match="faulty files"):
        load_dgss_dataset("acdc", tmp_path, condition="snow", verify="full", label_check="off")
    # by default the label check on a sample finds it when the set is built, naming file and values
    with pytest.raises(DatasetFileError, match=r"raw values \[19, 200\][\s\S]*" + lbl.name):
        load_dgss_dataset("acdc", tmp_path, condition="snow", verify="none")


def test_color_mask_is_rejected(tmp_path):
    labels = fx.make_cityscapes(tmp_path, cities=("ulm",), per_city=1)
    Image.fromarray(np.zeros((fx.H, fx.W, 3), np.uint8)).save(labels[0])
    with pytest.raises(DatasetFileError, match="mode 'RGB'"):
        load_dgss_dataset("cityscapes", tmp_path)[0]


def test_gta5_size_mismatch_policies(tmp_path):
    fx.make_gta5(tmp_path, mismatch=(3,))
    ds = load_dgss_dataset("gta5", tmp_path)  # default: resize the image to the label
    assert get_spec("gta5").size_mismatch == "resize_image"
    with pytest.warns(UserWarning, match=r"00003.png is 44x10 but label .*00003.png is 40x8; image resized"):
        sample = ds[2]
    assert sample["image"].size == (fx.W, fx.H)
    np.testing.assert_array_equal(np.asarray(sample["label"]), fx.expected(fx.labelid_raw(), fx.CITYSCAPES_ID_TO_TRAIN))
    ds = load_dgss_dataset("gta5", tmp_path, size_mismatch="resize_label")
    with pytest.warns(UserWarning, match="label resized"):
        assert ds[2]["label"].size == (fx.W + 4, fx.H + 2)
    with pytest.warns(UserWarning, match=r"skipped 1 pairs[\s\S]*00003.png"):
        assert len(load_dgss_dataset("gta5", tmp_path, size_mismatch="skip")) == 3
    with pytest.raises(DatasetFileError, match=r"1 image/label pairs differ in size[\s\S]*00003.png"):
        load_dgss_dataset("gta5", tmp_path, size_mismatch="error")


def test_mismatch_elsewhere_is_an_error_by_default(tmp_path):
    fx.make_dark_zurich(tmp_path, n=1)
    img = next((tmp_path / "rgb_anon").rglob("*.png"))
    fx.write_image(img, h=fx.H * 2, w=fx.W * 2)
    ds = load_dgss_dataset("dark_zurich", tmp_path, verify="none")
    with pytest.raises(DatasetFileError, match="80x16 but label"):
        ds[0]
    with pytest.raises(DatasetFileError, match=r"1 image/label pairs differ in size[\s\S]*\(80, 16\) vs"):
        load_dgss_dataset("dark_zurich", tmp_path)  # an evaluation set: verified in full when loaded


def test_transform_keeps_mapping_through_select_and_shuffle(tmp_path):
    fx.make_cityscapes(tmp_path)
    ds = load_dgss_dataset("cityscapes", tmp_path)
    tds = with_dgss_transform(ds.shuffle(seed=0).select([0, 1]), EvalTransform(test_scale=(fx.W, fx.H)))
    out = tds[0]
    assert set(out) == {"pixel_values", "labels"}
    want = fx.expected(fx.labelid_raw(), fx.CITYSCAPES_ID_TO_TRAIN)
    np.testing.assert_array_equal(out["labels"].numpy(), want)
    assert tuple(out["pixel_values"].shape) == (3, fx.H, fx.W)
    # load_dgss_dataset(transform=...) gives the same
    out2 = load_dgss_dataset("cityscapes", tmp_path, transform=EvalTransform(test_scale=(fx.W, fx.H)))[0]
    np.testing.assert_array_equal(out2["labels"].numpy(), want)
    with pytest.raises(ValueError, match="not made by load_dgss_dataset"):
        with_dgss_transform(datasets.Dataset.from_dict({"image": [], "label": []}), None)


def test_full_verify_catches_a_truncated_image(tmp_path):
    labels = fx.make_cityscapes(tmp_path)
    img = tmp_path / "leftImg8bit" / labels[0].relative_to(tmp_path / "gtFine").parent / \
        labels[0].name.replace("_gtFine_labelIds", "_leftImg8bit")
    assert img.is_file()
    data = img.read_bytes()
    img.write_bytes(data[: len(data) // 2])
    assert len(load_dgss_dataset("cityscapes", tmp_path, verify="headers")) == 4
    with pytest.warns(UserWarning, match=r"1 faulty files[\s\S]*" + img.name):
        ds = load_dgss_dataset("cityscapes", tmp_path, verify="full", on_fault="skip")
    assert len(ds) == 3 and str(img) not in [r["path"] for r in ds.with_format(None)["image"]]
    with pytest.raises(DatasetFileError, match=img.name):
        load_dgss_dataset("cityscapes", tmp_path, verify="full")


def test_acdc_with_only_label_ids_falls_back_to_them(tmp_path):
    fx.make_acdc(tmp_path, conditions=("fog", "night"), labels=("labelIds",))
    with pytest.warns(UserWarning, match=r"no \*_gt_labelTrainIds.png label file exists for the 1 images; reading the 1 "
                                         r"\*_gt_labelIds.png files instead, as labelIds"):
        ds = load_dgss_dataset("acdc", tmp_path, split="val", condition="night")
    assert ds.with_format(None)[0]["label"]["path"].endswith("_gt_labelIds.png")
    # the Cityscapes label IDs are mapped to trainIds (not read as trainIds)
    np.testing.assert_array_equal(np.asarray(ds[0]["label"]), fx.expected(fx.labelid_raw(), fx.CITYSCAPES_ID_TO_TRAIN))
    both = tmp_path / "both"
    fx.make_acdc(both, conditions=("fog",))
    assert load_dgss_dataset("acdc", both, condition="fog").with_format(None)[0]["label"]["path"].endswith(
        "_gt_labelTrainIds.png")  # labelTrainIds are preferred when present
    none = tmp_path / "none"
    fx.make_acdc(none, conditions=("fog",), labels=())
    (none / "gt/fog/val/GOPR0000").mkdir(parents=True)
    with pytest.raises(DatasetFileError, match="_gt_labelTrainIds.png"):
        load_dgss_dataset("acdc", none, condition="fog")


@pytest.mark.parametrize("split", ["val", "validation"])
def test_mapillary_accepts_its_official_split_names(tmp_path, split):
    fx.make_mapillary(tmp_path)
    ds = load_dgss_dataset("mapillary", tmp_path, split=split)
    assert len(ds) == 2
    np.testing.assert_array_equal(np.asarray(ds[0]["label"]), fx.expected(fx.mapillary_raw(), fx.MAPILLARY_EXPECTED))
    with pytest.raises(DatasetLayoutError, match="training/images"):
        load_dgss_dataset("mapillary", tmp_path, split="training")
