"""Inference and evaluation: whole-image / sliding-window prediction (`sliding.py`), test-time augmentation
(`tta.py`), per-domain mIoU / aAcc / mAcc / per-class tables (`evaluation.py`), the published test protocols
(`protocols.py`) and pictures of predictions (`pictures.py`). Loading a trained run's model for them is the
experiment's (`training.trained_run`)."""

from .evaluation import DomainResult, EvaluationTable, evaluate_domains, evaluation_table, format_table
from .pictures import domain_pictures, log_pictures, write_domain_pictures
from .protocols import PROTOCOLS, EvalDataset, ProtocolSetting, ProtocolTransform, resolve_protocol
from .sliding import inference, slide_inference, whole_inference, window_grid
from .tta import TTA, tta_inference

__all__ = [
    "DomainResult",
    "EvalDataset",
    "EvaluationTable",
    "PROTOCOLS",
    "ProtocolSetting",
    "ProtocolTransform",
    "TTA",
    "domain_pictures",
    "evaluate_domains",
    "evaluation_table",
    "format_table",
    "inference",
    "log_pictures",
    "resolve_protocol",
    "slide_inference",
    "tta_inference",
    "whole_inference",
    "window_grid",
    "write_domain_pictures",
]
