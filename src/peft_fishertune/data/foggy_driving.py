"""Foggy Driving (101 images: 33 fine + 68 coarse). Masks are labelTrainIds."""

from __future__ import annotations

from pathlib import Path

from .registry import DatasetSpec, pair_from_lists, register_dataset

LAYOUT = """\
<root>/                       Foggy_Driving.zip unpacked; root = the Foggy_Driving/ folder
  leftImg8bit/test/..., leftImg8bit/test_extra/...   (images, paths as listed below)
  gtFine/test/... *_labelTrainIds.png, gtCoarse/test_extra/... *_labelTrainIds.png
  lists_file_names/leftImg8bit_testall_filenames.txt   + gt_testall_filenames.txt   (split 'test', 101)
  lists_file_names/leftImg8bit_testdense_filenames.txt + gt_testdense_filenames.txt (split 'test_dense', 33)"""

_LISTS = {"test": "testall", "test_dense": "testdense"}


def find_pairs(root: Path, split: str, condition: str | None):
    tag = _LISTS[split]
    return pair_from_lists(
        root,
        f"lists_file_names/leftImg8bit_{tag}_filenames.txt",
        f"lists_file_names/gt_{tag}_filenames.txt",
        "foggy_driving",
        LAYOUT,
        lbl_must_contain="labelTrainIds",
    )


SPEC = register_dataset(
    DatasetSpec(
        name="foggy_driving",
        label_format="trainIds",
        splits=("test", "test_dense"),
        default_split="test",
        layout=LAYOUT,
        find_pairs=find_pairs,
        archives="Foggy_Driving.zip",
        notes="101 real foggy images (33 finely, 68 coarsely annotated); 'test' = all 101 (DG papers), 'test_dense' = 33.",
    )
)
