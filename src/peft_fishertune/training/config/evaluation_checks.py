"""Config checks of the evaluation protocol and of model selection (called by validation.py): a preset name, keys
that contradict it, the model-selection set, and what `save_strategy: best` / `metric_for_best_model` rank on.
Each raises `ConfigError` naming the key; ranking on the target domains only warns (it runs, but it is test-set
selection)."""

from __future__ import annotations

import warnings

from .sections import ConfigError, DataSection, ExperimentConfig

PROTOCOL_KEYS = ("test_scale", "eval_mode", "window", "stride")
METRICS = ("mIoU", "aAcc", "mAcc")


def _fmt_scale(s) -> str:
    return "as loaded" if s is None else f"{s[0]}x{s[1]}"


def check_protocol(d: DataSection) -> None:
    """`data.eval_protocol` is a preset; the keys it sets, when also given, agree with it; `eval_mode` is known."""
    from ...inference.protocols import get_protocol, protocol_names, resolve_domains
    from ..eval_sets import _datasets

    if d.eval_mode is not None and d.eval_mode not in ("slide", "whole"):
        raise ConfigError(f"data.eval_mode={d.eval_mode!r} is not allowed; expected 'slide' or 'whole'")
    if d.eval_protocol is None:
        missing = [k for k in PROTOCOL_KEYS if getattr(d, k) is None]
        if missing:  # DataSection fills them; only a hand-made section gets here
            raise ConfigError(f"data: {missing} are null but data.eval_protocol is not set: give them or a protocol")
        return
    if d.eval_protocol not in protocol_names():
        raise ConfigError(f"data.eval_protocol={d.eval_protocol!r} is not a known protocol; expected one of "
                          f"{protocol_names()} (docs/evaluation.md) or null (the custom test_scale / eval_mode / "
                          f"window / stride)")
    p = get_protocol(d.eval_protocol)
    settings = resolve_domains(p.name, _datasets(d)) if d.train is not None else {}
    clash = []
    if d.eval_mode is not None and d.eval_mode != p.mode:
        clash.append(f"data.eval_mode={d.eval_mode!r} (the protocol's: {p.mode!r})")
    for key, want in (("window", p.window), ("stride", p.stride)):
        v = getattr(d, key)
        if v is not None and list(v) != [want, want]:
            clash.append(f"data.{key}={list(v)} (the protocol's: [{want}, {want}])")
    if d.test_scale is not None:
        other = {n: s.test_scale for n, s in settings.items() if s.test_scale != tuple(d.test_scale)}
        if other:
            clash.append(f"data.test_scale={list(d.test_scale)} (the protocol's: "
                         + ", ".join(f"{n} {_fmt_scale(s)}" for n, s in other.items()) + ")")
    if clash:
        raise ConfigError(
            f"data.eval_protocol={p.name!r} sets the test scale of each dataset, the mode, window, stride and TTA, "
            f"but the config also gives {'; '.join(clash)}. Remove those keys (in a YAML file `key: null` also "
            f"removes a base's value; on the command line --data.<key> null), or drop eval_protocol for a custom "
            f"protocol")


def check_selection_data(d: DataSection) -> None:
    """The model-selection set: one kind, a fraction strictly between 0 and 1, no target named like it."""
    from ..eval_sets import SELECTION_PREFIX

    if d.selection_holdout is not None and d.selection_set is not None:
        raise ConfigError("data.selection_holdout and data.selection_set are both set: give one model-selection set "
                          "(a held-out fraction of the source training set, or a named dataset)")
    f = d.selection_holdout
    if f is not None and not 0 < f < 1:
        raise ConfigError(f"data.selection_holdout={f!r}: expected a fraction strictly between 0 and 1 of the source "
                          f"training images (e.g. 0.1), or null")
    if d.selection_set is not None and d.selection_set.max_images is not None and d.selection_set.max_images < 1:
        raise ConfigError(f"data.selection_set.max_images={d.selection_set.max_images} must be >= 1")
    for i, e in enumerate(d.eval):
        if e.display == "selection" or e.display.startswith(SELECTION_PREFIX):
            raise ConfigError(f"data.eval[{i}] is named {e.display!r}: 'selection' and 'selection/...' name the "
                              f"model-selection set; give the target another `label:`")


def _target_names(d: DataSection) -> list[str]:
    from ...inference.evaluation import ACDC_CONDITIONS

    names = [e.display for e in d.eval]
    conditions = {e.condition for e in d.eval if e.name == "acdc" and e.display == f"acdc/{e.condition}"}
    if set(ACDC_CONDITIONS) <= conditions:
        names.append("acdc-all")  # evaluation_table adds it (summed confusion matrices)
    return names


def check_model_selection(cfg: ExperimentConfig) -> None:
    """What `save_strategy: best` and `metric_for_best_model` rank on: a metric the evaluation logs, the
    model-selection set when it names one, and a loud warning when it ranks on the target domains."""
    from ..eval_sets import selection_domain

    t, d = cfg.training, cfg.data
    if t is None:
        return
    value = lambda v: str(getattr(v, "value", v))  # noqa: E731 - enums of TrainingArguments
    save_best = value(t.save_strategy) == "best"
    metric = t.metric_for_best_model
    if not save_best and metric is None:
        return
    where = "training.save_strategy=best" if save_best else f"training.metric_for_best_model={metric!r}"
    if metric is None:
        raise ConfigError("training.save_strategy=best saves a checkpoint each time metric_for_best_model improves, "
                          "but metric_for_best_model is not set, so nothing would be saved. Set it, e.g. "
                          "selection_mIoU with data.selection_holdout: 0.1")
    if value(t.eval_strategy) == "no":
        raise ConfigError(f"{where} ranks evaluations, but training.eval_strategy is 'no': nothing is evaluated "
                          f"during training. Set eval_strategy: steps and eval_steps")
    key = metric[len("eval_"):] if metric.startswith("eval_") else metric
    sel = selection_domain(d)
    selection_keys = {f"selection_{m}" for m in METRICS}
    if sel is not None:
        selection_keys |= {f"{sel}_{m}" for m in METRICS}
    targets = _target_names(d)
    target_keys = set(METRICS) | {f"{n}_{m}" for n in targets for m in METRICS}
    if sel is None and (key.startswith("selection_") or key.startswith("selection/")):
        raise ConfigError(f"training.metric_for_best_model={metric!r} ranks on the model-selection set, but the "
                          f"config has none: set data.selection_holdout (e.g. 0.1: that fraction of the source "
                          f"training images, held out) or data.selection_set ({{name, root, split}})")
    if key not in selection_keys | target_keys:
        choices = sorted(selection_keys) + list(METRICS) + [f"<target>_{m}" for m in METRICS]
        raise ConfigError(f"training.metric_for_best_model={metric!r} is not a metric the evaluation logs (it logs "
                          f"no loss); expected one of {choices} (targets: {targets})")
    if t.greater_is_better is False:
        raise ConfigError(f"training.greater_is_better=false with metric_for_best_model={metric!r} would keep the "
                          f"lowest {key}: set it to true (or leave it out)")
    if key in target_keys:
        warnings.warn(
            f"TEST-SET SELECTION: {where} with metric_for_best_model={metric!r} ranks checkpoints on the target "
            f"domains {targets}, the test sets of domain generalization: the best checkpoint's target numbers are "
            f"then chosen on the test data and overstate generalization. Rank on the source side: "
            f"data.selection_holdout: 0.1 (or data.selection_set: {{name, root, split}}) with "
            f"training.metric_for_best_model: selection_mIoU (docs/training.md, 'Model selection')",
            UserWarning, stacklevel=3)
