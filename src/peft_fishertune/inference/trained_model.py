"""Load a trained model for evaluation / prediction: a merged or base model directory, or a training config,
optionally with a saved FisherTune (or LoRA) adapter on top."""

from __future__ import annotations

import os
from typing import Optional


def add_model_arguments(parser) -> None:
    """--model / --config / --adapter, shared by scripts/evaluate.py and scripts/predict.py."""
    parser.add_argument("--model", help="a SegmentationModel directory (base or merged), e.g. <output_dir>/base_model")
    parser.add_argument("--config", help="the training YAML (builds the base model as in training)")
    parser.add_argument("--adapter", help="a saved adapter directory (<output_dir>/adapter)")


def load_for_inference_or_exit(args):
    """For scripts: the model named by --model/--config/--adapter, or None after printing the error."""
    import sys

    try:
        return load_for_inference(args.model, args.config, args.adapter)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def load_for_inference(model_dir: Optional[str] = None, config: Optional[str] = None, adapter: Optional[str] = None,
                       merge: bool = True):
    """model_dir: written by `SegmentationModel.save_pretrained` (e.g. `<output_dir>/base_model` of a run with a
    random-init backbone, or a merged model). config: the training YAML (the base model is built as in training,
    e.g. from the hub checkpoint). adapter: `<output_dir>/adapter`. Returns the model in eval mode."""
    from peft import PeftModel

    import peft_fishertune  # noqa: F401  (registers FISHERTUNE with PEFT)

    from ..models import SegmentationModel
    from ..training.config import load_config
    from ..training.experiment import build_base_model

    if (model_dir is None) == (config is None):
        raise ValueError("give exactly one of --model (a SegmentationModel directory) or --config (a training YAML)")
    if model_dir is not None:
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"--model {model_dir!r} is not a directory")
        model = SegmentationModel.from_pretrained(model_dir)
    else:
        model = build_base_model(load_config(config, check_paths=False))
    if adapter is not None:
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise FileNotFoundError(f"--adapter {adapter!r} holds no adapter_config.json")
        model = PeftModel.from_pretrained(model, adapter)
        if merge and getattr(model.base_model, "mergeable", True):  # Rein: no weight delta to merge
            model = model.merge_and_unload()
    return model.eval()
