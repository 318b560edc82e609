"""`FisherTuneTrainer`: transformers' Trainer running FisherTune's three stages (Algorithm 1).

    stage 1  [0, T1)            decoder only (backbone frozen)
    stage 2  [T1, T1+T2)        decoder keeps training; the Fisher estimator takes a step on every batch
    stage 3  [T1+T2, T)         select by DR-FIM once, then decoder + the active elements, δ(t) growing

What the stock Trainer cannot express, and how it is done here:
- *Parameters that appear mid-run.* The selected values (or, for the LoRA/full baselines, the backbone) start to
  train at a stage boundary. They are appended to the backbone param group of the existing optimizer (AdamW makes
  their state on their first step; the scheduler's per-group lr applies). DDP registered its parameters when the
  model was wrapped, so these "late" parameters are averaged across processes here, by one all-reduce per
  optimizer step, before gradient clipping.
- *State that is not a weight.* The candidate lists (whose order carries the ranking) and the estimator's buffers
  and RNG go into `fishertune_state*.pt` in each checkpoint; `_load_from_checkpoint` restores them before the
  optimizer is rebuilt, so a resumed run continues exactly (tests/test_trainer.py).
- *Evaluation.* `evaluate()` computes per-domain mIoU (sliding window or whole image) on several target datasets
  and prints a table, instead of the prediction loop's logits gathering.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, SchedulerType

from ..tuner.layer import FisherTuneLayer
from ..tuner.schedule import fraction_at_step
from ..tuner.selection import select_parameters, set_active_fraction

logger = logging.getLogger(__name__)

STATE_FILE = "fishertune_state_rank{rank}.pt"


@dataclass
class FisherTuneTrainingArguments(TrainingArguments):
    """TrainingArguments plus the stage lengths and the two learning rates (METHOD.md defaults)."""

    stage1_steps: int = field(default=10_000, metadata={"help": "T1: decoder warm-up (backbone frozen)."})
    stage2_steps: int = field(default=2_000, metadata={"help": "T2: DR-FIM estimation (decoder keeps training)."})
    stage3_steps: int = field(default=28_000, metadata={"help": "T3: sparse fine-tuning with growing selection."})
    backbone_lr: float = field(default=1e-5, metadata={"help": "lr of the selected backbone elements."})
    decoder_lr: float = field(default=1e-4, metadata={"help": "lr of the decoder (also `learning_rate`)."})
    # TrainingArguments fields whose default differs for a FisherTune run (the paper's poly schedule, one save at
    # the end, the segmentation batch's columns kept, logs to TensorBoard)
    output_dir: str | None = field(default="outputs/run", metadata={"help": "Where logs, checkpoints and the adapter go."})
    lr_scheduler_type: SchedulerType | str = field(default="polynomial", metadata={"help": "Poly decay (power 1)."})
    lr_scheduler_kwargs: dict | str | None = field(
        default_factory=lambda: {"power": 1.0, "lr_end": 0.0}, metadata={"help": "Arguments of the lr scheduler."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep pixel_values / labels."})
    save_strategy: SaveStrategy | str = field(default="no", metadata={"help": "Checkpoints: no | steps | epoch."})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "Logging integrations."})

    def __post_init__(self):
        total = self.stage1_steps + self.stage2_steps + self.stage3_steps
        if self.max_steps in (None, -1, 0):
            self.max_steps = total
        if self.max_steps != total:
            raise ValueError(
                f"max_steps={self.max_steps} does not equal stage1_steps + stage2_steps + stage3_steps = {total}"
            )
        self.learning_rate = self.decoder_lr
        super().__post_init__()


class FisherTuneTrainer(Trainer):
    """Trainer for a segmentation model wrapped with FisherTune (or a baseline, see `method`).

    Args (besides Trainer's):
        method: "fishertune" | "drfim_empirical" | "fim" | "random" (sparse selection: the adapter must be
            FisherTune), "lora" | "full" (the backbone trains from stage 2 on), "freeze" (never).
        estimator_factory: () -> a Fisher estimator (peft_fishertune.fisher); None for "random"/baselines.
        eval_domains: {display name: torch Dataset of EvalTransform samples} evaluated by `evaluate()`.
        eval_mode, window, stride, num_labels: evaluation protocol (sliding window by default).
        selection_update_steps: recompute δ(t) every this many stage-3 steps.
        random_seed: seed of the random-selection baseline's scores.
    """

    def __init__(self, *args, method: str = "fishertune", estimator_factory=None, eval_domains=None,
                 eval_mode: str = "slide", window=(512, 512), stride=(341, 341), num_labels: int = 19,
                 selection_update_steps: int = 1, random_seed: int = 0, csv_log: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.method = method
        self.estimator_factory = estimator_factory
        self.estimator = None
        self.eval_domains = eval_domains or {}
        self.eval_mode, self.window, self.stride = eval_mode, tuple(window), tuple(stride)
        self.num_labels = num_labels
        self.selection_update_steps = selection_update_steps
        self.random_seed = random_seed
        self.ft_state = {"activated": False, "selected": False, "fraction": None}
        self.late_params: list[nn.Parameter] = []
        self.last_eval: dict[str, float] = {}
        self.add_callback(_FisherTuneCallback(self, csv_log))
        # stage 1 trains the decoder only: the whole backbone starts frozen, whatever the method
        for p in self.segmentor.backbone.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------ structure
    @property
    def peft_model(self):
        return self.model

    @property
    def segmentor(self):
        m = self.model
        return m.base_model.model if hasattr(m, "base_model") and hasattr(m.base_model, "model") else m

    @property
    def stages(self) -> tuple[int, int, int]:
        a = self.args
        return a.stage1_steps, a.stage2_steps, a.stage3_steps

    def stage_at(self, step: int) -> int:
        t1, t2, _ = self.stages
        return 1 if step < t1 else (2 if step < t1 + t2 else 3)

    def _backbone_trainables(self) -> list[nn.Parameter]:
        """The backbone parameters this method trains once activated, in module (named_parameters) order."""
        bb = self.segmentor.backbone
        if self.method == "freeze":
            return []
        if self.method == "full":
            return list(bb.parameters())
        if self.method == "lora":
            from peft.tuners.lora import LoraLayer

            ids = {id(p) for m in bb.modules() if isinstance(m, LoraLayer)
                   for d in (m.lora_A, m.lora_B) for p in d.parameters()}
        else:
            ids = {id(m.ft_values[a]) for m in bb.modules() if isinstance(m, FisherTuneLayer)
                   for a in m.active_adapters if a in m.ft_values}
        return [p for p in bb.parameters() if id(p) in ids]

    def _set_backbone_trainable(self, on: bool) -> None:
        for p in self._backbone_trainables():
            p.requires_grad_(on)

    # ------------------------------------------------------------ optimizer
    def _backbone_group(self, p: nn.Parameter, owners, ft_ids) -> str:
        """FisherTune values decay (toward the pretrained weight, since they are deltas); other backbone
        parameters follow the model's own rule (>= 2-D weights of Linear/Conv decay)."""
        return "backbone/decay" if id(p) in ft_ids or self.segmentor._decays(p, owners[id(p)]) else "backbone/no_decay"

    def _ft_value_ids(self) -> set[int]:
        return {id(v) for m in self.segmentor.modules() if isinstance(m, FisherTuneLayer) for v in m.ft_values.values()}

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = self.segmentor.param_groups(self.args.backbone_lr, self.args.decoder_lr, self.args.weight_decay)
            by_name = {g["name"]: g for g in groups}
            owners, ft_ids = self.segmentor._owners(), self._ft_value_ids()
            backbone = by_name["backbone/decay"]["params"] + by_name["backbone/no_decay"]["params"]
            order = {id(p): i for i, p in enumerate(self.segmentor.backbone.parameters())}
            for g in ("backbone/decay", "backbone/no_decay"):
                by_name[g]["params"] = sorted((p for p in backbone if self._backbone_group(p, owners, ft_ids) == g),
                                              key=lambda p: order[id(p)])
            optim_cls, optim_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
            optim_kwargs.pop("lr", None)
            # empty groups are kept: late parameters are appended to them (the scheduler's lr follows the group)
            self.optimizer = optim_cls(groups, lr=self.args.decoder_lr, **optim_kwargs)
        return self.optimizer

    def _inner_optimizer(self):
        opt = self.optimizer
        return getattr(opt, "optimizer", opt)

    def _append_late_params(self, params: list[nn.Parameter]) -> None:
        opt = self._inner_optimizer()
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        owners, ft_ids = self.segmentor._owners(), self._ft_value_ids()
        groups = {g.get("name"): g for g in opt.param_groups}
        for p in params:
            if id(p) not in in_opt:
                groups[self._backbone_group(p, owners, ft_ids)]["params"].append(p)
        self.late_params = [p for p in self._backbone_trainables() if p.requires_grad]

    # ---------------------------------------------------------- the stages
    def _on_step_begin(self, step: int) -> None:
        stage = self.stage_at(step)
        t1, t2, t3 = self.stages
        if stage >= 2 and self.method in ("lora", "full") and not self.ft_state["activated"]:
            self._activate()
        if stage == 2 and self.estimator is None and self.estimator_factory is not None:
            self.estimator = self.estimator_factory()
            logger.info("stage 2: Fisher estimator %s", self.estimator.describe())
        if stage == 3 and self.method not in ("lora", "full", "freeze"):
            if not self.ft_state["selected"]:
                self._select()
            if (step - (t1 + t2)) % self.selection_update_steps == 0 or self.ft_state["fraction"] is None:
                cfg = self._ft_config()
                f = fraction_at_step(step, t1 + t2, t3, cfg.delta_min, cfg.delta_max, cfg.schedule)
                if f != self.ft_state["fraction"]:
                    set_active_fraction(self.model, f)
                    self.ft_state["fraction"] = f

    def _ft_config(self):
        return self.model.peft_config[self.model.active_adapter]

    def _activate(self) -> None:
        self._set_backbone_trainable(True)
        self._append_late_params(self._backbone_trainables())
        self.ft_state["activated"] = True

    def _select(self) -> None:
        if self.method == "random":
            from ..tuner.model import layer_seed
            from ..tuner.selection import target_parameters

            scores = {}
            for n, w in target_parameters(self.model):
                gen = torch.Generator().manual_seed(layer_seed(self.random_seed, n))
                scores[n] = torch.rand(w.shape, generator=gen)
            info = "random scores"
        else:
            if self.estimator is None:
                raise RuntimeError("stage 3 reached without a Fisher estimate (stage2_steps=0?)")
            result = self.estimator.result()
            scores = result.scores
            info = f"{result.estimator}/{result.mode}, {result.num_samples} samples, w={result.w:.3f}"
            self.estimator.release()
            self.estimator = None
        summary = select_parameters(self.model, scores)
        self._write_selection_digest(summary)
        self.ft_state["selected"] = True
        self._activate()
        self.ft_state["fraction"] = None
        msg = (f"stage 3: selected {summary.num_candidates:,} candidates of {summary.num_targeted:,} targeted "
               f"({summary.scope}; {info}); {summary.num_active:,} active")
        logger.info(msg)
        if self.is_world_process_zero():
            print(msg, flush=True)

    def _write_selection_digest(self, summary) -> None:
        """`selection_rank{r}.json`: a hash of the ranked candidate lists, so ranks can be compared."""
        digest = hashlib.sha256()
        for m in self.segmentor.modules():
            if isinstance(m, FisherTuneLayer):
                for a in sorted(m.ft_indices.keys()):
                    digest.update(m.ft_indices[a].detach().cpu().numpy().tobytes())
                    digest.update(m.ft_rank[a].detach().cpu().numpy().tobytes())
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, f"selection_rank{self.args.process_index}.json"), "w") as f:
            json.dump({"sha256": digest.hexdigest(), "num_candidates": summary.num_candidates,
                       "num_targeted": summary.num_targeted, "step": self.state.global_step}, f)

    # ------------------------------------------------------------ training
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.estimator is not None and self.stage_at(self.state.global_step) == 2:
            # The estimator substitutes weights functionally and takes gradients after the call returns;
            # activation checkpointing would recompute with the original weights, so it is off for these passes.
            with _no_activation_checkpointing(self.model), self.compute_loss_context_manager():
                self.estimator.step(self._prepare_inputs(inputs))
        if self.accelerator.sync_gradients and self.accelerator.num_processes > 1 and self.late_params:
            self._all_reduce_late_grads()
        return loss

    def _all_reduce_late_grads(self) -> None:
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.late_params]
        flat = torch.cat([g.reshape(-1) for g in grads]) if grads else None
        if flat is None or flat.numel() == 0:
            return
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.accelerator.num_processes
        offset = 0
        for p, g in zip(self.late_params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    # --------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        out = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        os.makedirs(out, exist_ok=True)
        torch.save(self._fishertune_state(), os.path.join(out, STATE_FILE.format(rank=self.args.process_index)))

    def _fishertune_state(self) -> dict[str, Any]:
        layers = {}
        for name, m in self.segmentor.named_modules():
            if isinstance(m, FisherTuneLayer):
                layers[name] = {k: v.detach().cpu().clone() for k, v in m.state_dict().items() if k.startswith("ft_")}
        return {
            "ft_state": dict(self.ft_state),
            "layers": layers,
            "estimator": self.estimator.state_dict() if self.estimator is not None else None,
        }

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, STATE_FILE.format(rank=self.args.process_index))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: {resume_from_checkpoint} was not written by FisherTuneTrainer "
                                    f"(or by a run with another number of processes)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        modules = dict(self.segmentor.named_modules())
        for name, tensors in state["layers"].items():
            modules[name].load_state_dict(tensors, strict=False)
        self.ft_state = dict(state["ft_state"])
        if self.ft_state["activated"]:
            self._set_backbone_trainable(True)
            self.late_params = [p for p in self._backbone_trainables() if p.requires_grad]
        if state["estimator"] is not None:
            self.estimator = self.estimator_factory()
            self.estimator.load_state_dict(state["estimator"])

    # ----------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        from ..inference import evaluate_domains, format_table

        domains = eval_dataset if isinstance(eval_dataset, dict) else self.eval_domains
        if not domains:
            return {}
        results = evaluate_domains(self.model, domains, num_labels=self.num_labels, mode=self.eval_mode,
                                   window=self.window, stride=self.stride, accelerator=self.accelerator)
        metrics = {f"{metric_key_prefix}_{name}_mIoU": 100 * r["mean_iou"] for name, r in results.items()}
        metrics[f"{metric_key_prefix}_avg_mIoU"] = sum(metrics.values()) / len(metrics)
        self.last_eval = {"step": self.state.global_step, **{n: 100 * r["mean_iou"] for n, r in results.items()}}
        if self.is_world_process_zero():
            print(format_table({n: 100 * r["mean_iou"] for n, r in results.items()},
                               title=f"step {self.state.global_step}: mIoU (%), {self.eval_mode} "
                                     f"{'window ' + 'x'.join(map(str, self.window)) if self.eval_mode == 'slide' else ''}"),
                  flush=True)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        step = self.state.global_step
        logs = dict(logs)
        logs.setdefault("stage", self.stage_at(max(step - 1, 0)))  # the step that just finished
        if self.ft_state.get("fraction") is not None:
            logs.setdefault("delta", round(self.ft_state["fraction"], 6))
        super().log(logs, *args, **kwargs)


