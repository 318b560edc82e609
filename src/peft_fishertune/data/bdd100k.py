"""BDD100K semantic segmentation (10K subset). Masks are trainIds (255 = ignore)."""

from __future__ import annotations

from pathlib import Path

from .registry import DatasetSpec, layout_error, pair_by_suffix, register_dataset

LAYOUT = """\
<root>/                       bdd100k_images_10k.zip + bdd100k_sem_seg_labels_trainval.zip unpacked here
  images/10k/{train,val}/<name>.jpg                 (root may also be the folder holding bdd100k/)
  labels/sem_seg/masks/{train,val}/<name>.png       (trainIds 0..18, 255 = ignore)
or the older bdd100k_seg.zip layout:
  seg/images/{train,val}/<name>.jpg
  seg/labels/{train,val}/<name>_train_id.png"""


def find_pairs(root: Path, split: str, condition: str | None):
    base = root / "bdd100k" if (root / "bdd100k").is_dir() else root
    if (base / "images/10k" / split).is_dir():
        img_dir, lbl_dir, suffix = base / "images/10k" / split, base / "labels/sem_seg/masks" / split, ".png"
        if not lbl_dir.is_dir():
            raise layout_error("bdd100k", LAYOUT, root, f"missing folder 'labels/sem_seg/masks/{split}'")
    elif (base / "seg/images" / split).is_dir():
        img_dir, lbl_dir, suffix = base / "seg/images" / split, base / "seg/labels" / split, "_train_id.png"
        if not lbl_dir.is_dir():
            raise layout_error("bdd100k", LAYOUT, root, f"missing folder 'seg/labels/{split}'")
    else:
        raise layout_error("bdd100k", LAYOUT, root, f"neither images/10k/{split} nor seg/images/{split} exists")
    pairs = pair_by_suffix(img_dir, ".jpg", lbl_dir, suffix, recursive=False)
    if not pairs:
        raise layout_error("bdd100k", LAYOUT, root, f"no .jpg images in {img_dir}")
    return pairs


SPEC = register_dataset(
    DatasetSpec(
        name="bdd100k",
        label_format="trainIds",
        splits=("train", "val"),
        default_split="val",
        layout=LAYOUT,
        find_pairs=find_pairs,
        archives="bdd100k_images_10k.zip, bdd100k_sem_seg_labels_trainval.zip",
        notes="7,000 train / 1,000 val images, 1280x720.",
    )
)
