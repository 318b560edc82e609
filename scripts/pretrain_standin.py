#!/usr/bin/env python
"""Pretrain (or reuse) the stand-in VFM: SimMIM on a small DINOv2, unlabeled multi-style synthetic scenes.

    python scripts/pretrain_standin.py                      # full run -> ~/.cache/peft_fishertune/standin_vfm
    python scripts/pretrain_standin.py --quick --output_dir /tmp/standin_quick
    python scripts/pretrain_standin.py --steps 600 --output_dir outputs/standin_vfm --overwrite
    python scripts/pretrain_standin.py --preset demo        # build the cache `standin:demo` resolves to

Every `PretrainConfig` field is an option (`--hidden_size 256`, `--styles clean fog night`, ...);
given options override the chosen preset (the default one, or `--quick`). The checkpoint
directory loads with `build_segmentation_model(backbone="dinov2", model_name_or_path=<dir>)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from peft_fishertune.standin.presets import STANDIN_PRESETS, standin_cache_dir, standin_preset
from peft_fishertune.standin.pretrain import PretrainConfig, config_fields, default_cache_dir, pretrain_standin


def _option(parser: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    kind = typing.get_type_hints(PretrainConfig)[f.name]
    help_ = f.metadata.get("help", "")
    if kind is bool:
        parser.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                            metavar="BOOL", help=help_)
    elif typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        parser.add_argument(f"--{f.name}", type=item, nargs="+", default=None, help=help_)
    else:
        parser.add_argument(f"--{f.name}", type=kind, default=None, help=help_)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=None, help=f"checkpoint directory (default {default_cache_dir()})")
    parser.add_argument("--quick", action="store_true", help="tiny preset (a few steps; tests and smoke runs)")
    parser.add_argument("--preset", choices=sorted(STANDIN_PRESETS), default=None,
                        help="start from a named preset (`model_name_or_path: standin:<preset>`); without options "
                             "or --output_dir it is written to the cache that name resolves to")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint made with other settings")
    parser.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    for f in config_fields():
        _option(parser, f)
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in config_fields() if getattr(args, f.name) is not None}
    try:
        output_dir = args.output_dir
        if args.preset is not None:
            if args.quick:
                raise ValueError("give --quick or --preset, not both")
            config = dataclasses.replace(standin_preset(args.preset), **overrides)
            if output_dir is None:
                if overrides:
                    raise ValueError(f"--preset {args.preset} with changed settings {sorted(overrides)} needs "
                                     "--output_dir (the preset's cache holds only its own settings)")
                output_dir = standin_cache_dir(args.preset)
        else:
            config = PretrainConfig.quick(**overrides) if args.quick else PretrainConfig(**overrides)
        path = pretrain_standin(
            config, output_dir, overwrite=args.overwrite, progress=not args.no_progress, num_threads=args.num_threads
        )
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
