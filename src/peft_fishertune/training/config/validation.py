"""Checks of a typed config that need no model and no dataset file: names, choices, stage lengths against the
method, coupled settings, the evaluation protocol, and (check_paths) that dataset roots hold their official layout
and that the model checkpoint exists. Each raises `ConfigError` naming the key and what was expected."""

from __future__ import annotations

import json
import os
import re

from ..methods import get_method
from .evaluation_checks import check_model_selection, check_protocol, check_selection_data
from .sections import (
    METHODS,
    ON_FAULT,
    SIZE_MISMATCH,
    UNKNOWN_LABEL,
    VERIFY,
    ConfigError,
    DataSection,
    DatasetEntry,
    ExperimentConfig,
    ModelSection,
)


def validate(cfg: ExperimentConfig, *, check_paths: bool = True) -> None:
    """Everything that can be checked without building a model or reading a dataset's files."""
    _validate_method(cfg)
    _validate_model(cfg.model, check_paths=check_paths)
    _validate_data(cfg.data, check_paths=check_paths)
    check_model_selection(cfg)


def _validate_method(cfg: ExperimentConfig) -> None:
    m, t = cfg.method, cfg.training
    if m.name not in METHODS:
        raise ConfigError(f"method.name={m.name!r} is not allowed; expected one of {list(METHODS)}")
    if m.selection_update_steps is not None and m.selection_update_steps < 1:
        raise ConfigError(f"method.selection_update_steps={m.selection_update_steps} must be >= 1, or null for the "
                          "default (every max(1, stage-3 steps // 1000))")
    if m.lora_r < 1:
        raise ConfigError(f"method.lora_r={m.lora_r} must be >= 1")
    if m.fishertune:
        from ...tuner.config import FisherTuneConfig

        try:
            FisherTuneConfig(**{"target_modules": ["x"], **m.fishertune})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"method.fishertune: {e}") from None
    if m.rein:
        if m.name != "rein":
            raise ConfigError(f"method.rein is set but method.name={m.name!r}: it would do nothing; remove it")
        from ...rein import ReinConfig

        try:
            ReinConfig(**m.rein)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"method.rein: {e}") from None
    if m.name == "rein":
        _validate_rein_coupling(cfg)
    from ..baselines import check_peft_config  # method.peft_config: read by this row, its type, its field names

    check_peft_config(m)
    if t is not None:
        _validate_stages(cfg)


def _validate_rein_coupling(cfg: ExperimentConfig) -> None:
    """Rein's settings that must agree with the decoder's, all reported in one message."""
    m, model = cfg.method, cfg.model
    link = m.rein.get("link_token_to_query")  # None (the default): linked exactly with a Mask2Former decoder
    if link is False:
        return
    if model.decoder != "mask2former":
        if link is True:  # written on purpose
            raise ConfigError(f"method.rein.link_token_to_query: true needs model.decoder: mask2former (now "
                              f"{model.decoder!r}); set it to false or use the Mask2Former decoder")
        return
    dec = model.decoder_config or {}
    tokens, queries = m.rein.get("token_length", 100), dec.get("num_queries")
    width, dims = dec.get("hidden_dim", 256), m.rein.get("query_dims")
    problems = []
    if queries != tokens:
        problems.append(f"model.decoder_config.num_queries must equal method.rein.token_length={tokens} (now "
                        f"{queries!r}): Rein's tokens become Mask2Former's queries one for one")
    if dims is not None and dims != width:
        problems.append(f"method.rein.query_dims={dims} must equal the decoder's width "
                        f"model.decoder_config.hidden_dim={width} (leave query_dims out to follow the decoder)")
    if dec.get("replace_query_feat") is not True:
        note = ("model.decoder_config.replace_query_feat is not true: the linked queries give only the query "
                "positions, not the initial query features as in Rein's reference recipe")
        if problems:
            problems.append(note + " (set it to true with the others)")
        else:
            import warnings

            warnings.warn(f"config: {note}; set model.decoder_config.replace_query_feat: true to follow it",
                          UserWarning, stacklevel=3)
    if problems:
        raise ConfigError("method.rein links its tokens to Mask2Former's queries (link_token_to_query: true), "
                          "which couples these settings:\n  - " + "\n  - ".join(problems)
                          + "\n(or set method.rein.link_token_to_query: false)")


