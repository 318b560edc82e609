"""Named stand-in VFMs, usable wherever a checkpoint is expected: ``model_name_or_path: standin:<preset>``.

    model:
      backbone: dinov2
      model_name_or_path: standin:demo     # built on first use, then reused from the cache

`resolve_standin("standin:demo")` returns the cached checkpoint directory of that preset, pretraining it
first when it is missing (with a progress bar and a log line saying what is built and where). Any other
string is returned unchanged, so the call can sit in front of every model loader. The cache lives under
`$PEFT_FISHERTUNE_CACHE` (default `~/.cache/peft_fishertune`), in `standin/<preset>-<hash>`, where the
hash is of the preset's settings: a preset whose settings change gets a new directory and never a
checkpoint pretrained with other settings. Concurrent callers (two ranks of one run, two runs) share one
pretraining through a lock file.

Presets (`STANDIN_PRESETS`):

- ``demo``: the `make demo` backbone, a budget that fits a few minutes on 2 CPU cores.
- ``default``: `PretrainConfig()`, the benchmark's stand-in (~18 min on 2 CPU cores).
- ``quick``: `PretrainConfig.quick()`, seconds; tests and smoke runs only (learns almost nothing).
- ``categories``: the demo's architecture pretrained *supervised* on every style with the 7 Cityscapes categories
  as labels (`supervised.py`); features that transfer across styles when frozen: the DG benchmark's
  `--regime premise` backbone (~10 min on 2 CPU cores).
- ``categories_quick``: the same objective at the `quick` size (tests only).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

from .pretrain import PretrainConfig, _is_complete, default_cache_dir, pretrain_standin
from .supervised import SupervisedPretrainConfig

STANDIN_PREFIX = "standin:"


def _demo() -> PretrainConfig:
    # a 4-block DINOv2 of width 128 (1.1 M weights in the blocks); SimMIM on 128x128 crops of every style
    return PretrainConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                          steps=80, batch_size=32, warmup_steps=10, eval_every=20, eval_batch_size=32)


def _categories() -> PretrainConfig:
    # the demo's encoder; supervised on the 7 categories of every style, 200 steps of 32 fresh 128x128 crops
    return SupervisedPretrainConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                                    steps=200, batch_size=32, warmup_steps=10, eval_every=50, eval_batch_size=36)


STANDIN_PRESETS: dict[str, Callable[[], PretrainConfig]] = {
    "demo": _demo,
    "default": PretrainConfig,
    "quick": PretrainConfig.quick,
    "categories": _categories,
    "categories_quick": SupervisedPretrainConfig.quick,
}


def is_standin_ref(model_name_or_path) -> bool:
    """True for ``"standin:<preset>"`` strings (whether or not the preset exists)."""
    return isinstance(model_name_or_path, str) and model_name_or_path.startswith(STANDIN_PREFIX)


def standin_preset(name: str) -> PretrainConfig:
    """The `PretrainConfig` of a preset; a `ValueError` names the known presets."""
    if name not in STANDIN_PRESETS:
        raise ValueError(
            f"unknown stand-in VFM preset {name!r} (model_name_or_path={STANDIN_PREFIX}{name}); "
            f"expected one of {[STANDIN_PREFIX + k for k in STANDIN_PRESETS]}"
        )
    return STANDIN_PRESETS[name]()


def settings_hash(config: PretrainConfig) -> str:
    """8 hex digits of the SHA-256 of the settings (sorted JSON)."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:8]


def standin_cache_dir(name: str, cache_root: str | os.PathLike | None = None) -> Path:
    """Where preset `name` is (or will be) cached: `<cache_root>/standin/<name>-<settings hash>`;
    `cache_root` defaults to `$PEFT_FISHERTUNE_CACHE`, else `~/.cache/peft_fishertune`."""
    config = standin_preset(name)
    root = Path(os.path.expanduser(str(cache_root))) if cache_root is not None else default_cache_dir().parent
    return root / "standin" / f"{name}-{settings_hash(config)}"


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock on `path` (POSIX `flock`; a no-op where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def resolve_standin(
    model_name_or_path: str,
    *,
    build: bool = True,
    cache_root: str | os.PathLike | None = None,
    progress: bool = True,
    num_threads: Optional[int] = None,
) -> str:
    """``"standin:<preset>"`` -> the preset's cached checkpoint directory (pretrained first if missing and
    `build`); any other value is returned unchanged.

    With `build=False` a missing checkpoint raises `FileNotFoundError` (naming the directory and how to
    build it) instead of pretraining.
    """
    if not is_standin_ref(model_name_or_path):
        return model_name_or_path
    name = model_name_or_path[len(STANDIN_PREFIX):]
    config = standin_preset(name)
    out = standin_cache_dir(name, cache_root)
    if _is_complete(out):
        if progress:
            print(f"stand-in VFM {model_name_or_path!r}: using the cached checkpoint {out}", flush=True)
        return str(out)
    if not build:
        raise FileNotFoundError(
            f"stand-in VFM {model_name_or_path!r} is not cached at {out}; build it with "
            f"peft_fishertune.standin.resolve_standin({model_name_or_path!r}) (or any run that uses it)"
        )
    with _file_lock(out.parent / f".{out.name}.lock"):
        if not _is_complete(out):  # another process may have built it while we waited
            if progress:
                print(
                    f"stand-in VFM {model_name_or_path!r} is not cached yet: pretraining it now (SimMIM, "
                    f"{config.steps} steps of {config.batch_size} images, a {config.num_hidden_layers}-block DINOv2 "
                    f"of width {config.hidden_size}) into {out}; later runs reuse it",
                    flush=True,
                )
            pretrain_standin(config, out, progress=progress, num_threads=num_threads)
        elif progress:
            print(f"stand-in VFM {model_name_or_path!r}: using the cached checkpoint {out}", flush=True)
    return str(out)
