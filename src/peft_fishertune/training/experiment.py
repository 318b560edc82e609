"""Build a run from an `ExperimentConfig` and execute it: data -> model -> method -> trainer -> evaluation.

`run_experiment(cfg)` is what `scripts/train.py` calls; the benchmark calls it too. The output folder
(`training.output_dir`) holds, besides the checkpoints and `log.csv`:

    config.yaml                    the configuration as run (overrides applied)
    adapter/ or model/             the trained adapter (sparse methods, LoRA) or whole model (full, freeze); saved
                                   first, as soon as training ends
    merged_model/                  with `training.save_merged_model: true`: the adapter merged into the weights
    results.json, results.md, results.csv     the final evaluation: mIoU / aAcc / mAcc and class x domain IoU and
                                   Acc tables in percent, the target mean and its definition, the protocol
                                   (+ selection counts, model selection, settings; run_outputs.py)
    pictures/<domain>.png          a few images per target domain: input | ground truth | prediction | error map
    selection.csv, selection.png   where the selected elements sit (block x module type); the PNG needs matplotlib
    base_model/                    a random-init (tiny) backbone's model as built, to load the adapter onto
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..trainer import checkpointing
from .config import ConfigError, DatasetEntry, ExperimentConfig
from .methods import get_method

logger = logging.getLogger(__name__)


class IterationDataset(torch.utils.data.Dataset):
    """An iteration-based view of a dataset: item i is sample i % N, augmented with a generator seeded by (seed, i).

    Training is counted in iterations (as in the paper), and each item's augmentation depends only on its index, so
    a resumed run sees exactly the samples and augmentations an uninterrupted run would (the sampler skips, it does
    not replay, the batches before the checkpoint).
    """

    def __init__(self, base, transform, length: int, seed: int = 0):
        if len(base) == 0:
            raise ValueError("the training dataset is empty")
        self.base, self.transform, self.length, self.seed = base, transform, int(length), int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = self.base[i % len(self.base)]
        rng = np.random.default_rng([self.seed, int(i)])
        return self.transform(sample["image"], sample["label"], rng=rng)


def _load(entry: DatasetEntry, role: Optional[str] = None):
    """The entry's dataset, with its fault options (on_fault, verify, unknown_label, size_mismatch); `role`
    ('train' / 'eval') decides verify='auto' and the label check (None: from the split's name)."""
    from ..data import load_dgss_dataset

    return load_dgss_dataset(entry.name, entry.root, **entry.loader_options(), role=role)


def build_data(cfg: ExperimentConfig, train_length: int, seed: int):
    """(iteration-based training set, {domain: evaluation dataset}). The evaluation datasets are the targets in
    config order, then the model-selection set when the config has one (`eval_sets.py`); each goes through its
    protocol's transform (`data.eval_protocol`, or the custom test_scale). With `data.selection_holdout` the
    held-out source images are removed from the training set."""
    from ..data import TrainTransform, generate_synthetic_domains
    from .eval_sets import eval_datasets, hold_out

    d = cfg.data
    if d.synthetic:
        syn = dict(d.synthetic)
        root = syn.pop("root")
        marker = os.path.join(root, "synthetic_domains.json")
        if not os.path.isfile(marker):
            if "size" in syn:
                syn["size"] = tuple(syn["size"])
            generate_synthetic_domains(root, **syn)
    train_tf = TrainTransform(base_scale=tuple(d.base_scale), ratio_range=tuple(d.ratio_range),
                              crop_size=tuple(d.crop_size), cat_max_ratio=d.cat_max_ratio, photometric=d.photometric)
    train_base, held_out = hold_out(d, _load(d.train, "train"))
    train = IterationDataset(train_base, train_tf, train_length, seed)
    return train, eval_datasets(d, lambda e: _load(e, "eval"), held_out)


def build_base_model(cfg: ExperimentConfig):
    """The unwrapped segmentation model of the config (backbone from its checkpoint, or tiny random init)."""
    from ..models import build_segmentation_model, tiny_backbone_config

    m = cfg.model
    kwargs = dict(decoder=m.decoder, num_labels=m.num_labels, pyramid_channels=m.pyramid_channels,
                  decoder_config=m.decoder_config, out_indices=m.out_indices)
    if m.tiny_backbone is not None:
        return build_segmentation_model(m.backbone, backbone_config=tiny_backbone_config(m.backbone, **m.tiny_backbone), **kwargs)
    if m.model_name_or_path:
        from ..standin import resolve_standin  # "standin:<preset>" -> its cached checkpoint (pretrained if missing)

        return build_segmentation_model(m.backbone, model_name_or_path=resolve_standin(m.model_name_or_path), **kwargs)
    raise ConfigError("model: give model_name_or_path (a hub id or checkpoint directory) or tiny_backbone")


def build_model(cfg: ExperimentConfig, seg=None):
    """The segmentation model, wrapped for the configured method; returns (model, PEFT config or None)."""
    seg = build_base_model(cfg) if seg is None else seg
    return get_method(cfg.method.name).wrap(seg, cfg.method, cfg.model.candidate_kinds)


@dataclass
class ExperimentResult:
    table: dict[str, float]  # domain -> mIoU % at the end
    output_dir: str
    wall_time_s: float
    adapter_dir: Optional[str]
    selection: Optional[dict]
    settings: dict
    model_dir: Optional[str] = None  # the whole trained model (full / freeze)
    merged_dir: Optional[str] = None
    warnings: list = dataclasses.field(default_factory=list)  # output files that could not be written
    model_selection: Optional[dict] = None  # the model-selection set's metrics, the best checkpoint (run_outputs)
    pictures: dict = dataclasses.field(default_factory=dict)  # target domain -> PNG of predictions


def _plain(obj: Any) -> Any:
    """A config section (dataclass, TrainingArguments, dict) as plain JSON/YAML types."""
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        obj = obj.to_dict()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    return json.loads(json.dumps(obj, default=lambda o: getattr(o, "value", str(o))))


def config_as_run(cfg: ExperimentConfig) -> dict[str, Any]:
    """The configuration this run uses, overrides applied, as a nested dict (what `config.yaml` holds)."""
    return {"model": _plain(cfg.model), "data": _plain(cfg.data), "method": _plain(cfg.method),
            "training": _plain(cfg.training)}


def _publish_dir(final: str, write: Callable[[str], None]) -> str:
    """Write a folder under a temporary name, then rename it to `final` (an interruption leaves the old one)."""
    staging = final + checkpointing.STAGING_SUFFIX
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    checkpointing.fix_tree_permissions(staging)
    checkpointing.publish(staging, final)
    return final


def _selection_outputs(model, output_dir: str, notes: list[str]) -> Optional[dict]:
    """selection.csv (active / targeted per weight and per block x module type) and selection.png."""
    from ..plotting import selection_table
    from ..tuner.selection import selection_summary

    s = selection_summary(model)
    selection = {"num_targeted": s.num_targeted, "num_active": s.num_active, "num_candidates": s.num_candidates,
                 "active_fraction": s.active_fraction}
    table = selection_table(model)
    lines = ["weight,block,module_type,active,numel,fraction"]
    from ..plotting import block_index, module_type

    for name, (sel, numel) in table.per_tensor.items():
        b = block_index(name)
        lines.append(f"{name},{'' if b is None else b},{module_type(name)},{sel},{numel},{sel / max(numel, 1):.6f}")
    checkpointing.atomic_write_text(os.path.join(output_dir, "selection.csv"), "\n".join(lines) + "\n")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        notes.append("selection.png skipped: matplotlib is not installed (pip install 'peft-fishertune[plot]')")
        logger.info(notes[-1])
        return selection
    from ..plotting import plot_selection

    with checkpointing.atomic_path(os.path.join(output_dir, "selection.png")) as tmp:
        plot_selection(model, path=tmp + ".png", title=f"selected elements ({s.num_active:,} of {s.num_targeted:,})")
        os.replace(tmp + ".png", tmp)
    return selection


def _attempt(what: str, fn: Callable[[], Any], warnings: list[str]) -> Any:
    """Run one end-of-run write; a failure is reported and recorded, never raised (the training is done)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - nothing written after training may lose the training
        msg = f"{what}: {type(e).__name__}: {e}"
        warnings.append(msg)
        print(f"warning: could not write {msg}", flush=True)
        return None


def training_arguments(cfg: ExperimentConfig, report_to: Optional[list] = None):
    """The run's `FisherTuneTrainingArguments` (typed by `load_config`); `report_to` replaces the config's."""
    if cfg.training is None:
        raise ConfigError("this config was loaded with training=False: it holds no training arguments")
    args = cfg.training
    if report_to is not None:
        args.report_to = list(report_to)
    return args


def num_training_samples(args) -> int:
    """Samples the iteration-based training set must hold: every optimizer step of every process."""
    return args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def save_base_model(cfg: ExperimentConfig, seg, args) -> Optional[str]:
    """A random-init backbone cannot be rebuilt from a hub id: keep the base model beside the adapter
    (`<output_dir>/base_model`, written under a temporary name, then renamed)."""
    if cfg.model.tiny_backbone is None or args.process_index != 0:
        return None
    return _publish_dir(os.path.join(args.output_dir, "base_model"), seg.save_pretrained)


def build_trainer(cfg: ExperimentConfig, model, peft_config, train_dataset, eval_domains, args, *,
                  run_config: Optional[dict] = None):
    """The staged `SegmentationTrainer` for the configured method (a Fisher estimator is made when estimation starts).

    The trainer writes `config.yaml` (`run_config`, default: this config as run) into output_dir when training
    starts, and compares it with a checkpoint's on resume."""
    from ..data import collate_fn
    from ..fisher import make_estimator
    from ..inference.protocols import describe_settings
    from .eval_sets import eval_settings, selection_domain
    from .trainer import SegmentationTrainer

    method = get_method(cfg.method.name)
    settings = {n: s for n, s in eval_settings(cfg.data).items() if n in (eval_domains or {})}
    first = next(iter(settings.values()), None)
    protocol = dict(eval_mode=first.mode, window=first.window, stride=first.stride, tta=first.tta,
                    protocol=describe_settings(settings)) if first is not None else {}
    sel = selection_domain(cfg.data)
    trainer = None

    def estimator_factory():
        return make_estimator(model, peft_config, loss_fn=None, accelerator=trainer.accelerator)

    try:
        trainer = SegmentationTrainer(
            model=model, args=args, train_dataset=train_dataset, data_collator=collate_fn,
            method=method, estimator_factory=estimator_factory if method.estimator else None,
            eval_domains=eval_domains, **protocol, selection_domains=[sel] if sel in (eval_domains or {}) else [],
            num_labels=cfg.model.num_labels, selection_update_steps=cfg.method.selection_update_steps,
            random_seed=args.seed, csv_log=os.path.join(args.output_dir, "log.csv"),
            run_config=run_config if run_config is not None else config_as_run(cfg),
        )
    except ValueError as e:  # e.g. alternating execution with a method that does not estimate
        raise ConfigError(f"training: {e}") from None
    return trainer


def stage_plan(args, method_name: str) -> list[str]:
    """One line per stage (or per kind of alternating block): its optimizer steps and what trains."""
    from ..trainer.plan import StagePlan

    method = get_method(method_name)
    plan = StagePlan(args.stage1_steps, args.stage2_steps, args.stage3_steps,
                     alternate_steps=getattr(args, "alternate_steps", 0), estimates=method.estimator,
                     selects=method.selects, backbone_from_stage=method.backbone_from_stage)
    t1, t2, t3 = args.stage1_steps, args.stage2_steps, args.stage3_steps

    kinds = method.step_kinds

    def trains(stage: int) -> str:
        if stage == 3 and method.selects:
            return "decoder + the selected backbone elements, δ growing"
        if kinds[stage - 1] == "backbone":
            return f"decoder + what {method_name} trains ({method.summary})"
        return "decoder" + ("; Fisher scores estimated on every batch" if kinds[stage - 1] == "estimate" else "")

    first = trains(1) if kinds[0] == "backbone" else "decoder warm-up, backbone frozen"  # Rein trains from stage 1
    lines = [f"stage 1  steps [0, {t1}): {first}"]
    if plan.alternate_steps:
        lines.append(f"then {plan.after_warmup} steps in alternating blocks of {plan.alternate_steps}: "
                     f"estimation ({trains(2)}) / tuning ({trains(3)}); {plan.tune_steps} tuning steps")
    else:
        lines += [f"stage 2  steps [{t1}, {t1 + t2}): {trains(2)}",
                  f"stage 3  steps [{t1 + t2}, {t1 + t2 + t3}): {trains(3)}"]
    return lines


def _final_table(trainer):
    """The final evaluation: the last periodic one when it evaluated this very model (eval_strategy="steps" at the
    last step), else a new one (also after load_best_model_at_end put an earlier checkpoint's weights back)."""
    if not trainer.eval_domains:
        return None
    last, state, args = trainer.last_eval, trainer.state, trainer.args
    reloaded = bool(args.load_best_model_at_end) and state.best_global_step not in (None, 0, state.global_step)
    if last is not None and last.step == state.global_step and not reloaded:
        return last
    trainer.evaluate()
    return trainer.last_eval


def finish_run(cfg: ExperimentConfig, trainer, model, t0: float) -> ExperimentResult:
    """After training: save the adapter (or the whole model) FIRST, then evaluate every target domain (and the
    model-selection set) and write the output folder: results.md / .csv / .json with the class x domain tables
    (`run_outputs.py`), the selection map and table, the merged model on request, the pictures of predictions.
    A write that fails after the save is reported (printed, and listed in results.json's `warnings`), never
    raised."""
    from . import run_outputs

    args, method, out = trainer.args, get_method(cfg.method.name), trainer.args.output_dir
    main = trainer.is_world_process_zero()
    adapter_dir = model_dir = merged_dir = None
    warnings: list[str] = []
    if main:
        if method.saves == "adapter":
            adapter_dir = _publish_dir(os.path.join(out, "adapter"), model.save_pretrained)
        else:
            model_dir = _publish_dir(os.path.join(out, "model"), model.save_pretrained)
        print(f"{'adapter' if adapter_dir else 'model'} saved to {adapter_dir or model_dir}", flush=True)
    table = _final_table(trainer)
    selection = None
    if main:
        if method.selects:
            selection = _attempt("selection.csv / selection.png", lambda: _selection_outputs(model, out, warnings),
                                 warnings)
        if args.save_merged_model:
            if method.saves == "adapter":
                merged_dir = _attempt("merged_model/", lambda: _publish_dir(
                    os.path.join(out, "merged_model"), model.merge_and_unload().save_pretrained), warnings)
            else:
                note = f"save_merged_model: method {method.name!r} trains no adapter; model/ is the whole model"
                logger.info(note)
                print(note, flush=True)
    from .eval_sets import eval_settings

    domain_settings = eval_settings(cfg.data)
    result = ExperimentResult(
        table=run_outputs.target_miou(table), output_dir=out, wall_time_s=time.time() - t0, adapter_dir=adapter_dir,
        selection=selection,
        settings={"source": cfg.source, "method": method.name, "eval_protocol": cfg.data.eval_protocol or "custom",
                  "protocol": trainer.protocol, "eval_mode": trainer.eval_mode,
                  "test_scale": {n: list(s.test_scale) if s.test_scale else None for n, s in domain_settings.items()},
                  "tta": trainer.tta.describe() if trainer.tta is not None else "no TTA",
                  "mean_definition": table.mean_definition if table is not None else None,
                  "max_steps": args.max_steps, "stages": [args.stage1_steps, args.stage2_steps, args.stage3_steps],
                  "execution": trainer.plan.describe(), "world_size": args.world_size},
        model_dir=model_dir, merged_dir=merged_dir, warnings=warnings,
        model_selection=run_outputs.model_selection_summary(trainer, table))
    if main:
        title = run_outputs.final_title(method.name, trainer.protocol)
        if table is not None:
            print(table.to_markdown(title=title, per_class=True), flush=True)
        line = run_outputs.describe_model_selection(result.model_selection)
        if line:
            print(line, flush=True)
        write = lambda: run_outputs.write_results(out, table, title, asdict(result))  # noqa: E731
        _attempt("results.md / results.csv / results.json", write, warnings)  # before the pictures: never lost
        n_warnings = len(warnings)
        if table is not None and args.pictures_per_domain > 0:
            result.pictures = _attempt("pictures/", lambda: run_outputs.write_pictures(trainer, model, out),
                                       warnings) or {}
            if result.pictures:
                print("pictures: " + ", ".join(result.pictures.values()), flush=True)
        if result.pictures or len(warnings) > n_warnings:  # the paths, or the picture failure, in results.json
            _attempt("results.json", write, warnings)
    return result


def run_experiment(cfg: ExperimentConfig, *, resume_from_checkpoint=None,
                   report_to: Optional[list] = None, callbacks: Optional[list] = None) -> ExperimentResult:
    """The whole run (what scripts/train.py does step by step): train `cfg`, resuming when asked (a checkpoint
    path, or True / "true" for the newest complete one in output_dir), then `finish_run`.

    `callbacks`: extra `TrainerCallback`s, added after the trainer's own stage callback (so each sees a step
    after the stage logic ran: at the first stage-3 step, after the selection)."""
    from accelerate.utils import set_seed

    t0 = time.time()
    args = training_arguments(cfg, report_to)
    train_dataset, eval_domains = build_data(cfg, num_training_samples(args), args.seed)  # data faults: seconds
    set_seed(args.seed)
    base = build_base_model(cfg)
    save_base_model(cfg, base, args)
    model, peft_config = build_model(cfg, base)
    trainer = build_trainer(cfg, model, peft_config, train_dataset, eval_domains, args)
    for cb in callbacks or ():
        trainer.add_callback(cb)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return finish_run(cfg, trainer, model, t0)
