"""`FisherTuneTrainer`: transformers' Trainer running FisherTune's three stages (Algorithm 1).

What happens at each step comes from the pure `StagePlan` (training/stages.py), what a method wraps and trains
from its row in `METHODS` (training/methods.py):

    stage 1  [0, T1)            decoder only (backbone frozen)
    stage 2  [T1, T1+T2)        decoder keeps training; the Fisher estimator takes a step on every batch
    stage 3  [T1+T2, T)         select by DR-FIM once, then decoder + the active elements, δ(t) growing
    (or, with `alternate_steps = N`, estimation and tuning blocks of N steps after the warm-up)

What the stock Trainer cannot express, and how it is done here:
- *Parameters that appear mid-run.* The selected values (or, for the LoRA/full baselines, the backbone) start to
  train at a stage boundary. They are appended to the backbone param groups of the existing optimizer (AdamW makes
  their state on their first step; the scheduler's per-group lr applies); the model decides their group. A new
  selection (alternating execution) swaps the new value tensors in for the old ones. DDP registered its
  parameters when the model was wrapped, so these "late" parameters are averaged across processes here, by one
  all-reduce per optimizer step, before gradient clipping.
- *State that is not a weight.* The candidate lists (whose order carries the ranking) and the estimator's buffers
  and RNG go into `fishertune_state_rank*.pt` in each checkpoint; `_load_from_checkpoint` restores them before the
  optimizer is rebuilt, so a resumed run continues exactly (tests/test_trainer.py).
- *Checkpoints an interruption cannot break.* Every checkpoint is written into `checkpoint-N.partial`, marked
  complete last, renamed to `checkpoint-N`, and only then are old ones rotated (training/checkpointing.py).
- *Evaluation.* `evaluate()` computes per-domain mIoU (sliding window or whole image) on several target datasets,
  keeps it as an `EvaluationTable` (`last_eval`) and prints it, instead of the prediction loop's logits gathering;
  it also runs periodically (`eval_strategy="steps"`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, SchedulerType

from .._memory import release_freed_memory
from ..tuner.selection import random_scores
from . import checkpointing
from .methods import Method, get_method, segmentor_of
from .stages import StagePlan

logger = logging.getLogger(__name__)

STATE_FILE = "fishertune_state_rank{rank}.pt"
TRAINER_STATE_NAME = "trainer_state.json"


@dataclass
class FisherTuneTrainingArguments(TrainingArguments):
    """TrainingArguments plus the stage lengths, the two learning rates (METHOD.md defaults) and the execution
    order of estimation and tuning."""

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
    alternate_steps: int = field(default=0, metadata={
        "help": "0: sequential execution (estimate in stage 2, then tune; the paper's default). N > 0: alternating "
                "execution (Table 2's AE-N): after the warm-up, estimation and tuning blocks of N steps alternate, "
                "each tuning block starting from a new selection."})
    save_merged_model: bool = field(default=False, metadata={
        "help": "Also save the model with the adapter merged into its weights (`merged_model/`)."})

    def __post_init__(self):
        total = self.stage1_steps + self.stage2_steps + self.stage3_steps
        if self.max_steps in (None, -1, 0):
            self.max_steps = total
        if self.max_steps != total:
            raise ValueError(
                f"max_steps={self.max_steps} does not equal stage1_steps + stage2_steps + stage3_steps = {total}"
            )
        if isinstance(self.alternate_steps, bool) or not isinstance(self.alternate_steps, int) or self.alternate_steps < 0:
            raise ValueError(f"alternate_steps={self.alternate_steps!r}; expected an integer >= 0 (0 = sequential)")
        self.learning_rate = self.decoder_lr
        super().__post_init__()


class FisherTuneTrainer(Trainer):
    """Trainer for a segmentation model wrapped for a method of `METHODS` (FisherTune or a baseline).

    Args (besides Trainer's):
        method: a `Method` or its name (see training/methods.py).
        estimator_factory: () -> a Fisher estimator (peft_fishertune.fisher); required when the method estimates.
        eval_domains: {display name: torch Dataset of EvalTransform samples} evaluated by `evaluate()` (also handed
            to Trainer as `eval_dataset`, so `eval_strategy="steps"` evaluates them periodically).
        eval_mode, window, stride, num_labels: evaluation protocol (sliding window by default).
        selection_update_steps: recompute δ(t) every this many tuning steps.
        random_seed: seed of the random-selection baseline's scores.
        csv_log: path of a CSV copy of the logs (rewritten whole at each log, never failing the run).
        run_config: the configuration as run (a nested dict); written to `config.yaml` when training starts, saved in
            every checkpoint and compared on resume.
    """

    def __init__(self, *args, method: Union[str, Method] = "fishertune", estimator_factory=None, eval_domains=None,
                 eval_mode: str = "slide", window=(512, 512), stride=(341, 341), num_labels: int = 19,
                 selection_update_steps: int = 1, random_seed: int = 0, csv_log: Optional[str] = None,
                 run_config: Optional[dict] = None, **kwargs):
        self.method = get_method(method) if isinstance(method, str) else method
        self.eval_domains = dict(eval_domains or {})
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        strategy = getattr(targs, "eval_strategy", "no")
        if str(getattr(strategy, "value", strategy)) != "no" and not self.eval_domains and kwargs.get("eval_dataset") is None:
            raise ValueError(f"eval_strategy={getattr(strategy, 'value', strategy)!r} evaluates periodically, but there "
                             "are no evaluation domains (data.eval is empty): add target datasets or set eval_strategy "
                             "to 'no'")
        if self.eval_domains and kwargs.get("eval_dataset") is None:
            kwargs["eval_dataset"] = self.eval_domains  # lets Trainer accept eval_strategy="steps"; evaluate() reads it
        super().__init__(*args, **kwargs)
        a = self.args
        self.plan = StagePlan(a.stage1_steps, a.stage2_steps, a.stage3_steps, alternate_steps=a.alternate_steps,
                              estimates=self.method.estimator, selects=self.method.selects,
                              backbone_from_stage=self.method.backbone_from_stage)
        if self.method.estimator and estimator_factory is None:
            raise ValueError(f"method {self.method.name!r} estimates Fisher scores: pass estimator_factory")
        self.estimator_factory = estimator_factory
        self.estimator = None
        self.eval_mode, self.window, self.stride = eval_mode, tuple(window), tuple(stride)
        self.num_labels = num_labels
        self.selection_update_steps = selection_update_steps
        self.random_seed = random_seed
        self.run_config = run_config
        # activated: the method's backbone parameters joined the optimizer; selections: how many were made
        self.ft_state: dict[str, Any] = {"activated": False, "selections": 0, "fraction": None}
        self.late_params: list[nn.Parameter] = []
        self.last_eval = None  # EvaluationTable of the latest evaluate()
        self._entered_step: Optional[int] = None
        self._backbone_on: Optional[bool] = None
        callback = _FisherTuneCallback(self.plan, csv_log)
        callback.handler = self.callback_handler
        self.add_callback(callback)
        # stage 1 trains the decoder only: the whole backbone starts frozen, whatever the method
        self.segmentor.set_backbone_trainable(False)

    # ------------------------------------------------------------ structure
    @property
    def segmentor(self):
        return segmentor_of(self.model)

    def stage_at(self, step: int) -> int:
        return self.plan.stage_at(step)

    def _method_params(self) -> list[nn.Parameter]:
        return self.method.backbone_parameters(self.model)

    # ------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            seg = self.segmentor
            params = [p for p in seg.parameters() if p.requires_grad]
            if self.ft_state["activated"]:  # resumed after the backbone started: its parameters are in the saved state
                have = {id(p) for p in params}
                params += [p for p in self._method_params() if id(p) not in have]
            groups = seg.param_groups(self.args.backbone_lr, self.args.decoder_lr, self.args.weight_decay,
                                      params=params)
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
        new = [p for p in params if id(p) not in in_opt]
        if not new:
            return
        groups = {g.get("name"): g for g in opt.param_groups}
        a = self.args
        for g in self.segmentor.param_groups(a.backbone_lr, a.decoder_lr, a.weight_decay, params=new):
            groups[g["name"]]["params"].extend(g["params"])

    def _swap_in_optimizer(self, old: list[nn.Parameter], new: list[nn.Parameter]) -> None:
        """A new selection made new value tensors: put them where the old ones were (fresh optimizer state)."""
        if self.optimizer is None:
            return
        opt = self._inner_optimizer()
        if len(old) != len(new):
            raise RuntimeError(f"a new selection changed the number of trained tensors ({len(old)} -> {len(new)})")
        replace = {id(o): n for o, n in zip(old, new)}
        for g in opt.param_groups:
            g["params"] = [replace.get(id(p), p) for p in g["params"]]
        for o in old:
            opt.state.pop(o, None)

    def _refresh_late_params(self) -> None:
        self.late_params = [p for p in self._method_params() if p.requires_grad] if self.ft_state["activated"] else []

    # ---------------------------------------------------------- the stages
    def _enter_step(self, step: int) -> None:
        """Make the model and optimizer match the plan's phase at `step` (once per optimizer step)."""
        if self._entered_step == step:
            return
        self._entered_step = step
        phase = self.plan.at(step)
        if phase.estimating and self.estimator is None:
            self.estimator = self.estimator_factory()
            logger.info("stage 2: Fisher estimator %s", self.estimator.describe())
        if phase.select_now:
            self._select()
        if phase.backbone_trains != self._backbone_on:
            params = self._method_params()
            for p in params:
                p.requires_grad_(phase.backbone_trains)
            if phase.backbone_trains and not self.ft_state["activated"]:
                self._append_late_params(params)
                self.ft_state["activated"] = True
            self._backbone_on = phase.backbone_trains
            self._refresh_late_params()
        if self.method.selects and phase.tune_step is not None:
            if phase.tune_step % self.selection_update_steps == 0 or self.ft_state["fraction"] is None:
                from ..tuner.selection import set_active_fraction

                cfg = self._ft_config()
                f = self.plan.fraction_at(step, cfg.delta_min, cfg.delta_max, cfg.schedule)
                if f != self.ft_state["fraction"]:
                    set_active_fraction(self.model, f)
                    self.ft_state["fraction"] = f

    def _ft_config(self):
        return self.model.peft_config[self.model.active_adapter]

    def _select(self) -> None:
        from ..tuner.selection import select_parameters

        if self.method.selection == "random":
            scores = random_scores(self.model, self.random_seed)
            info = "random scores"
        else:
            if self.estimator is None:
                raise RuntimeError("a selection is due without a Fisher estimate (no estimation steps before it)")
            # consume: the scores are built in place from the accumulators, which the estimator then drops
            result = self.estimator.result(consume=True)
            scores = result.scores
            info = f"{result.estimator}/{result.mode}, {result.num_samples} samples, w={result.w:.3f}"
            mix = result.metadata or {}
            if mix.get("dr_term") and "lambda_effective" in mix:  # how much the DR term weighs in these scores
                info += (f", λ={mix['lambda_dr']:g}: ΔF term {mix['lambda_effective']:.2f} of the score mass, "
                         f"{mix['dr_share_top']:.2f} in the top {100 * mix['top_fraction']:.0f} %")
            del result
            self._release_estimator()
        old = self._method_params()
        summary = select_parameters(self.model, scores)
        del scores
        new = self._method_params()
        if self.ft_state["activated"]:
            self._swap_in_optimizer(old, new)
            for p, q in zip(old, new):
                q.requires_grad_(p.requires_grad)
        del old, new
        self._write_selection_digest(summary)
        self.ft_state["selections"] += 1
        self.ft_state["fraction"] = None  # select_parameters reset the threshold: apply δ(t) again
        self._refresh_late_params()
        release_freed_memory()  # stage 2's accumulators and the scores, back to the OS
        n = self.ft_state["selections"]
        msg = (f"stage 3: selected {summary.num_candidates:,} candidates of {summary.num_targeted:,} targeted "
               f"({summary.scope}; {info}); {summary.num_active:,} active"
               + (f" (selection {n}, step {self.state.global_step})" if n > 1 else ""))
        logger.info(msg)
        if self.is_world_process_zero():
            print(msg, flush=True)

    def _release_estimator(self) -> None:
        """Stage 2 is over: free everything the estimator owned (accumulators, precisions, hooks, references)."""
        if self.estimator is not None:
            if not self.estimator.released:
                self.estimator.release()
            self.estimator = None
        release_freed_memory()

    def _write_selection_digest(self, summary) -> None:
        """`selection_rank{r}.json`: a hash of the ranked candidate lists, so ranks can be compared."""
        from ..tuner.layer import FisherTuneLayer

        digest = hashlib.sha256()
        for m in self.segmentor.modules():
            if isinstance(m, FisherTuneLayer):
                for a in sorted(m.ft_indices.keys()):
                    digest.update(m.ft_indices[a].detach().cpu().numpy().tobytes())
                    digest.update(m.ft_rank[a].detach().cpu().numpy().tobytes())
        path = os.path.join(self.args.output_dir, f"selection_rank{self.args.process_index}.json")
        checkpointing.atomic_write_json(path, {
            "sha256": digest.hexdigest(), "num_candidates": summary.num_candidates,
            "num_targeted": summary.num_targeted, "step": self.state.global_step,
            "selections": self.ft_state["selections"] + 1})

    # ------------------------------------------------------------ training
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self.ft_state["selections"] > 0 and model.training:  # after a selection (sparse methods): Eq. 7's prior pull
            from ..fisher import prior_pull_loss

            pull = prior_pull_loss(self.model, num_samples=self._prior_num_samples())
            if return_outputs:
                return out[0] + pull.to(out[0].device), out[1]
            return out + pull.to(out.device)
        return out

    def _prior_num_samples(self) -> Optional[int]:
        """N of Eq. 7's summed likelihood: the distinct training samples (the iteration-based view's base dataset).

        The training loss is a mean over samples, so the pull carries γ/N (docs/fisher.md). Unknown N (a dataset
        without `base`): None, i.e. the literal s = 1, which holds the deltas near -g/κ with κ = γτ⁻² = 100: said once.
        """
        if not hasattr(self, "_prior_n"):
            base = getattr(self.train_dataset, "base", None)
            self._prior_n = len(base) if base is not None and hasattr(base, "__len__") else None
            if self._prior_n is None:
                logger.warning("prior pull: the training set's size N is unknown (no `base` dataset), so the pull "
                               "uses s = 1 (κ = γ/τ² = %s): it keeps the deltas small; set "
                               "method.fishertune.data_scale to N, or prior_pull: false",
                               getattr(self._ft_config(), "gamma", 0.01) / getattr(self._ft_config(), "tau", 0.01) ** 2)
            else:
                logger.info("prior pull: κ = γ/(N·τ²) with N = %d training samples", self._prior_n)
        return self._prior_n

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step
        self._enter_step(step)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.estimator is not None and self.plan.at(step).estimating:
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

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """As Trainer.train; `resume_from_checkpoint=True` (or "true") is the newest *complete* checkpoint in
        output_dir, and a checkpoint from a run with another method, model or stage plan is refused, naming what
        differs."""
        out = self.args.output_dir
        path = checkpointing.resolve_resume(resume_from_checkpoint, out)
        if path is not None:
            self._check_compatible(path)
        if self.args.should_save:
            note = checkpointing.existing_run_note(out, path)
            if note:
                print(f"warning: {note}", flush=True)
            checkpointing.remove_stale_staging(out)
            if self.run_config is not None:
                import yaml

                checkpointing.atomic_write_text(os.path.join(out, "config.yaml"),
                                                "# the configuration as run (overrides applied)\n"
                                                + yaml.safe_dump(self.run_config, sort_keys=False))
        return super().train(resume_from_checkpoint=path, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
                             **kwargs)

    # --------------------------------------------------------- checkpoints
    def _run_identity(self) -> dict[str, Any]:
        return {"method": self.method.name, "plan": asdict(self.plan), "config": self.run_config}

    def _check_compatible(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, checkpointing.RUN_CONFIG)
        if not os.path.isfile(path):
            raise checkpointing.CheckpointError(
                f"{checkpoint} has no {checkpointing.RUN_CONFIG}: it was not written by FisherTuneTrainer")
        with open(path) as f:
            saved = json.load(f)
        mine = self._run_identity()
        diffs = checkpointing.config_differences(
            {"method.name": saved.get("method"), "plan": saved.get("plan")},
            {"method.name": mine["method"], "plan": mine["plan"]})
        if saved.get("config") and mine["config"]:
            diffs += checkpointing.config_differences(
                {k: saved["config"].get(k) for k in ("model", "method")},
                {k: mine["config"].get(k) for k in ("model", "method")})
        if diffs:
            raise checkpointing.CheckpointError(
                f"cannot resume from {checkpoint}: it was written by a different run configuration:\n  "
                + "\n  ".join(dict.fromkeys(diffs))
                + "\n(resume with the checkpoint's settings, or start afresh in another output_dir)")

    def _checkpoint_steps(self, staging: str, final: str, trial) -> list[tuple[str, Callable[[], None]]]:
        """The writes of one checkpoint, in order (each a named step, so tests can cut the save at any of them)."""
        a = self.args
        steps = [("model", lambda: self.save_model(staging, _internal_call=True))]
        if not a.save_only_model:
            steps += [("optimizer", lambda: self._save_optimizer_and_scheduler(staging)),
                      ("scaler", lambda: self._save_scaler(staging)),
                      ("rng", lambda: self._save_rng_state(staging))]
        steps += [
            ("fishertune_state", lambda: self._save_fishertune_state(staging)),
            ("trainer_state", lambda: self._save_trainer_state(staging)),
            ("marker", lambda: self._finish_staging(staging)),
            ("publish", lambda: checkpointing.publish(staging, final) if a.should_save else None),
            ("rotate", lambda: self._rotate(os.path.dirname(final))),
        ]
        return steps

    def _save_checkpoint(self, model, trial):
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        staging = checkpointing.staging_dir(final)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
        self.accelerator.wait_for_everyone()
        for _, step in self._checkpoint_steps(staging, final, trial):
            step()
        self.accelerator.wait_for_everyone()

    def _save_fishertune_state(self, staging: str) -> None:
        path = os.path.join(staging, STATE_FILE.format(rank=self.args.process_index))
        with checkpointing.atomic_path(path) as tmp:
            torch.save(self._fishertune_state(), tmp)
        if self.args.should_save:
            checkpointing.atomic_write_json(os.path.join(staging, checkpointing.RUN_CONFIG), self._run_identity())

    def _save_trainer_state(self, staging: str) -> None:
        if not self.args.should_save:
            return
        for cb in [cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)]:
            name, state = cb.__class__.__name__, cb.state()
            if isinstance(self.state.stateful_callbacks.get(name), list):
                self.state.stateful_callbacks[name].append(state)
            else:
                self.state.stateful_callbacks[name] = state
        if self.state.best_global_step:
            best = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if os.path.isdir(best) or best == staging[: -len(checkpointing.STAGING_SUFFIX)]:
                self.state.best_model_checkpoint = best
        self.state.save_to_json(os.path.join(staging, TRAINER_STATE_NAME))

    def _finish_staging(self, staging: str) -> None:
        self.accelerator.wait_for_everyone()  # every rank's files are in place
        if self.args.should_save:
            checkpointing.fix_tree_permissions(staging)
            checkpointing.write_marker(staging, {"step": self.state.global_step, "method": self.method.name,
                                                 "world_size": self.args.world_size})

    def _rotate(self, run_dir: str) -> None:
        if self.args.should_save:
            checkpointing.rotate(run_dir, self.args.save_total_limit, keep=self.state.best_model_checkpoint)

    def _fishertune_state(self) -> dict[str, Any]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = {}
        for name, m in self.segmentor.named_modules():
            if isinstance(m, BaseTunerLayer):
                own = set(m.adapter_layer_names) | set(m.other_param_names)
                tensors = {k: v.detach().cpu().clone() for k, v in m.state_dict().items() if k.split(".")[0] in own}
                if tensors:
                    layers[name] = tensors
        return {
            "method": self.method.name,
            "ft_state": dict(self.ft_state),
            "layers": layers,
            "estimator": self.estimator.state_dict() if self.estimator is not None else None,
        }

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, STATE_FILE.format(rank=self.args.process_index))
        if not os.path.isfile(path):
            raise checkpointing.CheckpointError(
                f"{path} is missing: {resume_from_checkpoint} was not written by FisherTuneTrainer "
                "(or by a run with another number of processes)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("method", self.method.name) != self.method.name:
            raise checkpointing.CheckpointError(
                f"cannot resume from {resume_from_checkpoint}: method.name is {state['method']!r} there, "
                f"{self.method.name!r} in this run")
        modules = dict(self.segmentor.named_modules())
        for name, tensors in state["layers"].items():
            modules[name].load_state_dict(tensors, strict=False)
        self.ft_state = {"activated": False, "selections": 0, "fraction": None, **state["ft_state"]}
        if "selected" in state["ft_state"]:  # written before alternating execution existed
            self.ft_state["selections"] = int(bool(state["ft_state"].pop("selected")))
            self.ft_state.pop("selected", None)
        self._entered_step, self._backbone_on = None, None
        if state["estimator"] is not None:
            self.estimator = self.estimator_factory()
            self.estimator.load_state_dict(state["estimator"])

    # ----------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Per-domain mIoU of `eval_dataset` (a {name: dataset} dict; default: the trainer's eval domains).

        Returns the flat metrics Trainer expects (`{prefix}_{domain}_mIoU`, `{prefix}_mIoU` = the mean); the typed
        per-domain table is `self.last_eval`."""
        from ..inference import evaluate_domains, evaluation_table

        domains = eval_dataset if isinstance(eval_dataset, dict) else self.eval_domains
        if not domains:
            return {}
        results = evaluate_domains(self.model, domains, num_labels=self.num_labels, mode=self.eval_mode,
                                   window=self.window, stride=self.stride, accelerator=self.accelerator)
        table = evaluation_table(results, sizes={n: len(d) for n, d in domains.items()},
                                 step=self.state.global_step, protocol=self.protocol)
        self.last_eval = table
        if self.is_world_process_zero():
            print(table.to_markdown(title=f"step {self.state.global_step}: mIoU (%), {self.protocol}"), flush=True)
        metrics = table.log_metrics(metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    @property
    def protocol(self) -> str:
        if self.eval_mode == "slide":
            return f"slide window {'x'.join(map(str, self.window))} stride {'x'.join(map(str, self.stride))}"
        return self.eval_mode

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        step = self.state.global_step
        logs = dict(logs)
        logs.setdefault("stage", self.plan.stage_at(max(step - 1, 0)))  # the step that just finished
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
    """Shows stage/δ/loss/lr on the progress bar and keeps `log.csv` (a CSV copy of the logs).

    The CSV is rewritten whole (to a temporary name, then renamed) at every log, with the union of all columns
    seen, so new columns (an evaluation's per-domain mIoU) never break it. A resumed run keeps the rows up to its
    checkpoint's step; a fresh run starts a new file. A failure to write it is logged once and never stops training.
    """

    FIRST = ["step", "stage", "delta", "loss", "learning_rate", "grad_norm", "epoch"]

    def __init__(self, plan: StagePlan, csv_log: Optional[str]):
        self.plan = plan
        self.csv_log = csv_log
        self.rows: list[dict[str, Any]] = []
        self._warned = False
        self.handler = None  # the trainer's CallbackHandler (to find the progress bar); set by the trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.rows = []
        if self.csv_log and state.global_step > 0 and os.path.isfile(self.csv_log):  # resumed: keep the history
            try:
                with open(self.csv_log, newline="") as f:
                    self.rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit()
                                 and int(r["step"]) <= state.global_step]
            except (OSError, csv.Error, ValueError) as e:
                logger.warning("log.csv: could not read the earlier rows of %s (%s); starting a new file", self.csv_log, e)

    def on_step_end(self, args, state, control, **kwargs):
        bar = None
        for cb in getattr(self.handler, "callbacks", ()):
            if isinstance(cb, ProgressCallback):
                bar = getattr(cb, "training_bar", None)
        if bar is None:
            return
        post = {"stage": self.plan.stage_at(max(state.global_step - 1, 0))}
        if state.log_history:
            last = state.log_history[-1]
            if "delta" in last:
                post["δ"] = f"{last['delta']:.4f}"
            for k in ("loss", "learning_rate"):
                if k in last:
                    post["lr" if k == "learning_rate" else k] = f"{last[k]:.3g}"
        bar.set_postfix(post, refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.csv_log or not state.is_world_process_zero or not logs:
            return
        self.rows.append({"step": state.global_step,
                          **{k: v for k, v in logs.items() if isinstance(v, (int, float, str))}})
        try:
            fields = list(self.FIRST)
            for r in self.rows:
                fields += [k for k in r if k not in fields]
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=fields, restval="")
            w.writeheader()
            w.writerows(self.rows)
            checkpointing.atomic_write_text(self.csv_log, buf.getvalue())
        except Exception as e:  # noqa: BLE001 - a log file must never end a training run
            if not self._warned:
                logger.warning("log.csv: could not write %s (%s: %s); training continues", self.csv_log,
                               type(e).__name__, e)
                self._warned = True
