"""mean_iou_fast: the `evaluate` mean_iou metric computed with a bincount confusion matrix.

Offline use: ``evaluate.load("<path to this file>")``. Same inputs and outputs as
evaluate's ``mean_iou`` (num_labels, ignore_index, nan_to_num, label_map, reduce_labels).
For streaming evaluation without storing every mask, use
``peft_fishertune.metrics.MeanIoU`` directly.
"""

import datasets
import evaluate

from peft_fishertune.metrics import mean_iou

_DESCRIPTION = "Mean IoU (evaluate's mean_iou formula) via a bincount confusion matrix."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of 2D integer arrays (predicted class maps).
    references: list of 2D integer arrays (ground truth, ignore_index = not counted).
    num_labels (int), ignore_index (int), nan_to_num (float, optional),
    label_map (dict, optional), reduce_labels (bool, default False).
Returns: mean_iou, mean_accuracy, overall_accuracy, per_category_iou, per_category_accuracy.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoUFast(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                }
            ),
        )

    def _compute(
        self, predictions, references, num_labels, ignore_index, nan_to_num=None, label_map=None, reduce_labels=False
    ):
        return mean_iou(
            predictions,
            references,
            num_labels=num_labels,
            ignore_index=ignore_index,
            nan_to_num=nan_to_num,
            label_map=label_map,
            reduce_labels=reduce_labels,
        )