def _validate_stages(cfg: ExperimentConfig) -> None:
    """The stage lengths against the method: the plan can be made, every stage the method needs has steps, and
    δ(t) grows within the tuning steps."""
    from ...trainer.plan import StagePlan

    m, t = cfg.method, cfg.training
    method = get_method(m.name)
    for key, why in method.stage_requirements().items():
        if getattr(t, key) == 0:
            raise ConfigError(f"method.name={m.name!r} {why}: training.{key} must be > 0")
    alternate = getattr(t, "alternate_steps", 0)
    try:
        plan = StagePlan(t.stage1_steps, t.stage2_steps, t.stage3_steps, alternate_steps=alternate,
                         estimates=method.estimator, selects=method.selects,
                         backbone_from_stage=method.backbone_from_stage)
    except ValueError as e:  # e.g. alternating execution with a method that does not estimate
        raise ConfigError(f"training: {e}") from None
    if method.selects and m.selection_update_steps is not None and 1 < plan.tune_steps <= m.selection_update_steps:
        what = "training.stage3_steps" if not alternate else "tuning steps (alternate_steps blocks)"
        raise ConfigError(
            f"method.selection_update_steps={m.selection_update_steps} is not smaller than the {plan.tune_steps} "
            f"{what}: δ(t) is recomputed every {m.selection_update_steps} tuning steps, so it would never grow "
            f"past delta_min before the last step, which alone would train delta_max. Set "
            f"method.selection_update_steps below {plan.tune_steps} (1 recomputes δ(t) at every step; null, the "
            f"default, every max(1, {plan.tune_steps} // 1000))")


def _validate_model(m: ModelSection, *, check_paths: bool) -> None:
    from ...models import BACKBONES, DECODERS
    from ...models.backbones import CANDIDATE_KINDS

    if m.backbone not in BACKBONES:
        raise ConfigError(f"model.backbone={m.backbone!r} is not registered; expected one of {sorted(BACKBONES)}")
    if m.decoder not in DECODERS:
        raise ConfigError(f"model.decoder={m.decoder!r} is not allowed; expected one of {list(DECODERS)}")
    bad = [k for k in m.candidate_kinds if k not in CANDIDATE_KINDS]
    if bad or not m.candidate_kinds:
        raise ConfigError(f"model.candidate_kinds={m.candidate_kinds!r}: expected a non-empty list of {list(CANDIDATE_KINDS)}")
    for key in ("num_labels", "pyramid_channels"):
        if getattr(m, key) < 1:
            raise ConfigError(f"model.{key}={getattr(m, key)} must be >= 1")
    if m.model_name_or_path and m.tiny_backbone is not None:
        raise ConfigError("model: give model_name_or_path or tiny_backbone, not both")
    if not m.model_name_or_path and m.tiny_backbone is None:
        raise ConfigError("model: give model_name_or_path (a hub id or checkpoint directory) or tiny_backbone")
    if m.model_name_or_path and check_paths:
        check_model_source(m.backbone, m.model_name_or_path)
    _validate_blocks(m)


