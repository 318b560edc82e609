"""GTA5 (Playing for Data). Masks are 8-bit palette PNGs whose index is the Cityscapes label ID."""

from __future__ import annotations

from pathlib import Path

from .registry import DatasetFileError, DatasetSpec, layout_error, register_dataset, require_dir

LAYOUT = """\
<root>/                       01_images.zip..10_images.zip and 01_labels.zip..10_labels.zip unpacked here
  images/00001.png .. 24966.png
  labels/00001.png .. 24966.png   (palette PNG, index = Cityscapes label ID 0..33)
  split.mat                   (only for split train/val/test: from read_mapping.zip; 1-based
                               trainIds/valIds/testIds; split 'all' = the 24,966 images DG papers train on)"""


def _split_ids(root: Path, split: str) -> list[int]:
    mat = root / "split.mat"
    if not mat.is_file():
        raise layout_error("gta5", LAYOUT, root, f"split={split!r} needs split.mat (use split='all' without it)")
    import scipy.io

    try:
        data = scipy.io.loadmat(str(mat))
    except Exception as exc:  # noqa: BLE001 - re-raised with the file name
        raise DatasetFileError(f"gta5: cannot read {mat}: {exc}") from exc
    key = f"{split}Ids"
    if key not in data:
        raise DatasetFileError(f"gta5: {mat} has no field {key!r} (fields: {[k for k in data if not k.startswith('__')]})")
    return [int(i) for i in data[key].ravel()]


def find_pairs(root: Path, split: str, condition: str | None):
    img_dir = require_dir(root, "images", "gta5", LAYOUT)
    lbl_dir = require_dir(root, "labels", "gta5", LAYOUT)
    if split == "all":
        names = sorted(p.name for p in img_dir.iterdir() if p.suffix == ".png")
        if not names:
            raise layout_error("gta5", LAYOUT, root, "no .png files in images/")
    else:
        names = [f"{i:05d}.png" for i in _split_ids(root, split)]
    return [(str(img_dir / n), str(lbl_dir / n)) for n in names]


SPEC = register_dataset(
    DatasetSpec(
        name="gta5",
        label_format="labelIds",
        splits=("all", "train", "val", "test"),
        default_split="all",
        layout=LAYOUT,
        find_pairs=find_pairs,
        size_mismatch="resize_image",
        archives="01..10_images.zip, 01..10_labels.zip (+ read_mapping.zip for split.mat)",
        notes="24,966 images, 1914x1052. A few image/label pairs differ in size: see size_mismatch.",
    )
)
