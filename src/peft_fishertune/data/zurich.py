"""Foggy Zurich (test v2, 40 labeled images) and Dark Zurich (val, 50 night images). Masks are labelTrainIds."""

from __future__ import annotations

from pathlib import Path

from .registry import DatasetSpec, layout_error, pair_by_suffix, pair_from_lists, register_dataset, require_dir

FOGGY_LAYOUT = """\
<root>/                       Foggy_Zurich.zip unpacked; root = the Foggy_Zurich/ folder
  RGB/<recording>/<name>.png
  gt_labelTrainIds/testv2/<recording>/<name>.png   (paths as listed below)
  lists_file_names/RGB_testv2_filenames.txt              (image paths relative to root)
  lists_file_names/gt_labelTrainIds_testv2_filenames.txt (label paths, same order)"""


def find_foggy_zurich(root: Path, split: str, condition: str | None):
    return pair_from_lists(
        root,
        "lists_file_names/RGB_testv2_filenames.txt",
        "lists_file_names/gt_labelTrainIds_testv2_filenames.txt",
        "foggy_zurich",
        FOGGY_LAYOUT,
        lbl_must_contain="labelTrainIds",
    )


DARK_LAYOUT = """\
<root>/                       Dark_Zurich_val_anon.zip unpacked here
  rgb_anon/val/night/<recording>/<recording>_frame_<n>_rgb_anon.png
  gt/val/night/<recording>/<recording>_frame_<n>_gt_labelTrainIds.png"""


def find_dark_zurich(root: Path, split: str, condition: str | None):
    img_dir = require_dir(root, f"rgb_anon/{split}/night", "dark_zurich", DARK_LAYOUT)
    lbl_dir = require_dir(root, f"gt/{split}/night", "dark_zurich", DARK_LAYOUT)
    pairs = pair_by_suffix(img_dir, "_rgb_anon.png", lbl_dir, "_gt_labelTrainIds.png")
    if not pairs:
        raise layout_error("dark_zurich", DARK_LAYOUT, root, f"no *_rgb_anon.png under rgb_anon/{split}/night")
    return pairs


FOGGY_SPEC = register_dataset(
    DatasetSpec(
        name="foggy_zurich",
        label_format="trainIds",
        splits=("test",),
        default_split="test",
        layout=FOGGY_LAYOUT,
        find_pairs=find_foggy_zurich,
        archives="Foggy_Zurich.zip",
        notes="40 labeled foggy images (test v2), 1920x1080.",
    )
)
DARK_SPEC = register_dataset(
    DatasetSpec(
        name="dark_zurich",
        label_format="trainIds",
        splits=("val",),
        default_split="val",
        layout=DARK_LAYOUT,
        find_pairs=find_dark_zurich,
        archives="Dark_Zurich_val_anon.zip",
        notes="50 labeled nighttime images (val), 1920x1080. Test labels are withheld.",
    )
)
