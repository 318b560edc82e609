"""Checkpoints and output files that an interruption cannot leave half-written.

- A checkpoint is written into a staging folder `checkpoint-N.partial` beside the final one; the completeness
  marker (`fishertune_complete.json`) is written last, then the folder is renamed to `checkpoint-N` (one atomic
  rename), and only after that are old checkpoints rotated out. A cut anywhere leaves the previous checkpoints as
  they were and at most a `.partial` folder, which nothing resumes from and the next save removes.
- Resuming considers only complete checkpoints (with the marker): `latest_complete_checkpoint(output_dir)`;
  `resolve_resume("true", output_dir)` is the transformers idiom for it.
- Single output files (results, tables, logs) go through `atomic_write_text`: a temporary name, then `os.replace`,
  with the usual permissions (0666 minus the umask).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator, Optional

logger = logging.getLogger(__name__)

MARKER = "fishertune_complete.json"
RUN_CONFIG = "fishertune_run.json"
STAGING_SUFFIX = ".partial"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (missing, incomplete, or from an incompatible run)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fix_permissions(path: str) -> None:
    """Give a written file the usual permissions (0666 minus the umask); some writers create files 0600."""
    try:
        os.chmod(path, 0o666 & ~_umask())
    except OSError:  # pragma: no cover - e.g. a file system without permissions
        pass


def fix_tree_permissions(root: str) -> None:
    for folder, _, files in os.walk(root):
        for f in files:
            fix_permissions(os.path.join(folder, f))


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically, on error it is removed."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        fix_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------------ checkpoints


def checkpoint_dirs(output_dir: str) -> list[tuple[int, str, bool]]:
    """[(step, path, complete)] of the `checkpoint-N` folders in `output_dir`, by step."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isdir(path):
            found.append((int(m.group(1)), path, is_complete(path)))
    return sorted(found)


def is_complete(checkpoint: str) -> bool:
    return os.path.isfile(os.path.join(checkpoint, MARKER))


def latest_complete_checkpoint(output_dir: str) -> Optional[str]:
    complete = [path for _, path, ok in checkpoint_dirs(output_dir) if ok]
    return complete[-1] if complete else None


def resolve_resume(value, output_dir: str) -> Optional[str]:
    """`resume_from_checkpoint` as given (None / False / "false": start afresh; True / "true" / "latest": the newest
    complete checkpoint in `output_dir`; a path: that checkpoint, which must be complete) -> a path or None."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "false", "no")):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in ("true", "latest", "yes")):
        path = latest_complete_checkpoint(output_dir)
        if path is None:
            incomplete = [p for _, p, ok in checkpoint_dirs(output_dir) if not ok]
            raise CheckpointError(
                f"resume_from_checkpoint={value!r}: no complete checkpoint in output_dir {output_dir!r}"
                + (f" (incomplete, without {MARKER}: {[os.path.basename(p) for p in incomplete]})" if incomplete else "")
            )
        return path
    path = os.fspath(value)
    if not os.path.isdir(path):
        raise CheckpointError(f"resume_from_checkpoint={path!r} is not a directory")
    if not is_complete(path):
        newest = latest_complete_checkpoint(os.path.dirname(os.path.abspath(path)))
        raise CheckpointError(
            f"resume_from_checkpoint={path!r} is incomplete (no {MARKER}: its save was interrupted)"
            + (f"; the newest complete checkpoint beside it is {newest!r}" if newest else "")
        )
    return path


def staging_dir(final: str) -> str:
    return final + STAGING_SUFFIX


def remove_stale_staging(output_dir: str) -> None:
    """Remove `checkpoint-N.partial` folders left by interrupted saves."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.endswith(STAGING_SUFFIX) and _CHECKPOINT_RE.match(name[: -len(STAGING_SUFFIX)]):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def write_marker(staging: str, info: dict[str, Any]) -> None:
    atomic_write_json(os.path.join(staging, MARKER), info)


def publish(staging: str, final: str) -> None:
    """Rename the staging folder to its final name (replacing an older folder of that name)."""
    if os.path.exists(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)


def rotate(output_dir: str, save_total_limit: Optional[int], keep: Optional[str] = None) -> list[str]:
    """Delete the oldest complete checkpoints beyond `save_total_limit` (never the newest, nor `keep`).

    Incomplete `checkpoint-N` folders are never counted as one of the kept checkpoints."""
    if not save_total_limit or save_total_limit <= 0:
        return []
    complete = [p for _, p, ok in checkpoint_dirs(output_dir) if ok]
    keep_abs = os.path.abspath(keep) if keep else None
    removable = [p for p in complete[:-1] if os.path.abspath(p) != keep_abs]
    excess = len(complete) - save_total_limit
    removed = []
    for p in removable[: max(excess, 0)]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


# -------------------------------------------------------------------------------- compatibility


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: obj}


_RUN_FILES = ("results.json", "log.csv", "adapter", "model", "config.yaml")


def existing_run_note(output_dir: str, resume: Optional[str]) -> Optional[str]:
    """A warning when output_dir already holds a run, saying whether this run resumes it or overwrites its files."""
    if not os.path.isdir(output_dir):
        return None
    held = [n for n in _RUN_FILES if os.path.exists(os.path.join(output_dir, n))]
    held += [os.path.basename(p) + ("" if ok else " (incomplete)") for _, p, ok in checkpoint_dirs(output_dir)]
    if not held:
        return None
    shown = ", ".join(held[:8]) + (f", ... ({len(held)} entries)" if len(held) > 8 else "")
    if resume:
        return f"output_dir {output_dir!r} already holds a run ({shown}); resuming it from {resume}"
    return (f"output_dir {output_dir!r} already holds a run ({shown}); this run starts afresh and overwrites its "
            "log.csv, results and saved model (checkpoints of the same step are replaced when saved; to continue "
            "it instead, pass --resume_from_checkpoint true)")


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Lines 'key: checkpoint X, this run Y' for every leaf that differs between two nested config dicts."""
    a, b = _flatten(json.loads(json.dumps(saved, default=str))), _flatten(json.loads(json.dumps(current, default=str)))
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            lines.append(f"{key}: checkpoint {a.get(key, '<unset>')!r}, this run {b.get(key, '<unset>')!r}")
    return lines
