"""What `finish_run` makes of the final evaluation: the printed final table, `results.{md,csv,json}` written by
`EvaluationTable.write` (the same files `scripts/evaluate.py --output-dir` writes), the model-selection summary, and
the pictures of predictions (`<output_dir>/pictures/<domain>.png`, and TensorBoard when the run reports there).

results.md: the summary (mIoU / aAcc / mAcc x domain, `avg` = the mean over the target domains, its definition and
the protocol), then the class x domain IoU and Acc tables, all in percent. results.csv: `metric,class,<domain>...,avg`.
results.json: the run's summary (`ExperimentResult`: table, settings, selection counts, model selection, pictures,
warnings) and `evaluation` (`EvaluationTable.to_dict()`: per domain mIoU, aAcc, mAcc, per-class IoU and Acc).
"""

from __future__ import annotations

import math
import os
from typing import Optional

from ..trainer import checkpointing


def final_title(method: str, protocol: str) -> str:
    return f"final evaluation, mIoU / aAcc / mAcc (%): {method}, protocol {protocol}"


def target_miou(table) -> dict[str, float]:
    """{domain: mIoU %} of the target domains and their aggregates (e.g. acdc-all), without the model-selection
    set: what `ExperimentResult.table` holds."""
    return {d.name: d.miou for d in table.domains if d.role == "target"} if table is not None else {}


def model_selection_summary(trainer, table) -> Optional[dict]:
    """The model-selection set's final metrics and what `metric_for_best_model` chose (None when neither)."""
    args, state = trainer.args, trainer.state
    rows = table.selection if table is not None else []
    if not rows and args.metric_for_best_model is None:
        return None
    out: dict = {}
    if rows:
        d = rows[0]
        out.update(domain=d.name, images=d.num_images, mIoU=d.miou, aAcc=d.aacc, mAcc=d.macc)
    if args.metric_for_best_model is not None:
        metric = args.metric_for_best_model
        metric = metric if metric.startswith("eval_") else f"eval_{metric}"
        out.update(metric=metric, best_metric=state.best_metric, best_step=state.best_global_step,
                   best_checkpoint=state.best_model_checkpoint, loaded_at_end=bool(args.load_best_model_at_end),
                   ranks_on="selection" if metric.startswith("eval_selection") else "target domains (test-set selection)")
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def describe_model_selection(info: Optional[dict]) -> Optional[str]:
    """One line for the log, e.g. `model selection: best eval_selection_mIoU 41.20 at step 600 (checkpoint-600)`."""
    if not info or "metric" not in info:
        return None
    if info.get("best_step") is None:
        return f"model selection: {info['metric']} never improved: no best checkpoint"
    where = os.path.basename(info["best_checkpoint"]) if info.get("best_checkpoint") else "not saved"
    line = (f"model selection: best {info['metric']} {info['best_metric']:.2f} at step {info['best_step']} "
            f"({where}), ranked on {info['ranks_on']}")
    if not info["loaded_at_end"]:
        line += "; the saved adapter / model is the last step's (load_best_model_at_end: false)"
    return line


def write_results(out: str, table, title: str, summary: dict) -> None:
    """results.md / .csv / .json through `EvaluationTable.write` (json: `summary`'s keys, then `evaluation`);
    without a table, results.json holds the summary alone."""
    if table is None:
        checkpointing.atomic_write_json(os.path.join(out, "results.json"), summary)
        return
    table.write(out, title=title, json_extra=summary)


def tensorboard_dir(trainer) -> Optional[str]:
    """The run's TensorBoard log directory when it reports to TensorBoard (the callback's, kept after training)."""
    report = trainer.args.report_to or []
    if "tensorboard" not in report and "all" not in report:
        return None
    for cb in trainer.callback_handler.callbacks:
        if type(cb).__name__ == "TensorBoardCallback":
            writer = getattr(cb, "tb_writer", None)
            return getattr(cb, "logging_dir", None) or getattr(writer, "log_dir", None)
    return None


def write_pictures(trainer, model, out: str) -> dict[str, str]:
    """A PNG per target domain in `<out>/pictures/` (`training.pictures_per_domain` images x {input, ground truth,
    prediction, error map}, predicted as the evaluation predicts), also logged to TensorBoard when the run reports
    there. Returns {domain: path}; {} when pictures_per_domain is 0."""
    from ..inference.pictures import write_domain_pictures

    n = trainer.args.pictures_per_domain
    targets = {k: ds for k, ds in trainer.eval_domains.items() if k not in trainer.selection_domains}
    if n <= 0 or not targets:
        return {}
    return write_domain_pictures(model, targets, os.path.join(out, "pictures"), tensorboard=tensorboard_dir(trainer),
                                 step=trainer.state.global_step, protocol=trainer.protocol, num_images=n,
                                 num_labels=trainer.num_labels, mode=trainer.eval_mode, window=trainer.window,
                                 stride=trainer.stride, tta=trainer.tta)
