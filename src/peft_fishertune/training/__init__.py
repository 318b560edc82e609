"""Training: the staged `FisherTuneTrainer`, experiment configs, per-domain evaluation."""

from .config import METHODS, ConfigError, ExperimentConfig, load_config, parse_overrides
from .evaluation import evaluate_domains, format_table
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
    "evaluate_domains",
    "format_table",
    "load_config",
    "parse_overrides",
    "run_experiment",
]
