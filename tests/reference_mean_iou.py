"""A faithful local re-implementation of the `evaluate` library's mean_iou metric.

The Hub module (evaluate-metric/mean_iou) is unreachable offline, so the tests and
benchmarks/miou_speed.py compare against this: the same histogram-based formula, and
the same `evaluate.Metric` wrapper (features Sequence(Sequence(uint16))), loadable with
``evaluate.load(<path of this file>)`` to time the library path users actually run.
"""

import datasets
import evaluate
import numpy as np


def reference_mean_iou(results, gt_seg_maps, num_labels, ignore_index, nan_to_num=None, label_map=None,
                       reduce_labels=False):
    """A faithful re-implementation of evaluate's metrics/mean_iou/mean_iou.py (histogram-based)."""
    total_i = np.zeros((num_labels,), dtype=np.float64)
    total_u = np.zeros((num_labels,), dtype=np.float64)
    total_p = np.zeros((num_labels,), dtype=np.float64)
    total_l = np.zeros((num_labels,), dtype=np.float64)
    for pred_label, label in zip(results, gt_seg_maps):
        if label_map is not None:
            for old_id, new_id in label_map.items():
                label[label == old_id] = new_id
        pred_label = np.array(pred_label)
        label = np.array(label)
        if reduce_labels:
            label[label == 0] = 255
            label = label - 1
            label[label == 254] = 255
        mask = label != ignore_index
        mask = np.not_equal(label, ignore_index)
        pred_label = pred_label[mask]
        label = np.array(label)[mask]
        intersect = pred_label[pred_label == label]
        area_intersect = np.histogram(intersect, bins=num_labels, range=(0, num_labels - 1))[0]
        area_pred_label = np.histogram(pred_label, bins=num_labels, range=(0, num_labels - 1))[0]
        area_label = np.histogram(label, bins=num_labels, range=(0, num_labels - 1))[0]
        area_union = area_pred_label + area_label - area_intersect
        total_i += area_intersect
        total_u += area_union
        total_p += area_pred_label
        total_l += area_label
    all_acc = total_i.sum() / total_l.sum()
    iou = total_i / total_u
    acc = total_i / total_l
    metrics = {
        "mean_iou": np.nanmean(iou),
        "mean_accuracy": np.nanmean(acc),
        "overall_accuracy": all_acc,
        "per_category_iou": iou,
        "per_category_accuracy": acc,
    }
    if nan_to_num is not None:
        metrics = {k: np.nan_to_num(v, nan=nan_to_num) for k, v in metrics.items()}
    return metrics


class ReferenceMeanIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="reference mean_iou",
            citation="",
            inputs_description="",
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                }
            ),
        )

    def _compute(self, predictions, references, num_labels, ignore_index, nan_to_num=None, label_map=None,
                 reduce_labels=False):
        return reference_mean_iou(predictions, references, num_labels, ignore_index, nan_to_num, label_map,
                                  reduce_labels)
