"""ACDC (Adverse Conditions Dataset with Correspondences). Masks are labelTrainIds."""

from __future__ import annotations

from pathlib import Path

from .registry import DatasetSpec, layout_error, pair_by_suffix, register_dataset, require_dir

CONDITIONS = ("fog", "night", "rain", "snow")
LAYOUT = """\
<root>/                       rgb_anon_trainvaltest.zip + gt_trainval.zip unpacked here
  rgb_anon/{fog,night,rain,snow}/{train,val}/<sequence>/<sequence>_frame_<n>_rgb_anon.png
  gt/{fog,night,rain,snow}/{train,val}/<sequence>/<sequence>_frame_<n>_gt_labelTrainIds.png
                              (or only *_gt_labelIds.png: read as Cityscapes label IDs when no
                              *_gt_labelTrainIds.png exists; condition=None reads all four conditions)"""


def find_pairs(root: Path, split: str, condition: str | None):
    conditions = CONDITIONS if condition is None else (condition,)
    pairs = []
    for cond in conditions:
        img_dir = require_dir(root, f"rgb_anon/{cond}/{split}", "acdc", LAYOUT)
        lbl_dir = require_dir(root, f"gt/{cond}/{split}", "acdc", LAYOUT)
        found = pair_by_suffix(img_dir, "_rgb_anon.png", lbl_dir, "_gt_labelTrainIds.png")
        if not found:
            raise layout_error("acdc", LAYOUT, root, f"no *_rgb_anon.png under rgb_anon/{cond}/{split}")
        pairs += found
    return pairs


SPEC = register_dataset(
    DatasetSpec(
        name="acdc",
        label_format="trainIds",
        splits=("train", "val"),
        default_split="val",
        conditions=CONDITIONS,
        layout=LAYOUT,
        find_pairs=find_pairs,
        archives="rgb_anon_trainvaltest.zip, gt_trainval.zip",
        notes="1920x1080; val: 100 fog, 106 night, 100 rain, 100 snow. Test labels are withheld.",
        label_fallback=("_gt_labelTrainIds.png", "_gt_labelIds.png", "labelIds"),
    )
)
