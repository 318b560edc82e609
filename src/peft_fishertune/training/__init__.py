"""Training: the staged `FisherTuneTrainer` and experiment configs (evaluation lives in `peft_fishertune.inference`)."""

from .config import METHODS, ConfigError, ExperimentConfig, load_config, parse_overrides
from .experiment import ExperimentResult, build_model, run_experiment
from .trainer import FisherTuneTrainer, FisherTuneTrainingArguments

__all__ = [
    "METHODS",
    "ConfigError",
    "ExperimentConfig",
    "ExperimentResult",
    "FisherTuneTrainer",
    "FisherTuneTrainingArguments",
    "build_model",
    "load_config",
    "parse_overrides",
    "run_experiment",
]
