"""`SegmentationTrainer`: the segmentation experiment on top of the generic `FisherTuneTrainer`.

The staged schedule (estimator, selection, δ(t), prior pull, late parameters, checkpoints, exact resume,
alternating execution) is `peft_fishertune.trainer.FisherTuneTrainer`'s. This subclass adds what only our
segmentation runner needs:

- *The method table* (training/methods.py): FisherTune or a baseline; the row says what trains late (the selected
  values; the backbone or an adapter for LoRA / full fine-tuning from stage 2; Rein from stage 1; nothing for
  `freeze`) and where the selection comes from (Fisher scores, random or magnitude scores).
- *Backbone freezing*: stage 1 trains the decoder only (the whole backbone starts frozen, whatever the method).
- *Two learning rates* (backbone / decoder param groups of the segmentation model, METHOD.md defaults).
- *Evaluation*: `evaluate()` computes per-domain mIoU / aAcc / mAcc and per-class IoU (sliding window or whole
  image, with the protocol's test-time augmentation) on several target datasets and the model-selection set, keeps
  it as an `EvaluationTable` (`last_eval`) and prints it, instead of the prediction loop's logits gathering; it
  also runs periodically (`eval_strategy="steps"`), where `metric_for_best_model: selection_mIoU` ranks on the
  model-selection set.
- *The run's files*: `config.yaml` (the configuration as run, compared on resume) and `log.csv`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from torch import nn
from transformers.trainer_utils import SaveStrategy, SchedulerType

from ..trainer import checkpointing
from ..trainer.trainer import FisherTuneTrainer as _GenericTrainer
from ..trainer.trainer import FisherTuneTrainingArguments as _GenericArguments
from .config.errors import ConfigError
from .methods import Method, get_method, segmentor_of


class ResumeError(ConfigError, checkpointing.CheckpointError):
    """A checkpoint the segmentation runner cannot resume (a ConfigError, so scripts report it as one)."""


@dataclass
class SegmentationTrainingArguments(_GenericArguments):
    """FisherTuneTrainingArguments with the segmentation run's defaults: the paper's stage lengths, two learning
    rates (METHOD.md), its poly schedule, one save at the end, the segmentation batch's columns kept, TensorBoard."""

    stage1_steps: int = field(default=10_000, metadata={"help": "T1: decoder warm-up (backbone frozen)."})
    stage2_steps: int = field(default=2_000, metadata={"help": "T2: DR-FIM estimation (decoder keeps training)."})
    stage3_steps: int = field(default=28_000, metadata={"help": "T3: sparse fine-tuning with growing selection."})
    backbone_lr: float = field(default=1e-5, metadata={"help": "lr of the selected backbone elements."})
    decoder_lr: float = field(default=1e-4, metadata={"help": "lr of the decoder (also `learning_rate`)."})
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
    pictures_per_domain: int = field(default=4, metadata={
        "help": "At the end of the run, a PNG per target domain in <output_dir>/pictures/ (and TensorBoard) of this "
                "many images x {input, ground truth, prediction, error map}; 0: no pictures."})

    def __post_init__(self):
        if not isinstance(self.pictures_per_domain, int) or self.pictures_per_domain < 0:
            raise ValueError(f"pictures_per_domain={self.pictures_per_domain!r}: expected an integer >= 0 (0: no "
                             "pictures)")
        if self.fishertune_lr is not None and self.fishertune_lr != self.backbone_lr:
            raise ValueError(f"fishertune_lr={self.fishertune_lr!r}: a segmentation run sets the backbone's lr with "
                             "backbone_lr (and the decoder's with decoder_lr)")
        self.learning_rate = self.decoder_lr
        super().__post_init__()


# the name training/config.py builds the `training:` section with
FisherTuneTrainingArguments = SegmentationTrainingArguments


