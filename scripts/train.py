#!/usr/bin/env python
"""Train FisherTune (or a baseline) from a YAML config, with dotted command-line overrides.

    accelerate launch scripts/train.py --config configs/demo.yaml
    accelerate launch scripts/train.py --config configs/fishertune_dinov2-l_mask2former_gta2citybddmap_512x512_bs4.yaml \
        --training.output_dir outputs/gta --data.train.root /data/gta5 --data.eval.0.root /data/cityscapes
    python scripts/train.py --config configs/demo.yaml --method.name lora --training.stage3_steps 50

The config has four typed sections (peft_fishertune/training/config/): model, data, method and training (the
fields of transformers' TrainingArguments plus the three stage lengths and two learning rates). An override
`--<section>.<key> VALUE` is typed by the field it sets (`--training.backbone_lr 1e-5` is a float,
`--training.save_strategy no` a save strategy, `--data.eval.0.root DIR` changes the first evaluation dataset;
a mapping value is merged key by key into the file's mapping, a list replaces the file's list).

The run: warm up the decoder (stage 1), estimate DR-FIM scores (stage 2), select and fine-tune the selected
backbone elements with a growing selection (stage 3); then a per-domain mIoU table and a saved sparse adapter
under training.output_dir, with `train.log` (everything printed). Config errors (exit code 2, the message is the
last line the script prints) are reported before anything is built; data errors (a missing label, a corrupt or
truncated evaluation file, implausible labels: `data error: ...`, exit code 2) before the model is built.

Several config files merge in order (a later one over the earlier ones), e.g. a smoke run of any config:

    python scripts/train.py --config configs/demo.yaml configs/quick.yaml

Under `accelerate launch`, accelerate turns the exit code 2 into its own (1) with a CalledProcessError traceback
after our message; `accelerate launch -q ...` leaves the message last.
"""

import os
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser

from peft_fishertune.data import DatasetFileError, DatasetLayoutError
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
from peft_fishertune.training.run_log import RunLog


@dataclass
class ScriptArguments:
    """The script's own arguments; everything else is `--<section>.<key> VALUE` on top of the YAML."""

    config: list[str] = field(metadata={
        "help": "YAML file(s) with model / data / method / training sections; several are merged in order (a later "
                "file over the earlier ones, as if it named them in _base_), e.g. X.yaml configs/quick.yaml."})
    resume_from_checkpoint: Optional[str] = field(
        default=None, metadata={"help": "a checkpoint-N directory of an earlier run with the same config, or `true` "
                                        "for the newest complete checkpoint in training.output_dir."})