def _validate_blocks(m: ModelSection) -> None:
    """The decoder reads 4 feature maps from 4 distinct blocks: `out_indices` and a tiny backbone's depth (a
    misspelt `tiny_backbone` key would be kept by the transformers config and silently do nothing)."""
    if m.out_indices is not None and (len(m.out_indices) != 4 or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in m.out_indices)):
        raise ConfigError(f"model.out_indices={m.out_indices!r}: expected 4 block indices (the decoder's 4 feature "
                          f"maps), strictly increasing")
    if m.tiny_backbone is None:
        return
    from ...models import tiny_backbone_config

    try:
        default, built = tiny_backbone_config(m.backbone), tiny_backbone_config(m.backbone, **m.tiny_backbone)
    except ImportError:  # e.g. timm for eva02: the build reports it
        return
    except (TypeError, ValueError, NotImplementedError) as e:
        raise ConfigError(f"model.tiny_backbone: {e}") from None
    unknown = sorted(k for k in m.tiny_backbone if not hasattr(default, k))
    if unknown:
        raise ConfigError(f"model.tiny_backbone: {unknown} are not fields of {type(default).__name__} (they would be "
                          f"ignored); e.g. hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, "
                          f"patch_size, image_size")
    n = getattr(built, "num_hidden_layers", None)
    if isinstance(n, int) and n < 4:
        raise ConfigError(f"model.tiny_backbone.num_hidden_layers={n}: the decoder reads feature maps from 4 "
                          f"different blocks; give at least 4")
    if isinstance(n, int) and m.out_indices is not None and not all(-n <= i < n for i in m.out_indices):
        raise ConfigError(f"model.out_indices={m.out_indices!r}: the tiny backbone has {n} blocks (indices "
                          f"-{n}..{n - 1})")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001 - an old huggingface_hub: read the variable
        return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def check_model_source(backbone: str, path: str, where: str = "model.model_name_or_path") -> None:
    """A local checkpoint directory must hold a model config of this backbone; a hub id must be reachable or
    cached (offline: say how to use a local copy)."""
    from ...models import get_backbone_class
    from ...standin import is_standin_ref, standin_preset

    if is_standin_ref(path):  # "standin:<preset>": a stand-in VFM pretrained here and cached (peft_fishertune.standin)
        if backbone != "dinov2":
            raise ConfigError(f"{where}={path!r} is a stand-in DINOv2, but model.backbone={backbone!r}; "
                              "use backbone: dinov2")
        try:
            standin_preset(path.split(":", 1)[1])
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        return
    cls = get_backbone_class(backbone)
    expanded = os.path.expanduser(path)
    if os.path.exists(expanded):
        if not os.path.isdir(expanded):
            raise ConfigError(f"{where}={path!r} is a file; expected a checkpoint directory (config.json + weights) "
                              f"or a hub id")
        cfg_file = os.path.join(expanded, "config.json")
        if not os.path.isfile(cfg_file):
            raise ConfigError(f"{where}={path!r} holds no config.json: not a model checkpoint directory "
                              f"(expected a folder written by save_pretrained or `huggingface-cli download <id> "
                              f"--local-dir <folder>`)")
        want = getattr(cls.config_class, "model_type", None)
        if want:
            try:
                with open(cfg_file) as f:
                    got = json.load(f).get("model_type")
            except (OSError, ValueError) as e:
                raise ConfigError(f"{where}={path!r}: cannot read config.json: {e}") from None
            if got is not None and got != want:
                raise ConfigError(f"{where}={path!r} holds a {got!r} model, but model.backbone={backbone!r} "
                                  f"expects model_type {want!r}")
        return
    looks_local = path.startswith(("/", "./", "../", "~")) or os.sep + os.sep in path or path.count("/") > 1
    if looks_local or not _HUB_ID.match(path):
        raise ConfigError(f"{where}={path!r} does not exist (neither a local checkpoint directory nor a hub id)")
    if backbone == "eva02" and "/" not in path:
        return  # a timm model name
    if _hub_offline():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "config.json")
        except Exception:  # noqa: BLE001
            cached = None
        if not isinstance(cached, str):
            raise ConfigError(
                f"{where}={path!r} is a hub id, but the hub is offline (HF_HUB_OFFLINE=1) and {path} is not in the "
                f"local cache. Download it once where there is network (`huggingface-cli download {path} "
                f"--local-dir /models/{path.split('/')[-1]}`), copy that folder here and set "
                f"--model.model_name_or_path /models/{path.split('/')[-1]}")