class SegmentationTrainer(_GenericTrainer):
    """FisherTuneTrainer for a segmentation model wrapped for a method of `METHODS` (FisherTune or a baseline).

    Args (besides Trainer's):
        method: a `Method` or its name (see training/methods.py).
        estimator_factory: () -> a Fisher estimator (peft_fishertune.fisher); required when the method estimates.
        eval_domains: {display name: torch Dataset of EvalTransform samples} evaluated by `evaluate()` (also handed
            to Trainer as `eval_dataset`, so `eval_strategy="steps"` evaluates them periodically).
        eval_mode, window, stride, tta, num_labels: evaluation protocol (sliding window by default, no TTA).
        protocol: the protocol's description every table carries (default: made from eval_mode / window / stride).
        selection_domains: names among eval_domains that form the model-selection set (logged as
            `eval_selection_mIoU` etc., kept out of the target mean `eval_mIoU`).
        selection_update_steps: recompute δ(t) every this many tuning steps (and on the last); None: the default,
            every max(1, tuning steps // 1000).
        random_seed: seed of the random-selection baseline's scores.
        csv_log: path of a CSV copy of the logs (rewritten whole at each log, never failing the run).
        run_config: the configuration as run (a nested dict); written to `config.yaml` when training starts, saved in
            every checkpoint and compared on resume.
    """

    checkpoint_error = ResumeError

    def __init__(self, *args, method: Union[str, Method] = "fishertune", estimator_factory=None, eval_domains=None,
                 eval_mode: str = "slide", window=(512, 512), stride=(341, 341), num_labels: int = 19,
                 selection_update_steps: Optional[int] = None, random_seed: int = 0, csv_log: Optional[str] = None,
                 run_config: Optional[dict] = None, tta=None, protocol: Optional[str] = None,
                 selection_domains=(), **kwargs):
        self.method = get_method(method) if isinstance(method, str) else method
        self.eval_domains = dict(eval_domains or {})
        self.selection_domains = list(selection_domains)
        missing = [n for n in self.selection_domains if n not in self.eval_domains]
        if missing:
            raise ValueError(f"selection_domains {missing} are not among the evaluation domains {list(self.eval_domains)}")
        if self.selection_domains and len(self.selection_domains) == len(self.eval_domains):
            raise ValueError("every evaluation domain is a model-selection domain: there is no target to report")
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        strategy = getattr(targs, "eval_strategy", "no")
        if str(getattr(strategy, "value", strategy)) != "no" and not self.eval_domains and kwargs.get("eval_dataset") is None:
            raise ValueError(f"eval_strategy={getattr(strategy, 'value', strategy)!r} evaluates periodically, but there "
                             "are no evaluation domains (data.eval is empty): add target datasets or set eval_strategy "
                             "to 'no'")
        if self.eval_domains and kwargs.get("eval_dataset") is None:
            kwargs["eval_dataset"] = self.eval_domains  # lets Trainer accept eval_strategy="steps"; evaluate() reads it
        if self.method.estimator and estimator_factory is None:
            raise ValueError(f"method {self.method.name!r} estimates Fisher scores: pass estimator_factory")
        m = self.method
        if targs is not None and getattr(targs, "selection_update_steps", None) not in (None, selection_update_steps):
            raise ValueError(f"training.selection_update_steps={targs.selection_update_steps!r}: a segmentation run "
                             "sets it as method.selection_update_steps")
        options = dict(selection=m.selection, estimates=m.estimator, late_from_stage=m.backbone_from_stage,
                       late_parameters=m.backbone_parameters, random_seed=random_seed,
                       scores_fn=getattr(m, "scores", None), selection_update_steps=selection_update_steps)
        self.eval_mode, self.window, self.stride, self.tta = eval_mode, tuple(window), tuple(stride), tta
        self._protocol = protocol
        self.num_labels = num_labels
        self.selection_update_steps = selection_update_steps
        self.random_seed = random_seed
        self.run_config = run_config
        self.last_eval = None  # EvaluationTable of the latest evaluate()
        super().__init__(*args, estimator_factory=estimator_factory, csv_log=csv_log, schedule_options=options,
                         **kwargs)
        # stage 1 trains the decoder only: the whole backbone starts frozen, whatever the method
        self.segmentor.set_backbone_trainable(False)

    # ------------------------------------------------------------ structure
    @property
    def segmentor(self):
        return segmentor_of(self.model)

    def _check_stage_1(self) -> None:
        """The decoder always trains in stage 1."""

    def fishertune_param_groups(self, params: list[nn.Parameter]) -> list[dict]:
        """Four AdamW groups (backbone/decay, backbone/no_decay, decoder/decay, decoder/no_decay) at the backbone
        and decoder learning rates; empty groups are kept (late parameters join them)."""
        a = self.args
        return self.segmentor.param_groups(a.backbone_lr, a.decoder_lr, a.weight_decay, params=params)

    def _method_params(self) -> list[nn.Parameter]:
        return self.method.backbone_parameters(self.model)

    # ----------------------------------------------------------- run files
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """As FisherTuneTrainer.train; a checkpoint from a run with another method, model or stage plan is refused
        (a `ConfigError` naming what differs)."""
        try:
            checkpointing.resolve_resume(resume_from_checkpoint, self.args.output_dir)
        except checkpointing.CheckpointError as e:
            if isinstance(e, ConfigError):
                raise
            raise ResumeError(str(e)) from None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def _write_run_files(self, output_dir: str) -> None:
        if self.run_config is not None:
            import yaml

            checkpointing.atomic_write_text(os.path.join(output_dir, "config.yaml"),
                                            "# the configuration as run (overrides applied)\n"
                                            + yaml.safe_dump(self.run_config, sort_keys=False))

    def _run_identity(self) -> dict[str, Any]:
        return {"method": self.method.name, "plan": asdict(self.plan), "config": self.run_config}

    def _identity_differences(self, saved: dict[str, Any], mine: dict[str, Any]) -> list[str]:
        diffs = super()._identity_differences(saved, mine)
        if saved.get("config") and mine.get("config"):
            diffs += checkpointing.config_differences(
                {k: saved["config"].get(k) for k in ("model", "method")},
                {k: mine["config"].get(k) for k in ("model", "method")})
        return diffs

    # ----------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Per-domain mIoU / aAcc / mAcc of `eval_dataset` (a {name: dataset} dict; default: the trainer's eval
        domains, the model-selection set included).

        Returns the flat metrics Trainer expects (`{prefix}_{domain}_mIoU` / `_aAcc` / `_mAcc`, `{prefix}_mIoU` =
        the target mean, `{prefix}_selection_mIoU` ... for the model-selection set); the typed per-domain table
        (per-class IoU and Acc too) is `self.last_eval`."""
        from ..inference import evaluate_domains, evaluation_table

        domains = eval_dataset if isinstance(eval_dataset, dict) else self.eval_domains
        if not domains:
            return {}
        results = evaluate_domains(self.model, domains, num_labels=self.num_labels, mode=self.eval_mode,
                                   window=self.window, stride=self.stride, accelerator=self.accelerator, tta=self.tta)
        table = evaluation_table(results, sizes={n: len(d) for n, d in domains.items()},
                                 step=self.state.global_step, protocol=self.protocol,
                                 selection=[n for n in self.selection_domains if n in domains])
        self.last_eval = table
        if self.is_world_process_zero():
            print(table.to_markdown(title=f"step {self.state.global_step}: mIoU / aAcc / mAcc (%)"), flush=True)
        metrics = table.log_metrics(metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    @property
    def protocol(self) -> str:
        """The evaluation protocol as every table names it (the preset's `describe_settings`, or eval_mode /
        window / stride for a trainer built without one)."""
        if self._protocol:
            return self._protocol
        if self.eval_mode == "slide":
            return f"slide window {'x'.join(map(str, self.window))} stride {'x'.join(map(str, self.stride))}"
        return self.eval_mode