def parse_command_line(argv=None) -> tuple[ScriptArguments, dict[str, str]]:
    import argparse

    argv = _join_config_flags(list(sys.argv[1:] if argv is None else argv))
    parser = HfArgumentParser(ScriptArguments, description=__doc__, epilog=describe_sections(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    script, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    return script, parse_overrides(rest)


def _join_config_flags(argv: list[str]) -> list[str]:
    """`--config a.yaml --config b.yaml` as `--config a.yaml b.yaml` (argparse would keep the last one only)."""
    files, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--config":
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                files.append(argv[i])
                i += 1
        elif argv[i].startswith("--config="):
            files.append(argv[i].split("=", 1)[1])
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    return (["--config", *files] if files else []) + rest


def config_error(e: Exception, kind: str = "config") -> int:
    """Report a config (or data) error as the last thing the script prints; exit code 2."""
    sys.stdout.flush()
    sys.stderr.flush()  # warnings printed before it stay above it
    print(f"{kind} error: {e}", file=sys.stderr, flush=True)
    return 2


def launch_warning(environ, launcher_argv: Optional[list[str]], world_size: int) -> Optional[str]:
    """The warning for a launch that asked for N > 1 processes and got `world_size` (e.g. `accelerate launch --cpu
    --num_processes 2`, which starts ONE process), or None. `launcher_argv`: the parent process's command line."""
    if not any(k in environ for k in ("ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION")):
        return None  # not started by `accelerate launch` (it sets these in every process it starts)
    asked = None
    argv = list(launcher_argv or [])
    for i, a in enumerate(argv):
        if a.endswith(".py") and i > 0 and "launch" in argv[:i]:
            break  # the training script: what follows are its own arguments
        if a in ("--num_processes", "--num-processes") and i + 1 < len(argv) and argv[i + 1].isdigit():
            asked = int(argv[i + 1])
        elif a.startswith(("--num_processes=", "--num-processes=")) and a.split("=", 1)[1].isdigit():
            asked = int(a.split("=", 1)[1])
    if asked is None and environ.get("MASTER_ADDR") and not environ.get("WORLD_SIZE"):
        asked = "more than 1"  # accelerate sets MASTER_ADDR for num_processes > 1 (e.g. from its config file)
    if asked is None or (isinstance(asked, int) and asked <= world_size):
        return None
    cpu = str(environ.get("ACCELERATE_USE_CPU", "")).lower() in ("1", "true", "yes")
    fix = ("`accelerate launch --multi_gpu --num_processes N scripts/train.py ... --training.use_cpu true` (without "
           "--cpu, which accelerate refuses beside --multi_gpu) starts N CPU processes (gloo)" if cpu
           else "`accelerate launch --multi_gpu --num_processes N scripts/train.py ...` starts N")
    return (f"WARNING: accelerate launch was asked for {asked} processes but this run has world size {world_size}: "
            f"it trains as ONE process (batch, steps and results of a single process). "
            f"{'With --cpu, accelerate starts a single process whatever --num_processes says. ' if cpu else ''}"
            f"The fix: {fix}.")


def _parent_argv() -> Optional[list[str]]:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:  # not Linux: the environment alone decides
        return None


def main(argv=None) -> int:
    t0 = time.time()
    # 1. config: the YAML's four sections as dataclasses, each override typed by its field, validated before
    #    anything is built (unknown names, wrong types, missing dataset layouts or checkpoints)
    with warnings.catch_warnings(record=True) as config_warnings:  # shown below, once train.log is open
        try:
            script, overrides = parse_command_line(argv)
            cfg = load_config(script.config, overrides)
            args = training_arguments(cfg)
        except ConfigError as e:
            return config_error(e)

    log = None
    if args.process_index == 0:  # everything printed from here on also goes to <output_dir>/train.log
        os.makedirs(args.output_dir, exist_ok=True)
        command = shlex.join(["scripts/train.py", *(sys.argv[1:] if argv is None else argv)])
        log = RunLog(os.path.join(args.output_dir, "train.log"), header=command)
    for w in config_warnings:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    try:
        return _run(cfg, args, script, t0)
    except BaseException as e:
        if log is not None:
            log.close(e)
        raise
    finally:
        if log is not None:
            log.close()


def _run(cfg, args, script: ScriptArguments, t0: float) -> int:
    from accelerate.utils import set_seed

    warning = launch_warning(os.environ, _parent_argv(), args.world_size)
    if warning and args.process_index == 0:
        print(f"\n{'!' * 100}\n{warning}\n{'!' * 100}\n", file=sys.stderr, flush=True)

    # 2. data, before the model so a bad file costs seconds: an iteration-based training set (one augmented
    #    sample per index) and one dataset per target domain. Building them checks the files: label plausibility
    #    on a sample (trainIds under a labelIds name, all-ignore training labels), and every evaluation image
    #    and label decoded in full (verify: auto; cached per file, so a second run pays one stat per file)
    try:
        train_dataset, eval_domains = build_data(cfg, num_training_samples(args), args.seed)
    except (DatasetFileError, DatasetLayoutError) as e:
        return config_error(f"{e}\n(the options named above are keys of the config's dataset entries, e.g. "
                            "--data.eval.0.on_fault skip; docs/data.md)", "data")

    # 3. model: the VFM backbone + decoder, then wrapped for the method (FisherTune: every candidate weight of
    #    the backbone's linear layers is a target; nothing is selected yet)
    # 4. trainer: one optimizer and lr schedule over the three stages
    set_seed(args.seed)
    try:  # what only the built model can tell (e.g. a method.peft_config target that names no module)
        base = build_base_model(cfg)
        save_base_model(cfg, base, args)  # a random-init backbone is kept beside the adapter
        model, ft_config = build_model(cfg, base)
        trainer = build_trainer(cfg, model, ft_config, train_dataset, eval_domains, args)
    except ConfigError as e:
        return config_error(e)

    # 5. stages 1 -> 2 -> 3, switched by the trainer at the step boundaries:
    #    stage 1  decoder warm-up (backbone frozen)
    #    stage 2  the decoder keeps training; the Fisher estimator (DR-FIM) accumulates scores on every batch
    #    stage 3  select by the scores once, then train the decoder + the selected elements, δ(t) growing
    if trainer.is_world_process_zero():
        print("\n".join(stage_plan(args, cfg.method.name)), flush=True)
    try:
        trainer.train(resume_from_checkpoint=script.resume_from_checkpoint)
    except ConfigError as e:  # e.g. a checkpoint of another method / stage plan: named, before any step runs
        return config_error(e)

    # 6. evaluate every target domain and 7. save the adapter, results.json and the table
    finish_run(cfg, trainer, model, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
