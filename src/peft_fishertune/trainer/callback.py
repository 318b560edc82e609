"""`FisherTuneCallback`: FisherTune's stages with a plain `transformers.Trainer` (no subclass).

    schedule = FisherTuneSchedule(model, stage1_steps=2, stage2_steps=2, stage3_steps=4, num_samples=len(train))
    trainer = Trainer(model=model, args=TrainingArguments(..., max_steps=schedule.total_steps),
                      train_dataset=train, callbacks=[FisherTuneCallback(schedule)])

A TrainerCallback never sees the batch, and Trainer's `compute_loss_func` takes the labels out of it (the estimator
needs them to run the model's own loss), so the callback reaches the batch and the loss through two hooks on the
model, installed when training starts and removed when it ends:
- a forward pre-hook keeps the inputs of each training forward (the estimator takes them after the backward, at
  `on_pre_optimizer_step`, in stage 2);
- a forward hook adds Eq. 7's prior pull (scaled by N) to `outputs.loss` once the selection is made, so the pull is
  in the loss Trainer backpropagates, clips and logs.
At each step's start it applies the schedule (`before_step`) and puts the new FisherTune values into the
optimizer's param group `group` (default: the last one, Trainer's no-weight-decay group, at `learning_rate`).
`FisherTuneTrainer` does the same without hooks (and appends late parameters across processes; use it under DDP).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from .schedule import FisherTuneSchedule


class FisherTuneCallback(TrainerCallback):
    def __init__(self, schedule: FisherTuneSchedule, group: Any = -1):
        self.schedule, self.group = schedule, group
        self._handles: list = []
        self._batches: list = []
        self._inside = False  # the estimator's own forwards are not training batches
        self._ga = 1

    def on_train_begin(self, args, state, control, **kwargs):
        if args.max_steps != self.schedule.total_steps:
            raise ValueError(f"TrainingArguments.max_steps={args.max_steps} does not equal the schedule's "
                             f"stage1 + stage2 + stage3 = {self.schedule.total_steps} steps")
        self._ga = args.gradient_accumulation_steps
        model = self.schedule.model
        self._handles = [model.register_forward_pre_hook(self._keep_batch, with_kwargs=True),
                         model.register_forward_hook(self._add_pull, with_kwargs=True)]

    def on_train_end(self, args, state, control, **kwargs):
        for h in self._handles:
            h.remove()
        self._handles = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.schedule.before_step(state.global_step).apply(optimizer, group=self.group)
        self._batches = []

    def _keep_batch(self, module, args, kwargs):
        if module.training and not self._inside and self.schedule.phase(self.schedule._entered_step or 0).estimating:
            self._batches.append({k: v for k, v in kwargs.items() if k != "num_items_in_batch"})

    def _add_pull(self, module, args, kwargs, output):
        if not module.training or self._inside or self.schedule.state["selections"] == 0:
            return output
        loss = getattr(output, "loss", None)
        if loss is None:
            return output
        pull = self.schedule.prior_pull().to(loss.device)
        if kwargs.get("num_items_in_batch") is not None:  # a summed loss over the accumulated micro-batches
            pull = pull / self._ga
        output.loss = loss + pull
        return output

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        batches, self._batches = self._batches, []
        self._inside = True
        try:
            for b in batches:
                self.schedule.estimate(b, state.global_step)
        finally:
            self._inside = False
