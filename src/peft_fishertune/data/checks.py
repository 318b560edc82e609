"""Checks of a dataset's files before any work: label plausibility on a sample, and full verification.

Both run inside :func:`~peft_fishertune.data.load_dgss_dataset`, so every caller (the experiment's
data build, ``scripts/evaluate.py``, user code) gets them when the dataset is built, not hours later:

- **Label plausibility** (``label_check``, default ``"error"``): 24 label files spread evenly over
  the set are decoded and their raw-value histograms compared with the dataset's label encoding.
  It refuses trainIds stored under a labelIds name, values outside the table, and (for training
  sets) labels that are all ignore; it warns when a training set's sampled ignore fraction is
  implausible (> 60 %). See :func:`check_label_plausibility` for the rules and why they hold.
- **Full verification** (``verify="full"``, the default for evaluation sets): every image and
  label is decoded to the last byte (``PIL.Image.load``: truncated files fail), label modes are
  checked (8-bit ``L``/``P``; 16-bit and colour masks are refused), sizes compared and every label
  value looked up in the table.

Decoding results are cached per file, keyed by (path, size, mtime), in
``$PEFT_FISHERTUNE_CACHE/data_checks/`` (default ``~/.cache/peft_fishertune/data_checks/``; one
JSON file per dataset root, never written inside the dataset), so a second load pays one ``stat``
per file. Failures are never cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .labels import CITYSCAPES_LABELS, IGNORE_INDEX, NUM_CLASSES, build_lut
from .registry import DatasetFileError

CACHE_ENV = "PEFT_FISHERTUNE_CACHE"
LABEL_CHECK_ENV = "PEFT_FISHERTUNE_LABEL_CHECK"  # error | warn | off: the default of label_check=None
LABEL_CHECKS = ("error", "warn", "off")
ROLES = ("train", "eval")
TRAIN_SPLITS = ("train", "all", "training")  # a split of these names is read as a training set (role=None)
SAMPLE_SIZE = 24  # label files decoded by the plausibility check, spread evenly over the set
IGNORE_WARN_FRACTION = 0.6  # a training set whose sampled labels are more ignore than this gets a warning
_CACHE_VERSION = 1
_MAX_CACHE_FILES = 256  # beyond this, cache files of roots that no longer exist are removed

# the label IDs that exist only in the labelIds encoding: 19..33 (traffic light .. bicycle)
_LABELID_ONLY = tuple(range(NUM_CLASSES, 34))
_ID_NAME = {lab.id: lab.name for lab in CITYSCAPES_LABELS if lab.id >= 0}


def cache_dir() -> Path:
    """``$PEFT_FISHERTUNE_CACHE/data_checks`` (default ``~/.cache/peft_fishertune/data_checks``)."""
    base = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "peft_fishertune")
    return Path(base) / "data_checks"


def resolve_role(role: str | None, split: str) -> str:
    if role is None:
        return "train" if split in TRAIN_SPLITS else "eval"
    if role not in ROLES:
        raise ValueError(f"role={role!r} is not one of {ROLES} (or None: 'train' for the splits {TRAIN_SPLITS})")
    return role


def resolve_label_check(label_check: str | None) -> str:
    value = label_check if label_check is not None else (os.environ.get(LABEL_CHECK_ENV) or "error")
    if value not in LABEL_CHECKS:
        where = "label_check" if label_check is not None else f"${LABEL_CHECK_ENV}"
        raise ValueError(f"{where}={value!r} is not one of {LABEL_CHECKS}")
    return value


# ------------------------------------------------------------------------------------------------ decoding


def label_mode_problem(mode: str) -> str | None:
    """Why a mask of PIL ``mode`` cannot hold raw 8-bit IDs, or None when it can (``L``, ``P``)."""
    if mode in ("L", "P"):
        return None
    if mode.startswith("I") or mode == "F":
        return (f"PIL mode {mode!r}: a 16/32-bit mask; expected a single-channel 8-bit mask ('L' or palette 'P') "
                f"of raw IDs (a 16-bit PNG is not read: its values are not IDs of any table here)")
    if mode in ("RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr"):
        return (f"PIL mode {mode!r}: a colour/multi-channel image; expected a single-channel 8-bit mask "
                f"('L' or palette 'P') of raw IDs (is it a *_color.png?)")
    return f"PIL mode {mode!r}; expected a single-channel 8-bit mask ('L' or palette 'P') of raw IDs"


def image_facts(path: str) -> dict:
    """Decode the whole image (a truncated file raises here) and return its size and mode."""
    with Image.open(path) as im:
        im.load()
        return {"w": im.width, "h": im.height, "mode": im.mode}


def label_facts(path: str) -> dict:
    """Decode the whole mask; size, mode and (8-bit masks) the histogram of raw values ``{value: pixels}``."""
    with Image.open(path) as im:
        im.load()
        facts = {"w": im.width, "h": im.height, "mode": im.mode, "hist": None}
        if im.mode in ("L", "P"):
            counts = np.bincount(np.asarray(im).ravel(), minlength=256)
            facts["hist"] = {str(v): int(counts[v]) for v in np.flatnonzero(counts)}
        return facts


def header_facts(path: str) -> dict:
    with Image.open(path) as im:
        return {"w": im.width, "h": im.height, "mode": im.mode}


def hist_array(facts: dict) -> np.ndarray:
    out = np.zeros(256, dtype=np.int64)
    for k, v in (facts.get("hist") or {}).items():
        out[int(k)] = v
    return out


class FileCheckCache:
    """What full decoding found per file, keyed by (path, size, mtime_ns); one JSON file per dataset root.

    Lives under :func:`cache_dir` (never in the dataset folder). Successes only: a file that failed is decoded
    again next time. Writes are atomic (temporary file + rename) and merge with what another process (another
    rank) saved meanwhile. A cache folder that cannot be written is skipped silently: the checks still run.
    """

    def __init__(self, root: str | os.PathLike, enabled: bool = True):
        self.root = os.path.abspath(os.fspath(root))
        self.enabled = enabled
        digest = hashlib.sha256(self.root.encode()).hexdigest()[:24]
        self.path = cache_dir() / f"{digest}.json"
        self.entries: dict[str, list] = {}
        self.dirty: dict[str, list] = {}
        self.hits = self.misses = 0
        if enabled:
            self.entries = self._read()

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or data.get("root") != self.root:
            return {}
        files = data.get("files")
        return files if isinstance(files, dict) else {}

    def facts(self, path: str, kind: str, compute: Callable[[str], dict]) -> dict:
        """The cached facts of ``path`` when its size and mtime are unchanged, else ``compute(path)`` (cached)."""
        st = os.stat(path)
        key = f"{kind}:{os.path.abspath(path)}"
        hit = self.entries.get(key)
        if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            self.hits += 1
            return hit[2]
        self.misses += 1
        facts = compute(path)
        if self.enabled:
            self.entries[key] = self.dirty[key] = [st.st_size, st.st_mtime_ns, facts]
        return facts

    def save(self) -> None:
        if not self.enabled or not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**self._read(), **self.dirty}
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp_", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": _CACHE_VERSION, "root": self.root, "saved": time.time(), "files": merged}, f)
            os.replace(tmp, self.path)
            self.dirty = {}
            self._prune()
        except OSError:
            pass

    def _prune(self) -> None:
        files = list(self.path.parent.glob("*.json"))
        if len(files) <= _MAX_CACHE_FILES:
            return
        for f in files:
            try:
                root = json.loads(f.read_text()).get("root")
                if not root or not os.path.isdir(root):
                    f.unlink()
            except (OSError, ValueError, AttributeError):
                pass


# ------------------------------------------------------------------------------------------------ plausibility


def _fmt(files: list[str], limit: int = 10) -> str:
    shown = "\n  ".join(files[:limit])
    more = f"\n  ... and {len(files) - limit} more" if len(files) > limit else ""
    return f"\n  {shown}{more}"


def sample_indices(n: int, k: int = SAMPLE_SIZE) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when n <= k); deterministic, so cached."""
    if n <= k:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


