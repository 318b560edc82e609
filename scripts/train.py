#!/usr/bin/env python
"""Train FisherTune (or a baseline) from a YAML config, with dotted command-line overrides.

    accelerate launch scripts/train.py --config configs/demo.yaml
    accelerate launch scripts/train.py --config configs/fishertune_dinov2-l_mask2former_gta2citybddmap_512x512_bs4.yaml \
        --training.output_dir outputs/gta --data.train.root /data/gta5 --data.eval.0.root /data/cityscapes
    python scripts/train.py --config configs/demo.yaml --method.name lora --training.stage3_steps 50

The config has four typed sections (peft_fishertune/training/config.py): model, data, method and training (the
fields of transformers' TrainingArguments plus the three stage lengths and two learning rates). An override
`--<section>.<key> VALUE` is typed by the field it sets (`--training.backbone_lr 1e-5` is a float,
`--training.save_strategy no` a save strategy, `--data.eval.0.root DIR` changes the first evaluation dataset).

The run: warm up the decoder (stage 1), estimate DR-FIM scores (stage 2), select and fine-tune the selected
backbone elements with a growing selection (stage 3); then a per-domain mIoU table and a saved sparse adapter
under training.output_dir. Config errors (exit code 2) are reported before anything is built.
"""

import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser

from peft_fishertune.training import ConfigError, load_config, parse_overrides
from peft_fishertune.training.config import describe_sections
from peft_fishertune.training.experiment import (
    build_base_model,
    build_data,
    build_model,
    build_trainer,
    finish_run,
    num_training_samples,
    save_base_model,
    stage_plan,
    training_arguments,
)


@dataclass
class ScriptArguments:
    """The script's own arguments; everything else is `--<section>.<key> VALUE` on top of the YAML."""

    config: str = field(metadata={"help": "YAML file with model / data / method / training sections."})
    resume_from_checkpoint: Optional[str] = field(
        default=None, metadata={"help": "a checkpoint-N directory of an earlier run with the same config, or `true` "
                                        "for the newest complete checkpoint in training.output_dir."})


def parse_command_line(argv=None) -> tuple[ScriptArguments, dict[str, str]]:
    import argparse

    parser = HfArgumentParser(ScriptArguments, description=__doc__, epilog=describe_sections(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    script, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    return script, parse_overrides(rest)


def main(argv=None) -> int:
    from accelerate.utils import set_seed

    t0 = time.time()
    # 1. config: the YAML's four sections as dataclasses, each override typed by its field, validated before
    #    anything is built (unknown names, wrong types, missing dataset layouts or checkpoints)
    script, overrides = parse_command_line(argv)
    try:
        cfg = load_config(script.config, overrides)
        args = training_arguments(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    # 2. model: the VFM backbone + decoder, then wrapped for the method (FisherTune: every candidate weight of
    #    the backbone's linear layers is a target; nothing is selected yet)
    set_seed(args.seed)
    base = build_base_model(cfg)
    save_base_model(cfg, base, args)  # a random-init backbone is kept beside the adapter
    model, ft_config = build_model(cfg, base)

    # 3. data: an iteration-based training set (one augmented sample per index) and one dataset per target domain
    train_dataset, eval_domains = build_data(cfg, num_training_samples(args), args.seed)

    # 4. trainer: one optimizer and lr schedule over the three stages
    trainer = build_trainer(cfg, model, ft_config, train_dataset, eval_domains, args)

    # 5. stages 1 -> 2 -> 3, switched by the trainer at the step boundaries:
    #    stage 1  decoder warm-up (backbone frozen)
    #    stage 2  the decoder keeps training; the Fisher estimator (DR-FIM) accumulates scores on every batch
    #    stage 3  select by the scores once, then train the decoder + the selected elements, δ(t) growing
    if trainer.is_world_process_zero():
        print("\n".join(stage_plan(args, cfg.method.name)), flush=True)
    try:
        trainer.train(resume_from_checkpoint=script.resume_from_checkpoint)
    except ConfigError as e:  # e.g. a checkpoint of another method / stage plan: named, before any step runs
        print(f"config error: {e}", file=sys.stderr)
        return 2

    # 6. evaluate every target domain and 7. save the adapter, results.json and the table
    finish_run(cfg, trainer, model, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
