"""Inference and evaluation: whole-image / sliding-window prediction (`sliding.py`), per-domain mIoU tables
(`evaluation.py`), and loading a trained run's model for either (`trained_model.py`)."""

from .evaluation import DomainResult, EvaluationTable, evaluate_domains, evaluation_table, format_table
from .sliding import inference, slide_inference, whole_inference, window_grid
from .trained_model import add_model_arguments, load_for_inference, load_for_inference_or_exit

__all__ = [
    "DomainResult",
    "EvaluationTable",
    "add_model_arguments",
    "evaluate_domains",
    "evaluation_table",
    "format_table",
    "inference",
    "load_for_inference",
    "load_for_inference_or_exit",
    "slide_inference",
    "whole_inference",
    "window_grid",
]