def _unknown_value_cause(label_format: str, values: list[int]) -> str:
    if label_format == "trainIds" and values and max(values) <= 33:
        return ("values 19..33 are Cityscapes label IDs, not trainIds: these look like *_labelIds.png files "
                "stored under a trainIds name")
    if label_format == "mapillary" and values and min(values) >= 66:
        return "values >= 66 look like Mapillary v2.0 masks (124 classes); the v1.2 masks (66 classes) are expected"
    if label_format == "labelIds":
        return "Cityscapes label IDs are 0..33 (255 = license plate); is the encoding of these files another one?"
    return "is the encoding of these files another one?"


def check_label_plausibility(
    name: str,
    split: str,
    label_format: str,
    pairs: list[tuple[str, str]],
    *,
    role: str,
    label_check: str,
    cache: FileCheckCache,
    on_fault: str = "error",
    unknown_label: str = "error",
) -> dict:
    """Decode a sample of the label files and refuse (``label_check="error"``) or warn on implausible labels.

    Rules, on :data:`SAMPLE_SIZE` label files spread evenly over the set (raw-value histograms):

    1. **trainIds under a labelIds name** (labelIds datasets: Cityscapes, GTA5, ACDC's labelIds
       fallback). Every street scene holds label IDs of 19..33 (traffic light/sign, vegetation,
       terrain, sky, person, rider, car, truck, bus, train, motorcycle, bicycle); in a trainIds
       file these values cannot occur (trainIds stop at 18), and 255 (ignore) is common. So:
       no pixel in 19..33 over the whole sample, every value in {0..18, 255}, and either 255
       present or at least 3 distinct values in 0..18 -> trainIds. Mapped as label IDs such
       files lose road/sidewalk/building/... (0..6 are void IDs) and swap classes
       (trainId 7 traffic sign -> label ID 7 road), which is the 82 %-ignore, 4.7-mIoU failure.
       A real labelIds sample only passes this test if none of 24 driving images shows sky, a
       car, vegetation or a sign. Refused for training and evaluation sets.
    2. **values outside the table** (with ``unknown_label="error"``): refused now instead of at
       the first decode mid-training; values 19..33 in a trainIds set are named as labelIds.
    3. **all ignore**: every sampled file maps to 255 only. A training set would train with loss
       0.0 and zero Fisher gradients: refused. An evaluation set would give NaN mIoU: warned.
    4. **implausible ignore fraction** (training sets): more than 60 % of the sampled pixels map to
       ignore (typical: 5-20 %): warned, naming the files with the most ignore.

    Files of the sample that cannot be decoded or have a wrong mode are refused (named) unless
    ``on_fault="skip"``, which leaves them to the loader. Returns a summary dict (files, ignore
    fraction, ...) for logging and tests.
    """
    if label_check == "off" or not pairs:
        return {"checked": 0}
    lut, valid = build_lut(label_format)
    to_ignore = lut == IGNORE_INDEX  # raw values that become 255 (invalid ones too, with unknown_label='ignore')
    errors: list[str] = []
    notes: list[str] = []
    broken: list[str] = []
    per_file: list[tuple[str, np.ndarray]] = []
    for i in sample_indices(len(pairs)):
        lbl = pairs[i][1]
        try:
            facts = cache.facts(lbl, "label", label_facts)
        except Exception as exc:  # noqa: BLE001 - named below
            broken.append(f"{lbl}: cannot decode: {exc}")
            continue
        problem = label_mode_problem(facts["mode"])
        if problem:
            broken.append(f"{lbl}: {problem}")
            continue
        per_file.append((lbl, hist_array(facts)))
    where = f"{name} ({split}, {label_format})"
    if broken and on_fault != "skip":
        errors.append(f"{where}: {len(broken)} of the sampled label files cannot be used:{_fmt(broken)}\n"
                      f"(on_fault='skip' leaves them to the loader, which drops them with verify='full')")
    summary: dict = {"checked": len(per_file), "broken": len(broken)}
    if per_file:
        total = np.sum([h for _, h in per_file], axis=0)
        pixels = int(total.sum())
        ignore_frac = float(total[to_ignore].sum()) / max(pixels, 1)
        summary.update(ignore_fraction=ignore_frac, pixels=pixels, values=[int(v) for v in np.flatnonzero(total)])
        files = [f for f, _ in per_file]
        sample_txt = f"{len(per_file)} label files sampled evenly from {len(pairs)}"

        # 1. trainIds stored under a labelIds name
        in_trainid_range = set(np.flatnonzero(total).tolist()) <= set(range(NUM_CLASSES)) | {IGNORE_INDEX}
        distinct_low = int((total[:NUM_CLASSES] > 0).sum())
        if (label_format == "labelIds" and total[list(_LABELID_ONLY)].sum() == 0 and in_trainid_range
                and (total[IGNORE_INDEX] > 0 or distinct_low >= 3)):
            summary["trainids_under_labelids"] = True
            as_train = float(total[IGNORE_INDEX].sum()) / max(pixels, 1)
            errors.append(
                f"{where}: the label files look like trainIds (0..18, 255 = ignore), not Cityscapes label IDs: "
                f"{sample_txt} hold only values {summary['values'][:25]} and not one pixel of the label IDs 19..33 "
                f"(traffic light/sign, vegetation, sky, person, car, ...) that street scenes have. Mapped as label IDs, "
                f"{ignore_frac:.0%} of the pixels would become ignore (read as trainIds: {as_train:.0%}) and classes "
                f"would swap (trainId 7 traffic sign -> label ID 7 road). Likely cause: a preprocessed copy "
                f"(e.g. mmseg's *_labelTrainIds.png, or converted GTA5 labels) saved under the labelIds name. "
                f"Use the original label-ID files, or name them *_gtFine_labelTrainIds.png (Cityscapes reads them as "
                f"trainIds when no *_gtFine_labelIds.png exists). Files:{_fmt(files, 5)}"
            )

        # 2. values outside the table
        bad = [(f, sorted(int(v) for v in np.flatnonzero(h) if not valid[v])) for f, h in per_file]
        bad = [(f, vals) for f, vals in bad if vals]
        if bad and unknown_label == "error" and not summary.get("trainids_under_labelids"):
            vals = sorted({v for _, vs in bad for v in vs})
            errors.append(
                f"{where}: {len(bad)} of {len(per_file)} sampled label files hold raw values {vals[:20]} that are not "
                f"in the {label_format} table ({_unknown_value_cause(label_format, vals)}):"
                f"{_fmt([f'{f}: {vs[:12]}' for f, vs in bad])}\n"
                f"(unknown_label='ignore' maps them to 255 with a warning)"
            )
        summary["unknown_value_files"] = len(bad)

        # 3. all ignore
        all_ignore = int(total[~to_ignore].sum()) == 0
        summary["all_ignore"] = all_ignore
        if all_ignore and not summary.get("trainids_under_labelids"):
            cause = (f"Likely cause: labels withheld (the test splits of Cityscapes/ACDC ship all-void masks), "
                     f"masks of another encoding, or a wrong label folder. Raw values seen: {summary['values'][:20]}. "
                     f"Files:{_fmt(files, 5)}")
            if role == "train":
                errors.append(f"{where}: every pixel of the {sample_txt} maps to ignore (255): training on it would "
                              f"run with loss 0.0 and compute Fisher scores from zero gradients. {cause}")
            else:
                notes.append(f"{where}: every pixel of the {sample_txt} maps to ignore (255): its mIoU would be NaN. "
                             f"{cause}")

        # 4. implausible ignore fraction of a training set
        elif role == "train" and ignore_frac > IGNORE_WARN_FRACTION and not summary.get("trainids_under_labelids"):
            fracs = sorted(((float(h[to_ignore].sum()) / max(int(h.sum()), 1), f) for f, h in per_file), reverse=True)
            fracs = [x for x in fracs if x[0] > IGNORE_WARN_FRACTION] or fracs  # the files to look at first
            notes.append(
                f"{where}: {ignore_frac:.0%} of the pixels of the {sample_txt} map to ignore (255); a training set "
                f"usually has 5-20 %. Likely cause: coarse or partial annotations, masks of another encoding, or the "
                f"wrong label files. Most ignore:{_fmt([f'{f}: {p:.0%} ignore' for p, f in fracs], 8)}"
            )

    if label_check == "error" and errors:
        raise DatasetFileError(
            "\n".join(errors) + f"\n(label_check='warn' or ${LABEL_CHECK_ENV}=warn only warns; 'off' skips this check)"
        )
    for msg in (errors if label_check == "warn" else []) + notes:
        warnings.warn(msg, stacklevel=3)
    summary["messages"] = errors + notes
    return summary
