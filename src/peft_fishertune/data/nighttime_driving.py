"""Nighttime Driving test set (50 coarsely annotated night images). Masks are labelTrainIds."""

from __future__ import annotations

from pathlib import Path

from .registry import DatasetSpec, layout_error, pair_by_suffix, register_dataset, require_dir

LAYOUT = """\
<root>/                       NighttimeDrivingTest.zip unpacked; root = the NighttimeDrivingTest/ folder
  leftImg8bit/test/night/<name>_leftImg8bit.png
  gtCoarse_daytime_trainvaltest/test/night/<name>_gtCoarse_labelTrainIds.png"""


def find_pairs(root: Path, split: str, condition: str | None):
    img_dir = require_dir(root, "leftImg8bit/test/night", "nighttime_driving", LAYOUT)
    lbl_dir = require_dir(root, "gtCoarse_daytime_trainvaltest/test/night", "nighttime_driving", LAYOUT)
    pairs = pair_by_suffix(img_dir, "_leftImg8bit.png", lbl_dir, "_gtCoarse_labelTrainIds.png")
    if not pairs:
        raise layout_error("nighttime_driving", LAYOUT, root, "no *_leftImg8bit.png under leftImg8bit/test/night")
    return pairs


SPEC = register_dataset(
    DatasetSpec(
        name="nighttime_driving",
        label_format="trainIds",
        splits=("test",),
        default_split="test",
        layout=LAYOUT,
        find_pairs=find_pairs,
        archives="NighttimeDrivingTest.zip",
        notes="50 night images, 1920x1080, coarse labels.",
    )
)
