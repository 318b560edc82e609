"""Metrics: mIoU from a bincount confusion matrix (`miou.py`), and the same formula as an offline
`evaluate` module (`hf_evaluate/mean_iou_fast.py`, shipped as package data)."""

from .miou import MeanIoU, confusion_matrix, mean_iou, metrics_from_confusion

__all__ = ["MeanIoU", "confusion_matrix", "mean_iou", "metrics_from_confusion"]
