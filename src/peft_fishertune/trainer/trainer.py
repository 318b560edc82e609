"""`FisherTuneTrainer`: transformers' Trainer running FisherTune's three stages on any PEFT model.

    model = get_peft_model(ViTForImageClassification(...), FisherTuneConfig(target_modules=[...],
                                                                           modules_to_save=["classifier"]))
    args = FisherTuneTrainingArguments("out", stage1_steps=100, stage2_steps=50, stage3_steps=350, learning_rate=1e-4)
    FisherTuneTrainer(model=model, args=args, train_dataset=train).train()

Any model whose forward returns a loss works (image classifiers, BERT, causal LMs, our segmentation model). The
stages come from a `FisherTuneSchedule` (schedule.py), the same object a hand-written loop uses:

    stage 1  [0, T1)          what trains outside the FisherTune layers (`modules_to_save`, e.g. the head)
    stage 2  [T1, T1+T2)      the same; the Fisher estimator takes a step on every training batch
    stage 3  [T1+T2, T)       one selection, then the active FisherTune values train too (δ(t) growing), with
                              Eq. 7's prior pull scaled by the training set's size N added to the loss

What the stock Trainer cannot express, and how it is done here:
- *Parameters that appear mid-run.* The FisherTune values start to train at a stage boundary: they are appended to
  the "fishertune" param group of the existing optimizer (AdamW makes their state on their first step; the
  scheduler's per-group lr applies). A new selection (alternating execution) swaps the new value tensors in for the
  old ones. DDP registered its parameters when the model was wrapped, so these "late" parameters are averaged across
  processes here, by one all-reduce per optimizer step, before gradient clipping.
- *Steps where nothing trains* (a causal LM without a head in stage 2): the loss is computed for the log, the
  backward skipped, and the estimator still takes the batch.
- *State that is not a weight.* The candidate lists and the estimator's buffers and RNG go into
  `fishertune_state_rank*.pt` in each checkpoint; `_load_from_checkpoint` restores them before the optimizer is
  rebuilt, so a resumed run continues exactly.
- *Checkpoints an interruption cannot break.* Every checkpoint is written into `checkpoint-N.partial`, marked
  complete last, renamed to `checkpoint-N`, and only then are old ones rotated (checkpointing.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..tuner.sparse_delta import deltas_in_weights, kept_base_values
from . import checkpointing
from .progress import StageLogCallback
from .schedule import FisherTuneSchedule, StepChange, swap_parameters

logger = logging.getLogger(__name__)

STATE_FILE = "fishertune_state_rank{rank}.pt"
TRAINER_STATE_NAME = "trainer_state.json"
FISHERTUNE_GROUP = "fishertune"


@dataclass
class FisherTuneTrainingArguments(TrainingArguments):
    """TrainingArguments plus the three stage lengths (their sum is `max_steps`), the FisherTune values' learning
    rate, the training set's size for the prior pull, and the execution order of estimation and tuning."""

    stage1_steps: int = field(default=0, metadata={
        "help": "T1: warm-up, only what trains outside the FisherTune layers (modules_to_save, e.g. a head)."})
    stage2_steps: int = field(default=100, metadata={"help": "T2: Fisher estimation on every training batch."})
    stage3_steps: int = field(default=900, metadata={"help": "T3: sparse fine-tuning, δ growing to delta_max."})
    fishertune_lr: Optional[float] = field(default=None, metadata={
        "help": "lr of the FisherTune values (the selected weight elements); None: learning_rate."})
    prior_num_samples: Optional[int] = field(default=None, metadata={
        "help": "N of Eq. 7's prior pull (γ/N)·τ⁻²·‖δ‖²/2; None: len(train_dataset) (of its `base` if it has one)."})
    selection_update_steps: Optional[int] = field(default=None, metadata={
        "help": "Recompute δ(t) every this many tuning steps (and on the last one, so the run ends at delta_max); "
                "None: every max(1, tuning steps // 1000)."})
    alternate_steps: int = field(default=0, metadata={
        "help": "0: sequential execution (estimate in stage 2, then tune; the paper's default). N > 0: alternating "
                "execution (Table 2's AE-N): after the warm-up, estimation and tuning blocks of N steps alternate, "
                "each tuning block starting from a new selection."})
    deltas_in_weights: bool = field(default=True, metadata={
        "help": "Write the active deltas into the base weights once per training step (restored bit for bit at its "
                "end) instead of in every forward and backward; the same numbers, fewer index operations. The base "
                "values at the active entries are kept from one step to the next while the active set and the "
                "weights are unchanged (4 bytes per active element; dropped when train() returns). Off under "
                "torch_compile."})

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
        super().__post_init__()


