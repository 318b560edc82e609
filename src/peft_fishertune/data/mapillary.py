"""Mapillary Vistas v1.2 (66 classes), mapped to the 19 Cityscapes classes."""

from __future__ import annotations

from pathlib import Path

from .registry import DatasetSpec, layout_error, pair_by_suffix, register_dataset, require_dir

LAYOUT = """\
<root>/                       mapillary-vistas-dataset_public_v1.2.zip (or the v2.0 zip) unpacked here
  {training,validation}/images/<key>.jpg
  {training,validation}/labels/<key>.png        (v1.2 zip: palette PNG, index = v1.2 class 0..65)
  {training,validation}/v1.2/labels/<key>.png   (v2.0 zip: same v1.2 masks, used when present)
  split train (or its official name training) = training/, val (or validation) = validation/"""

_SPLIT_DIRS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}


def find_pairs(root: Path, split: str, condition: str | None):
    sdir = _SPLIT_DIRS[split]
    img_dir = require_dir(root, f"{sdir}/images", "mapillary", LAYOUT)
    if (root / sdir / "v1.2/labels").is_dir():
        lbl_dir = root / sdir / "v1.2/labels"
    else:
        lbl_dir = require_dir(root, f"{sdir}/labels", "mapillary", LAYOUT)
    pairs = pair_by_suffix(img_dir, ".jpg", lbl_dir, ".png", recursive=False)
    if not pairs:
        raise layout_error("mapillary", LAYOUT, root, f"no .jpg images in {sdir}/images")
    return pairs


SPEC = register_dataset(
    DatasetSpec(
        name="mapillary",
        label_format="mapillary",
        splits=("train", "val", "training", "validation"),
        default_split="val",
        layout=LAYOUT,
        find_pairs=find_pairs,
        archives="mapillary-vistas-dataset_public_v1.2.zip (or v2.0, which carries the v1.2 masks)",
        notes="18,000 train / 2,000 val images of varying size. v1.2 -> 19 classes: labels.MAPILLARY_V12_TO_TRAINID.",
    )
)
