"""``load_dgss_dataset``: any registered dataset as a ``datasets.Dataset`` of file paths.

Mechanism (datasets 5 has no loading scripts): ``Dataset.from_dict`` with the
image/label *paths*, cast to ``datasets.Image(decode=False)``. Nothing is copied
into an Arrow cache (the table holds paths only, in memory), building it costs
one directory walk, and decoding is lazy. Decoding and the raw-ID -> trainId
mapping happen in a format transform, :class:`DGSSDecoder`, installed with
``set_transform``; it opens files itself so every fault names the file. Its
configuration is stored as JSON in ``dataset.info.description`` so that
:func:`with_dgss_transform` can put a training/eval transform behind the
decoder without losing the mapping.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np
from PIL import Image

from .checks import (
    FileCheckCache,
    check_label_plausibility,
    header_facts,
    image_facts,
    label_facts,
    label_mode_problem,
    resolve_label_check,
    resolve_role,
)
from .labels import build_lut
from .registry import SIZE_MISMATCH_POLICIES, DatasetFileError, get_spec, layout_error

VERIFY_MODES = ("auto", "none", "headers", "full")
ON_FAULT = ("error", "skip")
UNKNOWN_LABEL = ("error", "ignore")
_INFO_KEY = "peft_fishertune.dgss"
_VERIFY_THREADS = 8  # files decoded at once by verify='full' (at most the CPU count)


def _fmt_files(files: list[str], limit: int = 10) -> str:
    shown = "\n  ".join(files[:limit])
    more = f"\n  ... and {len(files) - limit} more" if len(files) > limit else ""
    return f"\n  {shown}{more}"


class DGSSDecoder:
    """Format transform: ``{"image": [{"path"}], "label": [{"path"}]}`` batch -> decoded samples.

    Without ``transform`` it returns ``{"image": [PIL RGB], "label": [PIL "L" trainIds]}``.
    With ``transform`` (called as ``transform(image, label_array)`` and returning a
    dict) it returns that dict's keys, e.g. ``pixel_values`` / ``labels``.
    """

    def __init__(
        self,
        name: str,
        label_format: str,
        size_mismatch: str = "error",
        unknown_label: str = "error",
        transform: Callable[[Image.Image, np.ndarray], dict] | None = None,
    ):
        if size_mismatch not in SIZE_MISMATCH_POLICIES:
            raise ValueError(f"size_mismatch={size_mismatch!r} is not one of {SIZE_MISMATCH_POLICIES}")
        if unknown_label not in UNKNOWN_LABEL:
            raise ValueError(f"unknown_label={unknown_label!r} is not one of {UNKNOWN_LABEL}")
        self.name = name
        self.label_format = label_format
        self.size_mismatch = size_mismatch
        self.unknown_label = unknown_label
        self.transform = transform
        self.lut, self.valid = build_lut(label_format)
        self.warned: set[str] = set()  # files already warned about in this process
        self.num_size_mismatch = 0
        self.num_unknown_label = 0

    def config(self) -> dict:
        return {
            "name": self.name,
            "label_format": self.label_format,
            "size_mismatch": self.size_mismatch,
            "unknown_label": self.unknown_label,
        }

    def _warn_once(self, path: str, msg: str) -> None:
        if path not in self.warned:
            self.warned.add(path)
            warnings.warn(msg, stacklevel=3)

    def open_image(self, path: str) -> Image.Image:
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - every decode failure gets the file name
            raise DatasetFileError(f"{self.name}: cannot read image file {path}: {exc}") from exc

    def open_label(self, path: str) -> np.ndarray:
        """Decode a mask and map it to trainIds (uint8 H x W)."""
        try:
            with Image.open(path) as im:
                im.load()
                problem = label_mode_problem(im.mode)
                if problem:
                    raise DatasetFileError(f"{self.name}: label file {path} has {problem}")
                raw = np.asarray(im)  # palette PNGs give the index = the raw ID
        except DatasetFileError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise DatasetFileError(f"{self.name}: cannot read label file {path}: {exc}") from exc
        bad = ~self.valid[raw]
        if bad.any():
            values = sorted(int(v) for v in np.unique(raw[bad]))
            msg = (
                f"{self.name}: label file {path} holds raw values {values[:20]} ({int(bad.sum())} pixels) that are "
                f"not in the {self.label_format} table"
            )
            if self.unknown_label == "error":
                raise DatasetFileError(msg + " (pass unknown_label='ignore' to map them to 255 with a warning)")
            self.num_unknown_label += 1
            self._warn_once(path, f"{msg}; mapped to 255 ({self.num_unknown_label} such files so far)")
        return self.lut[raw]

    def decode(self, image_path: str, label_path: str) -> tuple[Image.Image, np.ndarray]:
        image = self.open_image(image_path)
        label = self.open_label(label_path)
        lh, lw = label.shape
        if image.size != (lw, lh):
            what = f"{self.name}: image {image_path} is {image.size[0]}x{image.size[1]} but label {label_path} is {lw}x{lh}"
            if self.size_mismatch in ("error", "skip"):
                hint = " (size_mismatch='skip' drops such pairs when loading)" if self.size_mismatch == "error" else ""
                raise DatasetFileError(what + hint)
            self.num_size_mismatch += 1
            if self.size_mismatch == "resize_image":
                image = image.resize((lw, lh), Image.BILINEAR)
                self._warn_once(image_path, f"{what}; image resized to the label size ({self.num_size_mismatch} so far)")
            else:  # resize_label
                label = np.asarray(Image.fromarray(label).resize(image.size, Image.NEAREST))
                self._warn_once(image_path, f"{what}; label resized (nearest) to the image size ({self.num_size_mismatch} so far)")
        return image, label

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {}
        for img_ref, lbl_ref in zip(batch["image"], batch["label"]):
            image, label = self.decode(img_ref["path"], lbl_ref["path"])
            sample = self.transform(image, label) if self.transform is not None else {
                "image": image,
                "label": Image.fromarray(label, mode="L"),
            }
            for k, v in sample.items():
                out.setdefault(k, []).append(v)
        return out


def _verify(decoder: DGSSDecoder, pairs, mode: str, size_policy: str, cache: FileCheckCache
            ) -> tuple[list, dict[str, list[str]]]:
    """Scan every pair; return (good pairs, {fault kind: [messages]}).

    ``mode="headers"`` reads each file's header (size, mode); ``"full"`` decodes every byte of every image and
    label (``Image.load``: a truncated file fails) and looks every label value up in the table. Full results are
    cached per file by (size, mtime) in ``cache``, so a second load of unchanged files decodes nothing.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    def scan(pair):  # (image facts | exception, label facts | exception); PIL decodes outside the GIL
        out = []
        for path, kind, full in ((pair[0], "image", image_facts), (pair[1], "label", label_facts)):
            try:
                out.append(cache.facts(path, kind, full) if mode == "full" else header_facts(path))
            except Exception as exc:  # noqa: BLE001 - every failure is reported with the file
                out.append(exc)
        return out

    faults: dict[str, list[str]] = {"unreadable": [], "size_mismatch": [], "unknown_label": []}
    good = []
    workers = min(_VERIFY_THREADS, os.cpu_count() or 1) if mode == "full" else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        scanned = pool.map(scan, pairs) if workers > 1 else map(scan, pairs)
        scanned = list(tqdm(scanned, total=len(pairs), desc=f"verifying {decoder.name}", unit="pair",
                            disable=len(pairs) < 200))
    for (img, lbl), facts in zip(pairs, scanned):
        failed = [(path, f) for path, f in zip((img, lbl), facts) if isinstance(f, Exception)]
        if failed:
            faults["unreadable"] += [f"{path}: {exc}" for path, exc in failed]
            continue
        problem = label_mode_problem(facts[1]["mode"])
        if problem:
            faults["unreadable"].append(f"{lbl}: {problem}")
            continue
        ok = True
        if mode == "full":
            vals = [int(v) for v in sorted(map(int, facts[1]["hist"])) if not decoder.valid[int(v)]]
            if vals:
                faults["unknown_label"].append(f"{lbl}: raw values {vals[:20]} are not in the {decoder.label_format} table")
                ok = decoder.unknown_label == "ignore"
        sizes = [(f["w"], f["h"]) for f in facts]
        if ok and sizes[0] != sizes[1]:
            faults["size_mismatch"].append(f"{img} {sizes[0]} vs {lbl} {sizes[1]}")
            ok = size_policy in ("resize_image", "resize_label")
        if ok:
            good.append((img, lbl))
    return good, faults