class FisherTuneTrainer(Trainer):
    """Trainer running FisherTune's stages on a PEFT model whose adapter is a `FisherTuneConfig`.

    Args (besides Trainer's; `args` should be `FisherTuneTrainingArguments`):
        estimator_factory: () -> a Fisher estimator; default: `peft_fishertune.fisher.make_estimator` on the model's
            FisherTuneConfig (its `fisher_estimator`, `fisher_mode`, `perturb_at`, ...), using `compute_loss_func`
            for the loss when one is given, else `outputs.loss`.
        csv_log: path of a CSV copy of the logs (rewritten whole at each log, never failing the run).
        schedule_options: extra `FisherTuneSchedule` arguments (subclasses: what trains late, the selection kind).
    """

    checkpoint_error = checkpointing.CheckpointError

    def __init__(self, *args, estimator_factory: Optional[Callable[[], Any]] = None, csv_log: Optional[str] = None,
                 schedule_options: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        for name in ("stage1_steps", "stage2_steps", "stage3_steps"):
            if not hasattr(a, name):
                raise TypeError(f"FisherTuneTrainer needs FisherTuneTrainingArguments (args has no {name})")
        options = dict(schedule_options or {})
        self.schedule = FisherTuneSchedule(
            self.model, a.stage1_steps, a.stage2_steps, a.stage3_steps,
            num_samples=self._prior_num_samples_or_none(options), estimator_factory=estimator_factory,
            loss_fn=self._estimator_loss_fn(), accelerator=self.accelerator,
            alternate_steps=getattr(a, "alternate_steps", 0),
            selection_update_steps=options.pop("selection_update_steps", getattr(a, "selection_update_steps", None)),
            **options)
        self.late_params: list[nn.Parameter] = []
        self._nothing_trains: Optional[bool] = None
        callback = StageLogCallback(self.plan, csv_log)
        callback.handler = self.callback_handler
        self.add_callback(callback)
        self._check_stage_1()

    # ------------------------------------------------------------ structure
    @property
    def plan(self):
        return self.schedule.plan

    @property
    def estimator(self):
        return self.schedule.estimator

    @property
    def ft_state(self) -> dict[str, Any]:
        return self.schedule.state

    def stage_at(self, step: int) -> int:
        return self.plan.stage_at(step)

    def _estimator_loss_fn(self):
        if self.compute_loss_func is None:
            return None
        func = self.compute_loss_func

        def loss_fn(outputs, batch):
            return func(outputs, batch.get("labels"), num_items_in_batch=None)

        return loss_fn

    def _train_size(self) -> Optional[int]:
        """Distinct training samples: len(train_dataset), or of its `base` (an iteration view of a dataset)."""
        ds = self.train_dataset
        base = getattr(ds, "base", None)
        for d in (base, ds):
            if d is not None and hasattr(d, "__len__"):
                try:
                    return len(d)
                except TypeError:
                    continue
        return None

    def _prior_num_samples_or_none(self, options: dict) -> Optional[int]:
        n = getattr(self.args, "prior_num_samples", None)
        if n is None:
            n = self._train_size()
        if n is None and options.get("selection", "fisher") is not None:
            from .schedule import fishertune_config

            cfg = fishertune_config(self.model)
            if cfg is not None and cfg.prior_pull and cfg.data_scale is None:
                raise ValueError(
                    "FisherTuneTrainer: the training set's size N is unknown (no train_dataset, or one without len), "
                    "and stage 3's prior pull (γ/N)·τ⁻²·‖δ‖²/2 needs it: set "
                    "FisherTuneTrainingArguments.prior_num_samples, or FisherTuneConfig.data_scale, or prior_pull=False")
        if n is not None:
            logger.info("prior pull: κ = γ/(N·τ²) with N = %d training samples", n)
        return n

    def _prior_num_samples(self) -> Optional[int]:
        """N of Eq. 7's summed likelihood (the training loss is a mean over samples, so the pull carries γ/N)."""
        return self.schedule.num_samples

    def _check_stage_1(self) -> None:
        late = {id(p) for p in self.schedule.late_parameters()}
        trains = [n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in late]
        if self.args.stage1_steps > 0 and not trains:
            raise ValueError(
                f"stage1_steps={self.args.stage1_steps}: stage 1 trains what is trainable outside the FisherTune layers "
                "(FisherTuneConfig.modules_to_save, e.g. ['classifier']), and this model has nothing there; set "
                "stage1_steps=0 or name the modules to train in modules_to_save")

    # ------------------------------------------------------------ optimizer
    def fishertune_param_groups(self, params: list[nn.Parameter]) -> list[dict]:
        """Optimizer groups for `params` (each group has a "name"): "model/decay" and "model/no_decay" (Trainer's
        weight-decay rule) and "fishertune" (the FisherTune values: lr `fishertune_lr`, no weight decay: the prior
        pull is their regularizer). Empty groups are kept, so late parameters can join them. Subclasses regroup."""
        a = self.args
        late = {id(p) for p in self.schedule.late_parameters()}
        decay_names = set(self.get_decay_parameter_names(self.model))
        wanted = {id(p) for p in params}
        decay, no_decay, ft = [], [], []
        for n, p in self.model.named_parameters():
            if id(p) not in wanted:
                continue
            (ft if id(p) in late else decay if n in decay_names else no_decay).append(p)
        ft_lr = a.fishertune_lr if getattr(a, "fishertune_lr", None) is not None else a.learning_rate
        return [{"name": "model/decay", "params": decay, "weight_decay": a.weight_decay, "lr": a.learning_rate},
                {"name": "model/no_decay", "params": no_decay, "weight_decay": 0.0, "lr": a.learning_rate},
                {"name": FISHERTUNE_GROUP, "params": ft, "weight_decay": 0.0, "lr": ft_lr}]

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            if self.schedule.activated:  # resumed after the late parameters started: they are in the saved state
                have = {id(p) for p in params}
                params += [p for p in self.schedule.late_parameters() if id(p) not in have]
            groups = self.fishertune_param_groups(params)
            optim_cls, optim_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
            optim_kwargs.pop("lr", None)
            self.optimizer = optim_cls(groups, lr=self.args.learning_rate, **optim_kwargs)
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
        for g in self.fishertune_param_groups(new):
            if not g["params"]:
                continue
            if g["name"] not in groups:
                raise ValueError(
                    f"the optimizer has no param group named {g['name']!r} for parameters that start training at "
                    f"step {self.state.global_step}; let FisherTuneTrainer create the optimizer (it keeps that group, "
                    "empty until stage 3) or give yours such a group")
            groups[g["name"]]["params"].extend(g["params"])

    def _apply_change(self, change: StepChange) -> None:
        if change.replaced and self.optimizer is not None:
            swap_parameters(self._inner_optimizer(), [o for o, _ in change.replaced], [n for _, n in change.replaced])
        if change.added and self.optimizer is not None:
            self._append_late_params(change.added)
        if change.added or change.replaced or change.selection is not None:
            self.late_params = self.schedule.trainable_late_parameters()
            self._nothing_trains = None

    # ---------------------------------------------------------- the stages
    def _enter_step(self, step: int) -> None:
        """Make the model and optimizer match the plan's phase at `step` (once per optimizer step)."""
        before = self.schedule._late_on
        change = self.schedule.before_step(step)
        if self.schedule._late_on != before:
            self.late_params = self.schedule.trainable_late_parameters()
            self._nothing_trains = None
        self._apply_change(change)
        if change.selection is not None:
            self._on_selection(change.selection)

    def _on_selection(self, sel) -> None:
        self._write_selection_digest(sel.summary, sel.number)
        s = sel.summary
        msg = (f"stage 3: selected {s.num_candidates:,} candidates of {s.num_targeted:,} targeted "
               f"({s.scope}; {sel.info}); {s.num_active:,} active"
               + (f" (selection {sel.number}, step {self.state.global_step})" if sel.number > 1 else ""))
        logger.info(msg)
        if self.is_world_process_zero():
            print(msg, flush=True)

    def _write_selection_digest(self, summary, number: int) -> None:
        """`selection_rank{r}.json`: a hash of the ranked candidate lists, so ranks can be compared."""
        from .schedule import fishertune_layers

        digest = hashlib.sha256()
        for m in fishertune_layers(self.model):
            for a in sorted(m.ft_indices.keys()):
                digest.update(m.ft_indices[a].detach().cpu().numpy().tobytes())
                digest.update(m.ft_rank[a].detach().cpu().numpy().tobytes())
        os.makedirs(self.args.output_dir, exist_ok=True)
        path = os.path.join(self.args.output_dir, f"selection_rank{self.args.process_index}.json")
        checkpointing.atomic_write_json(path, {
            "sha256": digest.hexdigest(), "num_candidates": summary.num_candidates,
            "num_targeted": summary.num_targeted, "step": self.state.global_step, "selections": number})

    # ------------------------------------------------------------ training
    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        scaled = getattr(self, "loss_is_scaled_for_ga", None)  # transformers >= 5.2x; older: the rule below
        if scaled is not None:
            return bool(scaled)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self.schedule.state["selections"] > 0 and model.training:  # after a selection: Eq. 7's prior pull
            pull = self.schedule.prior_pull()
            if self._loss_scaled_for_ga(num_items_in_batch):  # the micro-batch losses are summed, not averaged
                pull = pull / self.current_gradient_accumulation_steps
            if return_outputs:
                return out[0] + pull.to(out[0].device), out[1]
            return out + pull.to(out.device)
        return out

    def _trains_nothing(self) -> bool:
        if self._nothing_trains is None:
            self._nothing_trains = not any(p.requires_grad for p in self.model.parameters())
        return self._nothing_trains

    def _deltas_resident(self) -> bool:
        """Whether steps write the deltas into the weights once (`deltas_in_weights`; off under torch_compile)."""
        return getattr(self.args, "deltas_in_weights", True) and not self.args.torch_compile

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step
        self._enter_step(step)
        if self._trains_nothing():  # e.g. stage 2 of a model without a head: the estimate is all that happens
            model.train()
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = self.compute_loss(model, self._prepare_inputs(inputs), num_items_in_batch=num_items_in_batch)
            if self.args.n_gpu > 1:
                loss = loss.mean()
            if not self._loss_scaled_for_ga(num_items_in_batch):
                loss = loss / self.current_gradient_accumulation_steps
            loss = loss.detach()
        else:
            with deltas_in_weights(model, enabled=self._deltas_resident()):
                loss = super().training_step(model, inputs, num_items_in_batch)
        if self.schedule.estimator is not None and self.plan.at(step).estimating:
            self.schedule.estimate(self._prepare_inputs(inputs), step, context=self.compute_loss_context_manager())
        if self.accelerator.sync_gradients and self.accelerator.num_processes > 1 and self.late_params:
            self._all_reduce_late_grads()
        self._step_lrs = self._group_learning_rates()  # what this step's optimizer step uses (the scheduler moves after)
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
        output_dir, and a checkpoint from a run with another stage plan is refused, naming what differs."""
        out = self.args.output_dir
        path = checkpointing.resolve_resume(resume_from_checkpoint, out)
        if path is not None:
            self._check_compatible(path)
        if self.args.should_save:
            note = checkpointing.existing_run_note(out, path)
            if note:
                print(f"warning: {note}", flush=True)
            checkpointing.remove_stale_staging(out)
            self._write_run_files(out)
        # each step reuses the base values at the active entries that the last step read (sparse_delta.py); dropped
        # when train() returns
        with kept_base_values(self.model) if self._deltas_resident() else nullcontext():
            return super().train(resume_from_checkpoint=path, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
                                 **kwargs)

    def _write_run_files(self, output_dir: str) -> None:
        """Files written into output_dir when training starts (subclasses: the configuration as run)."""

    # --------------------------------------------------------- checkpoints
    def _run_identity(self) -> dict[str, Any]:
        """What a checkpoint must share with this run to be resumed (saved as fishertune_run.json)."""
        return {"method": "fishertune", "plan": asdict(self.plan)}

    def _identity_differences(self, saved: dict[str, Any], mine: dict[str, Any]) -> list[str]:
        return checkpointing.config_differences(
            {"method.name": saved.get("method"), "plan": saved.get("plan")},
            {"method.name": mine.get("method"), "plan": mine.get("plan")})

    def _check_compatible(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, checkpointing.RUN_CONFIG)
        if not os.path.isfile(path):
            raise self.checkpoint_error(
                f"{checkpoint} has no {checkpointing.RUN_CONFIG}: it was not written by FisherTuneTrainer")
        with open(path) as f:
            saved = json.load(f)
        diffs = self._identity_differences(saved, self._run_identity())
        if diffs:
            raise self.checkpoint_error(
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
            checkpointing.write_marker(staging, {"step": self.state.global_step,
                                                 "method": self._run_identity().get("method"),
                                                 "world_size": self.args.world_size})

    def _rotate(self, run_dir: str) -> None:
        if self.args.should_save:
            checkpointing.rotate(run_dir, self.args.save_total_limit, keep=self.state.best_model_checkpoint)

    def _fishertune_state(self) -> dict[str, Any]:
        return {"method": self._run_identity().get("method"), **self.schedule.state_dict()}

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, STATE_FILE.format(rank=self.args.process_index))
        if not os.path.isfile(path):
            raise self.checkpoint_error(
                f"{path} is missing: {resume_from_checkpoint} was not written by FisherTuneTrainer "
                "(or by a run with another number of processes)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        method = self._run_identity().get("method")
        if state.get("method", method) != method:
            raise self.checkpoint_error(
                f"cannot resume from {resume_from_checkpoint}: method.name is {state['method']!r} there, "
                f"{method!r} in this run")
        state = dict(state)
        state.pop("plan", None)  # compared by _check_compatible, with the run's own wording
        self.schedule.load_state_dict(state)
        self.late_params, self._nothing_trains = [], None

    # -------------------------------------------------------------- logging
    def _group_learning_rates(self) -> dict[str, float]:
        """`lr_<group>` for each named param group family (model, fishertune; backbone, decoder, ...)."""
        out: dict[str, float] = {}
        opt = self.optimizer
        if opt is None:
            return out
        for g in self._inner_optimizer().param_groups:
            name = g.get("name")
            if isinstance(name, str):
                out.setdefault(f"lr_{name.split('/')[0]}", float(g["lr"]))
        return out

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        step = self.state.global_step
        logs = dict(logs)
        logs.setdefault("stage", self.plan.stage_at(max(step - 1, 0)))  # the step that just finished
        if self.schedule.state.get("fraction") is not None:
            logs.setdefault("delta", round(self.schedule.state["fraction"], 6))
        if "loss" in logs:
            for k, v in getattr(self, "_step_lrs", {}).items():
                logs.setdefault(k, v)
        super().log(logs, *args, **kwargs)