@contextlib.contextmanager
def _no_activation_checkpointing(model: nn.Module):
    """Turn off transformers' per-layer activation checkpointing flags for the duration, then restore them."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in layers:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in layers:
            m.gradient_checkpointing = True


class _FisherTuneCallback(TrainerCallback):
    """Runs the stage logic at each step start, shows stage/δ/loss/lr on the bar, writes the CSV log."""

    def __init__(self, trainer: FisherTuneTrainer, csv_log: Optional[str]):
        self.trainer = trainer
        self.csv_log = csv_log
        self._fields: Optional[list[str]] = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._on_step_begin(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        for cb in self.trainer.callback_handler.callbacks:
            if isinstance(cb, ProgressCallback) and getattr(cb, "training_bar", None) is not None:
                t = self.trainer
                post = {"stage": t.stage_at(max(state.global_step - 1, 0))}
                if t.ft_state.get("fraction") is not None:
                    post["δ"] = f"{t.ft_state['fraction']:.4f}"
                if state.log_history:
                    last = state.log_history[-1]
                    for k in ("loss", "learning_rate"):
                        if k in last:
                            post["lr" if k == "learning_rate" else k] = f"{last[k]:.3g}"
                cb.training_bar.set_postfix(post, refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.csv_log or not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float, str))}}
        os.makedirs(os.path.dirname(os.path.abspath(self.csv_log)), exist_ok=True)
        fresh = not os.path.exists(self.csv_log)
        if self._fields is None:
            self._fields = ["step", "stage", "delta", "loss", "learning_rate", "grad_norm", "epoch"]
        extra = [k for k in row if k not in self._fields]
        if extra:
            self._fields += extra
            fresh = True  # rewrite the header with the new columns
            old = []
            if os.path.exists(self.csv_log):
                with open(self.csv_log) as f:
                    old = list(csv.DictReader(f))
            with open(self.csv_log, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self._fields)
                w.writeheader()
                w.writerows(old)
            fresh = False
        with open(self.csv_log, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._fields)
            if fresh:
                w.writeheader()
            w.writerow(row)
