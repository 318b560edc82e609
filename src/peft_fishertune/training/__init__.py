"""The segmentation experiment: configs, the method table and `SegmentationTrainer` (built on the generic
`peft_fishertune.trainer.FisherTuneTrainer`; evaluation lives in `peft_fishertune.inference`)."""

from .config import METHODS, ConfigError, ExperimentConfig, load_config, parse_overrides
from .experiment import ExperimentResult, build_model, run_experiment
from .trainer import FisherTuneTrainingArguments, SegmentationTrainer, SegmentationTrainingArguments

__all__ = [
    "METHODS",
    "ConfigError",
    "ExperimentConfig",
    "ExperimentResult",
    "FisherTuneTrainingArguments",
    "SegmentationTrainer",
    "SegmentationTrainingArguments",
    "build_model",
    "load_config",
    "parse_overrides",
    "run_experiment",
]
