"""The trainer's log callback: stage / δ / loss / lr on the progress bar, and a CSV copy of the logs."""

from __future__ import annotations

import csv
import io
import logging
import os
from typing import Any, Optional

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from . import checkpointing

logger = logging.getLogger(__name__)


class StageLogCallback(TrainerCallback):
    """Shows stage/δ/loss/lr on the progress bar and keeps a CSV copy of the logs (`csv_log`).

    The CSV is rewritten whole (to a temporary name, then renamed) at every log, with the union of all columns
    seen, so new columns (an evaluation's metrics) never break it. A resumed run keeps the rows up to its
    checkpoint's step; a fresh run starts a new file. A failure to write it is logged once and never stops training.
    """

    FIRST = ["step", "stage", "delta", "loss", "learning_rate", "grad_norm", "epoch"]

    def __init__(self, plan, csv_log: Optional[str]):
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
