"""Inference and evaluation: whole-image / sliding-window prediction (`sliding.py`) and per-domain mIoU tables
(`evaluation.py`). Loading a trained run's model for them is the experiment's (`training.trained_run`)."""

from .evaluation import DomainResult, EvaluationTable, evaluate_domains, evaluation_table, format_table
from .sliding import inference, slide_inference, whole_inference, window_grid

__all__ = [
    "DomainResult",
    "EvaluationTable",
    "evaluate_domains",
    "evaluation_table",
    "format_table",
    "inference",
    "slide_inference",
    "whole_inference",
    "window_grid",
]
