"""Load a trained run's model for evaluation / prediction: a merged or base model directory, or a training config,
optionally with a saved FisherTune (LoRA, Rein) adapter on top. It reads the experiment's config and rebuilds its
base model, so it lives with the experiment (training/), above `inference/`, which it does not need."""

from __future__ import annotations

import os
from typing import Optional


def add_model_arguments(parser) -> None:
    """--model / --config / --adapter, shared by scripts/evaluate.py and scripts/predict.py."""
    parser.add_argument("--model", help="a SegmentationModel directory (base or merged), e.g. <output_dir>/base_model")
    parser.add_argument("--config", help="the training YAML: the base model is <adapter>/../base_model when the run "
                        "saved one, else built from the config's checkpoint")
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
    random-init backbone, or a merged model). config: the training YAML; the base model is the one the adapter was
    trained on: `base_model/` beside the adapter when the run saved one, else built from the config's checkpoint
    (a random-init `tiny_backbone` without a saved base is refused: rebuilding it would give other weights).
    adapter: `<output_dir>/adapter`. Returns the model in eval mode."""
    from peft import PeftModel

    import peft_fishertune  # noqa: F401  (registers FISHERTUNE with PEFT)

    from ..models import SegmentationModel

    if (model_dir is None) == (config is None):
        raise ValueError("give exactly one of --model (a SegmentationModel directory) or --config (a training YAML)")
    if adapter is not None and not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise FileNotFoundError(f"--adapter {adapter!r} holds no adapter_config.json")
    if model_dir is not None:
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"--model {model_dir!r} is not a directory")
        model = SegmentationModel.from_pretrained(model_dir)
    else:
        model = base_model_for(config, adapter)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
        if merge and getattr(model.base_model, "mergeable", True):  # Rein: no weight delta to merge
            model = model.merge_and_unload()
    return model.eval()


def base_model_for(config: str, adapter: Optional[str] = None):
    """The base model a run of `config` trained `adapter` on (see `load_for_inference`)."""
    import sys

    from ..models import SegmentationModel
    from .config import check_model_source, load_config
    from .experiment import build_base_model

    cfg = load_config(config, check_paths=False, training=False)
    saved = os.path.join(os.path.dirname(os.path.abspath(adapter)), "base_model") if adapter is not None else None
    if saved is not None and os.path.isfile(os.path.join(saved, "segmentation_config.json")):
        model = SegmentationModel.from_pretrained(saved)
        built = model.build_config
        for key in ("backbone", "decoder", "num_labels"):
            if built[key] != getattr(cfg.model, key):
                raise ValueError(f"{saved} (the base model saved beside --adapter) has {key}={built[key]!r}, but "
                                 f"--config {config} has model.{key}={getattr(cfg.model, key)!r}: not the run of "
                                 f"this config")
        print(f"base model: {saved} (saved by the run beside the adapter)", file=sys.stderr)
        return model
    if cfg.model.tiny_backbone is not None:
        where = f"beside --adapter ({saved})" if saved else "(no --adapter given)"
        raise ValueError(
            f"--config {config} builds a random-init backbone (model.tiny_backbone): rebuilding it would not give "
            f"the weights the run trained on, and no saved base model was found {where}. Pass --model "
            f"<output_dir>/base_model with --adapter, or --model <output_dir>/model for a full / freeze run, "
            f"instead of --config")
    check_model_source(cfg.model.backbone, cfg.model.model_name_or_path)
    return build_base_model(cfg)
