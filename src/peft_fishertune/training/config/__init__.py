"""Experiment configuration: YAML file(s) with four typed sections, validated before anything is built.

    model:    ModelSection                  what to build (backbone, checkpoint, decoder)           sections.py
    data:     DataSection (+ DatasetEntry)  source and target datasets, transforms, test protocol   sections.py
    method:   MethodSection                 fishertune or a baseline, and the FisherTuneConfig fields sections.py
    training: FisherTuneTrainingArguments   transformers.TrainingArguments plus the stage lengths

Files are read with YAML 1.2 scalars and may start from others (`_base_:`, merged key by key; yaml_io.py);
`--<section>.<key> VALUE` overrides are typed by the field they set (overrides.py); `load_config` builds the
sections (load.py) and `validate` refuses what cannot run (validation.py), raising `ConfigError` naming the key.
"""

from .load import build_training_arguments, load_config
from .overrides import apply_overrides, parse_overrides
from .sections import (
                       METHODS,
                       SECTIONS,
                       SPARSE_METHODS,
                       STAGE_KEYS,
                       ConfigError,
                       DataSection,
                       DatasetEntry,
                       ExperimentConfig,
                       MethodSection,
                       ModelSection,
                       describe_sections,
)
from .validation import check_model_source, validate
from .yaml_io import load_yaml, merge, read_config_file, read_configs

__all__ = ["METHODS", "SECTIONS", "SPARSE_METHODS", "STAGE_KEYS", "ConfigError", "DataSection", "DatasetEntry",
           "ExperimentConfig", "MethodSection", "ModelSection", "apply_overrides", "build_training_arguments",
           "check_model_source", "describe_sections", "load_config", "load_yaml", "merge", "parse_overrides",
           "read_config_file", "read_configs", "validate"]
