"""Build a run from an `ExperimentConfig` and execute it: data -> model -> method -> trainer -> evaluation.

`run_experiment(cfg)` is what `scripts/train.py` calls; the benchmark calls it too.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from ..inference import format_table
from .config import SPARSE_METHODS, ConfigError, DatasetEntry, ExperimentConfig

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


class TransformedDataset(torch.utils.data.Dataset):
    def __init__(self, base, transform, max_images: Optional[int] = None):
        self.base, self.transform = base, transform
        self.n = len(base) if max_images is None else min(len(base), max_images)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        sample = self.base[i]
        return self.transform(sample["image"], sample["label"])


def _load(entry: DatasetEntry):
    from ..data import load_dgss_dataset

    return load_dgss_dataset(entry.name, entry.root, split=entry.split, condition=entry.condition)


def build_data(cfg: ExperimentConfig, train_length: int, seed: int):
    from ..data import EvalTransform, TrainTransform, generate_synthetic_domains

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
    eval_tf = EvalTransform(test_scale=tuple(d.test_scale))
    train = IterationDataset(_load(d.train), train_tf, train_length, seed)
    evals = {e.display: TransformedDataset(_load(e), eval_tf, e.max_images) for e in d.eval}
    return train, evals


def build_base_model(cfg: ExperimentConfig):
    """The unwrapped segmentation model of the config (backbone from its checkpoint, or tiny random init)."""
    from ..models import build_segmentation_model, tiny_backbone_config

    m = cfg.model
    kwargs = dict(decoder=m.decoder, num_labels=m.num_labels, pyramid_channels=m.pyramid_channels,
                  decoder_config=m.decoder_config, out_indices=m.out_indices)
    if m.tiny_backbone is not None:
        return build_segmentation_model(m.backbone, backbone_config=tiny_backbone_config(m.backbone, **m.tiny_backbone), **kwargs)
    if m.model_name_or_path:
        return build_segmentation_model(m.backbone, model_name_or_path=m.model_name_or_path, **kwargs)
    raise ConfigError("model: give model_name_or_path (a hub id or checkpoint directory) or tiny_backbone")


def build_model(cfg: ExperimentConfig, seg=None):
    """The segmentation model, wrapped for the configured method; returns (model, FisherTuneConfig or None)."""
    from peft import LoraConfig, get_peft_model

    from ..tuner.config import FisherTuneConfig

    seg = build_base_model(cfg) if seg is None else seg
    m = cfg.model
    method = cfg.method.name
    targets = seg.fisher_target_modules(tuple(m.candidate_kinds))
    decoder = seg.decoder_module_names()
    if method in SPARSE_METHODS:
        ft = dict(cfg.method.fishertune)
        if method == "fim":  # FIM-only: empirical Fisher of clean data, no domain term
            ft.update(fisher_estimator="empirical", lambda_dr=0.0)
        elif method == "drfim_empirical":  # DR-FIM without the variational step
            ft.update(fisher_estimator="empirical")
        ft_config = FisherTuneConfig(target_modules=targets, modules_to_save=decoder, **ft)
        return get_peft_model(seg, ft_config), ft_config
    if method == "lora":
        lcfg = LoraConfig(r=cfg.method.lora_r, lora_alpha=cfg.method.lora_r, target_modules=targets, modules_to_save=decoder)
        return get_peft_model(seg, lcfg), None
    return seg, None  # full / freeze: the plain model


@dataclass
class ExperimentResult:
    table: dict[str, float]  # domain -> mIoU % at the end
    output_dir: str
    wall_time_s: float
    adapter_dir: Optional[str]
    selection: Optional[dict]
    settings: dict


def run_experiment(cfg: ExperimentConfig, *, resume_from_checkpoint: Optional[str] = None,
                   report_to: Optional[list] = None, callbacks: Optional[list] = None) -> ExperimentResult:
    """`callbacks`: extra `TrainerCallback`s, added after the trainer's own stage callback (so each sees a step
    after the stage logic ran: at the first stage-3 step, after the selection)."""
    from accelerate.utils import set_seed

    from ..data import collate_fn
    from ..fisher import make_estimator
    from ..tuner.selection import selection_summary
    from .trainer import FisherTuneTrainer, FisherTuneTrainingArguments

    t0 = time.time()
    tr = dict(cfg.training)
    tr.setdefault("report_to", report_to if report_to is not None else ["tensorboard"])
    tr.setdefault("lr_scheduler_type", "polynomial")
    tr.setdefault("lr_scheduler_kwargs", {"power": 1.0, "lr_end": 0.0})
    tr.setdefault("remove_unused_columns", False)
    tr.setdefault("save_strategy", "no")
    tr.setdefault("eval_strategy", "no")
    tr.setdefault("output_dir", "outputs/run")
    try:
        args = FisherTuneTrainingArguments(**tr)
    except TypeError as e:
        raise ConfigError(f"training: {e}") from None
    except ValueError as e:
        raise ConfigError(f"training: {e}") from None
    set_seed(args.seed)
    seg = build_base_model(cfg)
    if cfg.model.tiny_backbone is not None and args.process_index == 0:
        # a random-init backbone cannot be rebuilt from a hub id: keep it beside the adapter
        seg.save_pretrained(os.path.join(args.output_dir, "base_model"))
    model, ft_config = build_model(cfg, seg)
    samples = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    train, evals = build_data(cfg, samples, args.seed)
    method = cfg.method.name

    def estimator_factory():
        return make_estimator(model, ft_config, loss_fn=None, accelerator=trainer.accelerator)

    trainer = FisherTuneTrainer(
        model=model, args=args, train_dataset=train, data_collator=collate_fn,
        method=method, estimator_factory=estimator_factory if method in SPARSE_METHODS and method != "random" else None,
        eval_domains=evals, eval_mode=cfg.data.eval_mode, window=cfg.data.window, stride=cfg.data.stride,
        num_labels=cfg.model.num_labels, selection_update_steps=cfg.method.selection_update_steps,
        random_seed=args.seed, csv_log=os.path.join(args.output_dir, "log.csv"),
    )
    for cb in callbacks or ():
        trainer.add_callback(cb)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    metrics = trainer.evaluate() if evals else {}
    table = {k[len("eval_"):-len("_mIoU")]: v for k, v in metrics.items() if k.endswith("_mIoU") and k != "eval_avg_mIoU"}
    adapter_dir, selection = None, None
    if trainer.is_world_process_zero():
        if method in SPARSE_METHODS or method == "lora":
            adapter_dir = os.path.join(args.output_dir, "adapter")
            model.save_pretrained(adapter_dir)
        else:  # full / freeze: the whole trained model
            model.save_pretrained(os.path.join(args.output_dir, "model"))
        if method in SPARSE_METHODS:
            s = selection_summary(model)
            selection = {"num_targeted": s.num_targeted, "num_active": s.num_active, "num_candidates": s.num_candidates,
                         "active_fraction": s.active_fraction}
    result = ExperimentResult(table=table, output_dir=args.output_dir, wall_time_s=time.time() - t0,
                              adapter_dir=adapter_dir, selection=selection,
                              settings={"source": cfg.source, "method": method, "eval_mode": cfg.data.eval_mode,
                                        "test_scale": cfg.data.test_scale, "max_steps": args.max_steps,
                                        "stages": [args.stage1_steps, args.stage2_steps, args.stage3_steps],
                                        "world_size": args.world_size})
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(asdict(result), f, indent=2)
        if table:
            print(format_table(table, title=f"final mIoU (%) — {method}, {cfg.data.eval_mode} at test scale "
                                            f"{cfg.data.test_scale[0]}x{cfg.data.test_scale[1]}"), flush=True)
        if adapter_dir:
            print(f"adapter saved to {adapter_dir}", flush=True)
    return result
