"""Cityscapes (fine annotations). Masks hold Cityscapes label IDs (or, in a copy with only *_gtFine_labelTrainIds.png, trainIds)."""

from __future__ import annotations

from pathlib import Path

from .registry import DatasetSpec, layout_error, pair_by_suffix, register_dataset, require_dir

LAYOUT = """\
<root>/                       leftImg8bit_trainvaltest.zip + gtFine_trainvaltest.zip unpacked here
  leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
  gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
                              (label IDs 0..33; *_labelTrainIds.png from cityscapesScripts is not needed; a copy
                              holding only *_gtFine_labelTrainIds.png (mmseg's convention) is read as trainIds)"""


def find_pairs(root: Path, split: str, condition: str | None):
    img_dir = require_dir(root, f"leftImg8bit/{split}", "cityscapes", LAYOUT)
    lbl_dir = require_dir(root, f"gtFine/{split}", "cityscapes", LAYOUT)
    pairs = pair_by_suffix(img_dir, "_leftImg8bit.png", lbl_dir, "_gtFine_labelIds.png")
    if not pairs:
        raise layout_error("cityscapes", LAYOUT, root, f"no *_leftImg8bit.png under leftImg8bit/{split}")
    return pairs


SPEC = register_dataset(
    DatasetSpec(
        name="cityscapes",
        label_format="labelIds",
        splits=("train", "val", "test"),
        default_split="val",
        layout=LAYOUT,
        find_pairs=find_pairs,
        archives="leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip",
        notes="2975 train / 500 val images, 2048x1024. Test labels are withheld (all void).",
        label_fallback=("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png", "trainIds"),
    )
)
