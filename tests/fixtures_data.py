"""Writers of tiny dataset trees in each official on-disk layout (used by tests/test_data_layouts.py).

Each label image holds a known set of raw values laid out in vertical stripes, so a
test can check the exact trainIds every raw value must become.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

H, W = 8, 40

# Official Cityscapes label ID -> trainId (cityscapesScripts labels.py), written out
# independently of peft_fishertune.data.labels so the test checks that table.
CITYSCAPES_ID_TO_TRAIN = {
    0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255, 11: 2, 12: 3, 13: 4,
    14: 255, 15: 255, 16: 255, 17: 5, 18: 255, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 29: 255, 30: 255, 31: 16, 32: 17, 33: 18, 255: 255,
}
TRAINID_VALUES = {**{i: i for i in range(19)}, 255: 255}
# Mapillary v1.2 index -> trainId for the values the fixture uses (DG-paper mapping)
MAPILLARY_EXPECTED = {13: 0, 24: 0, 41: 0, 2: 1, 15: 1, 17: 2, 6: 3, 3: 4, 45: 5, 47: 5, 48: 6, 50: 7, 30: 8,
                      29: 9, 27: 10, 19: 11, 20: 12, 21: 12, 22: 12, 55: 13, 61: 14, 54: 15, 58: 16, 57: 17,
                      52: 18, 0: 255, 7: 255, 49: 255, 63: 255, 65: 255}


def stripes(values, h: int = H, w: int = W) -> np.ndarray:
    """(h, w) uint8: column x holds values[x % len(values)] (every value appears)."""
    vals = np.asarray(list(values), dtype=np.uint8)
    return np.tile(vals[np.arange(w) % len(vals)], (h, 1))


def expected(raw: np.ndarray, table: dict[int, int]) -> np.ndarray:
    out = np.empty_like(raw)
    for k, v in table.items():
        out[raw == k] = v
    return out


def write_image(path: Path, h: int = H, w: int = W, seed: int = 0, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)


def write_label(path: Path, raw: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(raw, mode="L")
    if palette:  # GTA5 / Mapillary ship palette PNGs: the index is the raw ID
        im = im.convert("P")
        im.putpalette(list(np.random.default_rng(1).integers(0, 256, 768, dtype=np.uint8)))
        im.putdata(raw.ravel().tolist())
    im.save(path)


def labelid_raw() -> np.ndarray:
    return stripes(CITYSCAPES_ID_TO_TRAIN)


def trainid_raw() -> np.ndarray:
    return stripes(TRAINID_VALUES)


def make_cityscapes(root: Path, split: str = "val", cities=("lindau", "munster"), per_city: int = 2) -> list[Path]:
    labels = []
    for c in cities:
        for i in range(per_city):
            stem = f"{c}_{i:06d}_000019"
            write_image(root / "leftImg8bit" / split / c / f"{stem}_leftImg8bit.png", seed=i)
            lp = root / "gtFine" / split / c / f"{stem}_gtFine_labelIds.png"
            write_label(lp, labelid_raw())
            # the other files of gtFine must be ignored
            write_label(root / "gtFine" / split / c / f"{stem}_gtFine_instanceIds.png", labelid_raw())
            labels.append(lp)
    return labels


def make_gta5(root: Path, n: int = 4, mismatch: tuple[int, ...] = (), split_mat: bool = True) -> None:
    for i in range(1, n + 1):
        name = f"{i:05d}.png"
        if i in mismatch:  # image larger than its label, as in the faulty GTA5 pairs
            write_image(root / "images" / name, h=H + 2, w=W + 4, seed=i)
        else:
            write_image(root / "images" / name, seed=i)
        write_label(root / "labels" / name, labelid_raw(), palette=True)
    if split_mat:
        import scipy.io

        scipy.io.savemat(
            str(root / "split.mat"),
            {"trainIds": np.array([[1], [2]]), "valIds": np.array([[3]]), "testIds": np.array([[4]])},
        )


def make_acdc(root: Path, split: str = "val", conditions=("fog", "night", "rain", "snow"), per: int = 1,
              labels=("labelTrainIds", "labelIds")) -> None:
    """labels: which of the gt files to write (the gt_trainval.zip holds both; some copies only labelIds)."""
    for cond in conditions:
        for i in range(per):
            seq = f"GOPR{i:04d}"
            stem = f"{seq}_frame_{i:06d}"
            write_image(root / "rgb_anon" / cond / split / seq / f"{stem}_rgb_anon.png", seed=i)
            if "labelTrainIds" in labels:
                write_label(root / "gt" / cond / split / seq / f"{stem}_gt_labelTrainIds.png", trainid_raw())
            if "labelIds" in labels:
                write_label(root / "gt" / cond / split / seq / f"{stem}_gt_labelIds.png", labelid_raw())


def make_bdd100k(root: Path, split: str = "val", layout: str = "10k", n: int = 3) -> None:
    for i in range(n):
        name = f"{i:08x}-0000{i:04d}"
        if layout == "10k":
            write_image(root / "bdd100k/images/10k" / split / f"{name}.jpg", seed=i, fmt="JPEG")
            write_label(root / "bdd100k/labels/sem_seg/masks" / split / f"{name}.png", trainid_raw())
        else:
            write_image(root / "seg/images" / split / f"{name}.jpg", seed=i, fmt="JPEG")
            write_label(root / "seg/labels" / split / f"{name}_train_id.png", trainid_raw())


def mapillary_raw() -> np.ndarray:
    return stripes(MAPILLARY_EXPECTED)


def make_mapillary(root: Path, split_dir: str = "validation", version: str = "v1.2", n: int = 2) -> None:
    for i in range(n):
        key = f"key{i:04d}AbCd"
        write_image(root / split_dir / "images" / f"{key}.jpg", seed=i, fmt="JPEG")
        if version == "v1.2":
            write_label(root / split_dir / "labels" / f"{key}.png", mapillary_raw(), palette=True)
        else:  # v2.0 archive: v1.2 masks under v1.2/labels, 124-class masks under v2.0/labels
            write_label(root / split_dir / "v1.2/labels" / f"{key}.png", mapillary_raw(), palette=True)
            write_label(root / split_dir / "v2.0/labels" / f"{key}.png", stripes([100, 110, 123]), palette=True)


def make_foggy_zurich(root: Path, n: int = 2) -> None:
    imgs, gts = [], []
    for i in range(n):
        rel_img = f"RGB/GP010475/1508039851_start_01h01m20s_frame_{i:06d}.png"
        rel_gt = f"gt_labelTrainIds/testv2/GP010475/1508039851_start_01h01m20s_frame_{i:06d}.png"
        write_image(root / rel_img, seed=i)
        write_label(root / rel_gt, trainid_raw())
        imgs.append(rel_img)
        gts.append(rel_gt)
    (root / "lists_file_names").mkdir(parents=True, exist_ok=True)
    (root / "lists_file_names/RGB_testv2_filenames.txt").write_text("\n".join(imgs) + "\n")
    (root / "lists_file_names/gt_labelTrainIds_testv2_filenames.txt").write_text("\n".join(gts) + "\n")


def make_dark_zurich(root: Path, n: int = 2) -> None:
    for i in range(n):
        seq = "GOPR0356"
        stem = f"{seq}_frame_{i:06d}"
        write_image(root / "rgb_anon/val/night" / seq / f"{stem}_rgb_anon.png", seed=i)
        write_label(root / "gt/val/night" / seq / f"{stem}_gt_labelTrainIds.png", trainid_raw())


def make_foggy_driving(root: Path, dense: int = 2, coarse: int = 1) -> None:
    all_i, all_g, dense_i, dense_g = [], [], [], []
    for i in range(dense + coarse):
        if i < dense:
            ri = f"leftImg8bit/test/public/scene_{i:02d}_leftImg8bit.png"
            rg = f"gtFine/test/public/scene_{i:02d}_gtFine_labelTrainIds.png"
            dense_i.append(ri)
            dense_g.append(rg)
        else:
            ri = f"leftImg8bit/test_extra/web/scene_{i:02d}_leftImg8bit.png"
            rg = f"gtCoarse/test_extra/web/scene_{i:02d}_gtCoarse_labelTrainIds.png"
        write_image(root / ri, seed=i)
        write_label(root / rg, trainid_raw())
        all_i.append(ri)
        all_g.append(rg)
    lists = root / "lists_file_names"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "leftImg8bit_testall_filenames.txt").write_text("\n".join(all_i))
    (lists / "gt_testall_filenames.txt").write_text("\n".join(all_g))
    (lists / "leftImg8bit_testdense_filenames.txt").write_text("\n".join(dense_i))
    (lists / "gt_testdense_filenames.txt").write_text("\n".join(dense_g))


def make_nighttime_driving(root: Path, n: int = 2) -> None:
    for i in range(n):
        stem = f"0_frame_{i:04d}"
        write_image(root / "leftImg8bit/test/night" / f"{stem}_leftImg8bit.png", seed=i)
        write_label(root / "gtCoarse_daytime_trainvaltest/test/night" / f"{stem}_gtCoarse_labelTrainIds.png", trainid_raw())
        write_label(root / "gtCoarse_daytime_trainvaltest/test/night" / f"{stem}_gtCoarse_labelIds.png", labelid_raw())


def make_official_roots(base: Path) -> dict[str, Path]:
    """One small tree per dataset the shipped configs name, each in its official layout; {dataset name: root}.
    GTA5 without split.mat (the configs train on all of it); Cityscapes with train and val; ACDC val for all four
    conditions; BDD100K val; Mapillary validation."""
    roots = {name: base / name for name in ("gta5", "cityscapes", "acdc", "bdd100k", "mapillary")}
    make_gta5(roots["gta5"], n=4, split_mat=False)
    make_cityscapes(roots["cityscapes"], split="train")
    make_cityscapes(roots["cityscapes"], split="val")
    make_acdc(roots["acdc"], split="val")
    make_bdd100k(roots["bdd100k"], split="val", n=2)
    make_mapillary(roots["mapillary"], split_dir="validation", n=2)
    return roots


# ------------------------------------------------------------------------------------------------ bad-input trees
# (tests/test_bad_inputs.py) A street scene as a label map, in both encodings, so a copy that holds trainIds under
# the labelIds name has the statistics a real preprocessed copy has.

TRAIN_TO_CITYSCAPES_ID = {t: i for i, t in CITYSCAPES_ID_TO_TRAIN.items() if t != 255}


def street_trainids(h: int = 32, w: int = 64, seed: int = 0) -> np.ndarray:
    """(h, w) trainIds of a plausible street view: sky (10) on top, building (2) / vegetation (8) with a pole (5)
    and a traffic sign (7), sidewalk (1), road (0) at the bottom, a car (13), a person (11), and an ignore (255)
    band at the very bottom (ego vehicle / rectification border)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((h, w), np.uint8)  # road
    out[: h * 3 // 10] = 10
    out[h * 3 // 10: h * 11 // 20, : w // 2] = 2
    out[h * 3 // 10: h * 11 // 20, w // 2:] = 8
    out[h * 11 // 20: h * 13 // 20] = 1
    px = int(rng.integers(2, w // 4))
    out[h * 2 // 10: h * 13 // 20, px: px + 1] = 5
    out[h * 2 // 10: h * 3 // 10, px - 1: px + 2] = 7
    cx = int(rng.integers(w // 3, w * 2 // 3))
    out[h * 6 // 10: h * 8 // 10, cx: cx + w // 6] = 13
    out[h * 5 // 10: h * 7 // 10, w - 4: w - 2] = 11
    out[h - max(1, h // 16):] = 255
    return out


def street_labelids(h: int = 32, w: int = 64, seed: int = 0) -> np.ndarray:
    """The same scene as :func:`street_trainids` in Cityscapes label IDs (ignore band = 1, ego vehicle)."""
    tid = street_trainids(h, w, seed)
    out = np.ones_like(tid)
    for t, i in TRAIN_TO_CITYSCAPES_ID.items():
        out[tid == t] = i
    return out


def make_cityscapes_scenes(root: Path, split: str = "val", n: int = 3, encoding: str = "labelIds",
                           name: str = "labelIds", h: int = 32, w: int = 64) -> list[Path]:
    """Cityscapes tree of ``n`` street scenes. ``encoding``: what the masks hold (labelIds / trainIds);
    ``name``: the file name they get (``labelIds`` -> *_gtFine_labelIds.png, ``labelTrainIds`` ->
    *_gtFine_labelTrainIds.png). encoding=trainIds + name=labelIds is the silently-wrong preprocessed copy."""
    labels = []
    for i in range(n):
        city = ("aachen", "bochum", "bremen")[i % 3]
        stem = f"{city}_{i:06d}_000019"
        write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", h=h, w=w, seed=i)
        raw = street_trainids(h, w, i) if encoding == "trainIds" else street_labelids(h, w, i)
        lp = root / "gtFine" / split / city / f"{stem}_gtFine_{name}.png"
        write_label(lp, raw)
        labels.append(lp)
    return labels


def make_gta5_scenes(root: Path, n: int = 3, encoding: str = "labelIds", h: int = 32, w: int = 64) -> list[Path]:
    """GTA5 tree (split 'all') of ``n`` street scenes; encoding=trainIds is a converted copy under GTA5's names."""
    labels = []
    for i in range(1, n + 1):
        write_image(root / "images" / f"{i:05d}.png", h=h, w=w, seed=i)
        raw = street_trainids(h, w, i) if encoding == "trainIds" else street_labelids(h, w, i)
        lp = root / "labels" / f"{i:05d}.png"
        write_label(lp, raw, palette=True)
        labels.append(lp)
    return labels