def _label_fallback(spec, pairs) -> tuple[list, str]:
    """(pairs, label format): the spec's fallback label files when none of the usual ones exists (said once)."""
    if not spec.label_fallback or not pairs:
        return pairs, spec.label_format
    suffix, alt_suffix, alt_format = spec.label_fallback
    if any(os.path.isfile(lbl) for _, lbl in pairs) or not all(lbl.endswith(suffix) for _, lbl in pairs):
        return pairs, spec.label_format
    alt = [(img, lbl[: -len(suffix)] + alt_suffix) for img, lbl in pairs]
    found = sum(os.path.isfile(lbl) for _, lbl in alt)
    if not found:
        return pairs, spec.label_format  # neither: reported as missing labels, by their usual name
    how = "as trainIds (no label-ID mapping)" if alt_format == "trainIds" else f"as {alt_format} (mapped to trainIds)"
    warnings.warn(
        f"{spec.name}: no *{suffix} label file exists for the {len(pairs)} images; reading the {found} "
        f"*{alt_suffix} files instead, {how}. (e.g. {alt[0][1]})",
        stacklevel=3,
    )
    return alt, alt_format


def load_dgss_dataset(
    name: str,
    root: str | os.PathLike,
    split: str | None = None,
    condition: str | None = None,
    *,
    transform: Callable[[Image.Image, np.ndarray], dict] | None = None,
    on_fault: str = "error",
    size_mismatch: str | None = None,
    unknown_label: str = "error",
    verify: str = "auto",
    role: str | None = None,
    label_check: str | None = None,
) -> datasets.Dataset:
    """Load a DGSS dataset from its official on-disk layout.

    Args:
        name: a registered dataset (``list_datasets()``): gta5, cityscapes, acdc, bdd100k,
            mapillary, foggy_zurich, foggy_driving, dark_zurich, nighttime_driving.
        root: the folder the official archives were unpacked into (see docs/data.md).
        split: one of the dataset's splits; ``None`` = its default (the evaluation split,
            or ``all`` for GTA5). Mapillary also accepts its official names ``training`` / ``validation``.
        condition: ACDC only: fog / night / rain / snow; ``None`` = all four.
        transform: optional ``transform(image: PIL RGB, label: uint8 trainId array) -> dict``
            run after decoding (e.g. :class:`~peft_fishertune.data.transforms.TrainTransform`).
        on_fault: ``"error"`` (default) raises on an image without a label (and, when
            verifying, on unreadable files / bad values / size mismatches the policy does
            not repair); ``"skip"`` drops those pairs with one warning that counts and names them.
        size_mismatch: policy for image/label pairs of different size; ``None`` = the
            dataset's default (GTA5: ``"resize_image"``, others ``"error"``).
            ``resize_image``/``resize_label`` repair at decode time with a warning naming the
            file; ``skip``/``error`` scan all headers when loading.
        unknown_label: a raw mask value outside the dataset's table: ``"error"`` (default)
            or ``"ignore"`` (-> 255, warning naming the file).
        verify: ``"auto"`` (default: ``"full"`` for an evaluation set, ``"none"`` for a training set),
            ``"none"`` (faults surface when a sample is decoded, naming the file), ``"headers"`` (open
            every file's header when loading: unreadable files, label modes, sizes) or ``"full"`` (also
            decode every image and label to the last byte: truncated files, label values). Full
            results are cached per file by (size, mtime) under ``$PEFT_FISHERTUNE_CACHE/data_checks``,
            so loading unchanged files again costs one ``stat`` each.
        role: ``"train"`` or ``"eval"``; ``None`` = ``"train"`` for the splits train / all / training,
            else ``"eval"``. Decides ``verify="auto"`` and how strict the label check is.
        label_check: the label plausibility check on a sample of 24 label files (cached) when the
            dataset is built (:func:`peft_fishertune.data.checks.check_label_plausibility`):
            ``"error"`` refuses trainIds stored under a labelIds name, values outside the table and
            all-ignore training labels, and warns on a training set whose sampled ignore fraction is
            above 60 %; ``"warn"`` only warns; ``"off"`` skips it. ``None`` = ``$PEFT_FISHERTUNE_LABEL_CHECK``
            or ``"error"``.

    Returns:
        ``datasets.Dataset`` with columns ``image`` and ``label`` (``datasets.Image(decode=False)``
        holding paths). Indexing it decodes through :class:`DGSSDecoder`:
        ``ds[i]["image"]`` is a PIL RGB image, ``ds[i]["label"]`` a PIL ``"L"`` image of
        trainIds (0..18, 255 = ignore).
    """
    spec = get_spec(name)
    split = spec.default_split if split is None else split
    if split not in spec.splits:
        raise ValueError(f"{name}: split={split!r} is not one of {spec.splits}")
    if condition is not None:
        if not spec.conditions:
            raise ValueError(f"{name}: condition={condition!r} given, but {name} has no conditions")
        if condition not in spec.conditions:
            raise ValueError(f"{name}: condition={condition!r} is not one of {spec.conditions}")
    if on_fault not in ON_FAULT:
        raise ValueError(f"on_fault={on_fault!r} is not one of {ON_FAULT}")
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify={verify!r} is not one of {VERIFY_MODES}")
    role = resolve_role(role, split)
    label_check = resolve_label_check(label_check)
    if verify == "auto":
        verify = "full" if role == "eval" else "none"
    size_policy = spec.size_mismatch if size_mismatch is None else size_mismatch
    if size_policy not in SIZE_MISMATCH_POLICIES:
        raise ValueError(f"size_mismatch={size_policy!r} is not one of {SIZE_MISMATCH_POLICIES}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise layout_error(name, spec.layout, root, "root is not a folder")

    pairs = spec.find_pairs(root, split, condition)
    pairs, label_format = _label_fallback(spec, pairs)
    decoder = DGSSDecoder(name, label_format, size_policy, unknown_label, transform)

    # images listed (or found) without their label, or list entries pointing nowhere
    missing = [f"{img} (image missing)" for img, _ in pairs if not os.path.isfile(img)]
    missing += [f"{img} -> expected label {lbl}" for img, lbl in pairs if os.path.isfile(img) and not os.path.isfile(lbl)]
    if missing:
        msg = f"{name} ({split}): {len(missing)} of {len(pairs)} images have no label file:{_fmt_files(missing)}"
        if spec.label_fallback and label_format == spec.label_format:
            suffix, alt_suffix, _ = spec.label_fallback
            alt = [l for i, l in pairs if os.path.isfile(i) and not os.path.isfile(l) and l.endswith(suffix)
                   and os.path.isfile(l[: -len(suffix)] + alt_suffix)]
            if alt:
                msg += (f"\n{len(alt)} of them have a *{alt_suffix} instead: this copy mixes both label files; the "
                        f"*{alt_suffix} files are read only when no *{suffix} exists (regenerate the missing ones)")
        if on_fault == "error":
            raise DatasetFileError(msg + "\n(pass on_fault='skip' to drop them)")
        warnings.warn(msg + "\nskipped.", stacklevel=2)
        pairs = [(i, l) for i, l in pairs if os.path.isfile(i) and os.path.isfile(l)]

    if size_mismatch in ("skip", "error") and verify == "none":
        verify = "headers"  # an explicit skip/error policy is decided when loading (documented)
    cache = FileCheckCache(root)
    if verify != "none":
        good, faults = _verify(decoder, pairs, verify, size_policy, cache)
        cache.save()  # what decoded fine is kept even when the faults below stop this load
        if size_policy == "error" and faults["size_mismatch"]:
            raise DatasetFileError(
                f"{name}: {len(faults['size_mismatch'])} image/label pairs differ in size:"
                f"{_fmt_files(faults['size_mismatch'])}\n(size_mismatch='skip' or 'resize_image' handles them)"
            )
        if size_policy == "skip" and faults["size_mismatch"]:
            warnings.warn(
                f"{name}: skipped {len(faults['size_mismatch'])} pairs whose image and label differ in size:"
                f"{_fmt_files(faults['size_mismatch'])}",
                stacklevel=2,
            )
        hard = faults["unreadable"] + (faults["unknown_label"] if unknown_label == "error" else [])
        if hard:
            msg = f"{name} ({split}): {len(hard)} faulty files (verify={verify!r}):{_fmt_files(hard)}"
            if on_fault == "error":
                raise DatasetFileError(msg + "\n(pass on_fault='skip' to drop them)")
            warnings.warn(msg + "\nskipped.", stacklevel=2)
        if unknown_label == "ignore" and faults["unknown_label"]:
            warnings.warn(
                f"{name}: {len(faults['unknown_label'])} label files hold values outside the table (mapped to 255):"
                f"{_fmt_files(faults['unknown_label'])}",
                stacklevel=2,
            )
        pairs = good
    if not pairs:
        raise DatasetFileError(f"{name} ({split}): no usable image/label pairs under {root}")
    try:
        check_label_plausibility(name, split, label_format, pairs, role=role, label_check=label_check, cache=cache,
                                 on_fault=on_fault, unknown_label=unknown_label)
    finally:
        cache.save()

    info = datasets.DatasetInfo(
        description=json.dumps({_INFO_KEY: {**decoder.config(), "split": split, "condition": condition, "root": str(root)}}),
        dataset_name=name,
        config_name=condition or "default",
    )
    ds = datasets.Dataset.from_dict(
        {"image": [p[0] for p in pairs], "label": [p[1] for p in pairs]}, info=info, split=datasets.NamedSplit(split)
    )
    ds = ds.cast_column("image", datasets.Image(decode=False)).cast_column("label", datasets.Image(decode=False))
    ds.set_transform(decoder)
    return ds


def dgss_config(ds: datasets.Dataset) -> dict[str, Any]:
    """The decoder configuration ``load_dgss_dataset`` stored in ``ds.info``."""
    try:
        return json.loads(ds.info.description)[_INFO_KEY]
    except (TypeError, ValueError, KeyError):
        raise ValueError(
            "this dataset was not made by load_dgss_dataset (ds.info.description holds no "
            f"{_INFO_KEY!r} entry), so its label mapping is unknown"
        ) from None


def with_dgss_transform(ds: datasets.Dataset, transform: Callable | None) -> datasets.Dataset:
    """Return ``ds`` decoding through :class:`DGSSDecoder` and then ``transform``.

    Use this instead of ``ds.set_transform(transform)``, which would replace the decoder
    and with it the raw-ID -> trainId mapping.
    """
    cfg = dgss_config(ds)
    dec = DGSSDecoder(cfg["name"], cfg["label_format"], cfg["size_mismatch"], cfg["unknown_label"], transform)
    return ds.with_transform(dec)
