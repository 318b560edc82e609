#!/usr/bin/env python
"""Train FisherTune (or a baseline) from a YAML config, with dotted command-line overrides.

    accelerate launch scripts/train.py --config configs/demo.yaml
    accelerate launch scripts/train.py --config configs/fishertune_dinov2-l_mask2former_gta2citybddmap_512x512_bs4.yaml \
        --training.output_dir outputs/gta --data.train.root /data/gta5
    python scripts/train.py --config configs/demo.yaml --method.name lora --training.stage3_steps 50

The run: warm up the decoder (stage 1), estimate DR-FIM scores (stage 2), select and fine-tune the selected
backbone elements with a growing selection (stage 3); then a per-domain mIoU table and a saved sparse adapter
under training.output_dir. Config errors are reported before training starts.
"""

import argparse
import sys

from peft_fishertune.training import ConfigError, load_config, parse_overrides, run_experiment


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file with model / data / method / training sections")
    parser.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-N directory of an earlier run")
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, parse_overrides(rest))
        run_experiment(cfg, resume_from_checkpoint=args.resume_from_checkpoint)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