def _validate_data(d: DataSection, *, check_paths: bool) -> None:
    if d.train is None:
        raise ConfigError("data.train is required: {name, root, split}")
    if not d.eval:
        raise ConfigError("data.eval is empty: the run would train without evaluating anything. List at least one "
                          "target dataset ({name, root, split}); a DG run's result is its per-domain table")
    check_protocol(d)
    check_selection_data(d)
    for key in ("crop_size", "base_scale", "test_scale", "window", "stride", "ratio_range"):
        v = getattr(d, key)
        if v is None and key in ("test_scale", "window", "stride"):  # the protocol's (check_protocol)
            continue
        if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in v):
            raise ConfigError(f"data.{key}={v!r}: expected two positive numbers")
    if d.eval_mode == "slide" and d.window is not None and d.stride is not None:
        over = [i for i, (s, w) in enumerate(zip(d.stride, d.window)) if s > w]
        if over:
            raise ConfigError(
                f"data.stride={d.stride} is larger than data.window={d.window} "
                f"({' and '.join(['height', 'width'][i] for i in over)}): sliding windows would leave rows or "
                f"columns that no window predicts. Use a stride <= the window (e.g. 2/3 of it, as Rein's 341 for 512)")
    if d.eval_max_images is not None and d.eval_max_images < 1:
        raise ConfigError(f"data.eval_max_images={d.eval_max_images} must be >= 1 (or null: every image)")
    names: dict[str, int] = {}
    for i, e in enumerate(d.eval):
        if e.display in names:
            raise ConfigError(
                f"data.eval[{i}] and data.eval[{names[e.display]}] have the same display name {e.display!r}: their "
                f"results would share one column. Give each a distinct `label:` (e.g. label: {e.display}-2)")
        names[e.display] = i
        if e.max_images is not None and e.max_images < 1:
            raise ConfigError(f"data.eval[{i}].max_images={e.max_images} must be >= 1")
    entries = [("data.train", d.train)] + [(f"data.eval[{i}]", e) for i, e in enumerate(d.eval)]
    if d.selection_set is not None:
        entries.append(("data.selection_set", d.selection_set))
    synthetic_root = (d.synthetic or {}).get("root")
    if d.synthetic is not None and not synthetic_root:
        raise ConfigError("data.synthetic needs a root (where the synthetic domains are written)")
    for where, entry in entries:
        spec = _validate_entry(where, entry)
        generated = synthetic_root and os.path.abspath(entry.root).startswith(os.path.abspath(synthetic_root))
        if check_paths and not generated:
            n = _check_layout(where, entry, spec)
            if where == "data.train" and d.selection_holdout is not None:
                from ..eval_sets import split_holdout

                try:
                    split_holdout(n, d.selection_holdout, d.selection_seed)
                except ValueError as err:
                    raise ConfigError(str(err)) from None


def _validate_entry(where: str, e: DatasetEntry):
    from ...data import get_spec, list_datasets

    if e.name not in list_datasets():
        raise ConfigError(f"{where}.name={e.name!r} is not a registered dataset; expected one of {list_datasets()}")
    spec = get_spec(e.name)
    if e.split not in spec.splits:
        raise ConfigError(f"{where}.split={e.split!r} is not a split of {e.name}; expected one of {list(spec.splits)}")
    if e.condition is not None:
        if not spec.conditions:
            raise ConfigError(f"{where}.condition={e.condition!r}: {e.name} has no conditions")
        if e.condition not in spec.conditions:
            raise ConfigError(f"{where}.condition={e.condition!r} is not a condition of {e.name}; expected one of "
                              f"{list(spec.conditions)}")
    for key, allowed in (("on_fault", ON_FAULT), ("verify", VERIFY), ("unknown_label", UNKNOWN_LABEL)):
        if getattr(e, key) not in allowed:
            raise ConfigError(f"{where}.{key}={getattr(e, key)!r} is not allowed; expected one of {list(allowed)}")
    if e.size_mismatch is not None and e.size_mismatch not in SIZE_MISMATCH:
        raise ConfigError(f"{where}.size_mismatch={e.size_mismatch!r} is not allowed; expected one of "
                          f"{list(SIZE_MISMATCH)} or null (the dataset's default)")
    return spec


def _check_layout(where: str, e: DatasetEntry, spec) -> int:
    """The root exists and holds the official layout (one directory walk; files are not opened); returns the
    number of image / label pairs found."""
    from pathlib import Path

    from ...data import DatasetFileError, DatasetLayoutError

    if not os.path.isdir(e.root):
        raise ConfigError(f"{where}.root={e.root!r} does not exist (dataset {e.name!r})")
    try:
        pairs = spec.find_pairs(Path(e.root).expanduser(), e.split, e.condition)
    except DatasetLayoutError as err:
        raise ConfigError(f"{where}: {err}") from None
    except DatasetFileError as err:
        raise ConfigError(f"{where}: {err}") from None
    if not pairs:
        raise ConfigError(f"{where}: {e.name} ({e.split}) under {e.root!r} holds no images")
    return len(pairs)
