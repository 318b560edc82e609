"""Dataset registry: one :class:`DatasetSpec` per dataset, one small module per family.

Adding a dataset = writing a module that builds a ``DatasetSpec`` (its on-disk
layout, its label encoding, a function listing ``(image, label)`` pairs) and
calls :func:`register_dataset`, then importing that module in
``peft_fishertune/data/__init__.py``. Registration happens there, explicitly, so
``load_dgss_dataset`` never depends on the caller having imported something.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .labels import LABEL_FORMATS

# (image path, label path); the label path is where the label *should* be and
# may not exist (the loader reports missing labels).
Pair = tuple[str, str]
PairFinder = Callable[[Path, str, "str | None"], list[Pair]]

SIZE_MISMATCH_POLICIES = ("resize_image", "resize_label", "skip", "error")


class DatasetLayoutError(FileNotFoundError):
    """The root does not hold the dataset's official layout; the message shows it."""


class DatasetFileError(ValueError):
    """A file of the dataset is missing, unreadable, or holds unexpected content."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    label_format: str  # one of labels.LABEL_FORMATS
    splits: tuple[str, ...]
    default_split: str
    layout: str  # the expected tree under root, printed on layout errors
    find_pairs: PairFinder
    conditions: tuple[str, ...] = ()  # e.g. ACDC fog/night/rain/snow; () = none
    size_mismatch: str = "error"  # default policy for image/label size mismatch
    archives: str = ""  # which official archives to unpack into root
    notes: str = ""
    # (label suffix, fallback suffix, fallback label_format): when *no* label with the suffix exists, read the
    # fallback files instead (ACDC: *_gt_labelIds.png when *_gt_labelTrainIds.png were not generated)
    label_fallback: tuple[str, str, str] = ()

    def __post_init__(self):
        if self.label_format not in LABEL_FORMATS:
            raise ValueError(f"DatasetSpec {self.name}: label_format={self.label_format!r} not in {LABEL_FORMATS}")
        if self.default_split not in self.splits:
            raise ValueError(f"DatasetSpec {self.name}: default_split={self.default_split!r} not in {self.splits}")
        if self.label_fallback and (len(self.label_fallback) != 3 or self.label_fallback[2] not in LABEL_FORMATS):
            raise ValueError(f"DatasetSpec {self.name}: label_fallback={self.label_fallback!r}: expected "
                             f"(suffix, fallback suffix, one of {LABEL_FORMATS})")
        if self.size_mismatch not in SIZE_MISMATCH_POLICIES:
            raise ValueError(
                f"DatasetSpec {self.name}: size_mismatch={self.size_mismatch!r} not in {SIZE_MISMATCH_POLICIES}"
            )


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec, *, overwrite: bool = False) -> DatasetSpec:
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"dataset {spec.name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> DatasetSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown dataset name={name!r}; registered: {sorted(_REGISTRY)}") from None


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


# ---------------------------------------------------------------- helpers for finders


def layout_error(spec_name: str, layout: str, root: Path, problem: str) -> DatasetLayoutError:
    return DatasetLayoutError(
        f"{spec_name}: {problem}\nroot={str(root)!r} does not look like the official layout. Expected:\n{layout}"
    )


def require_dir(root: Path, rel: str, spec_name: str, layout: str) -> Path:
    path = root / rel
    if not path.is_dir():
        raise layout_error(spec_name, layout, root, f"missing folder {rel!r}")
    return path


def files_with_suffix(folder: Path, suffix: str, recursive: bool = True) -> list[Path]:
    """Sorted files under ``folder`` whose name ends with ``suffix`` (os.walk: fast on big trees)."""
    out: list[Path] = []
    if recursive:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            out.extend(Path(dirpath) / f for f in filenames if f.endswith(suffix))
    else:
        out = [p for p in folder.iterdir() if p.name.endswith(suffix)]
    return sorted(out)


def pair_by_suffix(
    img_dir: Path, img_suffix: str, lbl_dir: Path, lbl_suffix: str, recursive: bool = True
) -> list[Pair]:
    """Pair ``img_dir/<rel>/<stem><img_suffix>`` with ``lbl_dir/<rel>/<stem><lbl_suffix>``."""
    pairs = []
    for img in files_with_suffix(img_dir, img_suffix, recursive):
        rel = img.relative_to(img_dir)
        stem = rel.name[: -len(img_suffix)]
        pairs.append((str(img), str(lbl_dir / rel.parent / (stem + lbl_suffix))))
    return pairs


def read_list(root: Path, rel: str, spec_name: str, layout: str) -> list[str]:
    """Non-empty lines of a ``lists_file_names``-style file under ``root``."""
    path = root / rel
    if not path.is_file():
        raise layout_error(spec_name, layout, root, f"missing list file {rel!r}")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def pair_from_lists(
    root: Path, img_list: str, lbl_list: str, spec_name: str, layout: str, lbl_must_contain: str
) -> list[Pair]:
    """Pair line i of ``img_list`` with line i of ``lbl_list`` (paths relative to ``root``)."""
    imgs = read_list(root, img_list, spec_name, layout)
    lbls = read_list(root, lbl_list, spec_name, layout)
    if len(imgs) != len(lbls):
        raise DatasetFileError(
            f"{spec_name}: {img_list} has {len(imgs)} lines but {lbl_list} has {len(lbls)}; they must pair line by line"
        )
    for ln in lbls:
        if lbl_must_contain not in ln:
            raise DatasetFileError(
                f"{spec_name}: {lbl_list} lists {ln!r}; expected label files named *{lbl_must_contain}*"
            )
    return [(str(root / a), str(root / b)) for a, b in zip(imgs, lbls)]
