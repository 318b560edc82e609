#!/usr/bin/env python
"""The last thing `make demo` prints: the per-domain mIoU table, the source/target gap, and where the run went.

    python scripts/demo_report.py --config configs/demo.yaml

Reads the finished run's `results.json` (under the config's `training.output_dir`); the source domain is
every evaluation entry whose root is the training root, the targets are the others.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional


def source_and_targets(cfg) -> tuple[list[str], list[str]]:
    """Display names of the evaluation entries on the training domain, and of the others."""
    train_root = os.path.abspath(cfg.data.train.root)
    source = [e.display for e in cfg.data.eval if os.path.abspath(e.root) == train_root]
    targets = [e.display for e in cfg.data.eval if os.path.abspath(e.root) != train_root]
    return source, targets


def demo_report(config_path: str, overrides: Optional[dict] = None) -> str:
    """The report text of the run of `config_path` (a `FileNotFoundError` if it has not finished)."""
    from peft_fishertune.standin import is_standin_ref, resolve_standin
    from peft_fishertune.training import load_config

    cfg = load_config(config_path, overrides, check_paths=False)
    out_dir = cfg.training.output_dir
    results_path = os.path.join(out_dir, "results.json")
    if not os.path.isfile(results_path):
        raise FileNotFoundError(f"{results_path} not found: the run of {config_path} has not finished")
    with open(results_path) as f:
        results = json.load(f)
    table: dict[str, float] = results["table"]
    source, targets = source_and_targets(cfg)
    source = [s for s in source if s in table]
    targets = [t for t in targets if t in table]

    names = source + targets
    cells = [f"{table[n]:.1f}" for n in names]
    lines = ["", "=" * 78, f"FisherTune demo: mIoU (%) per domain after {sum(results['settings']['stages'])} "
             f"training steps on {', '.join(source) or cfg.data.train.root} only", ""]
    if targets:
        tgt_avg = sum(table[t] for t in targets) / len(targets)
        names.append("targets avg")
        cells.append(f"{tgt_avg:.1f}")
    lines += ["| " + " | ".join(names) + " |", "|" + "---:|" * len(names), "| " + " | ".join(cells) + " |", ""]
    if source and targets:
        src = sum(table[s] for s in source) / len(source)
        lines.append(f"Source {src:.1f} % vs {tgt_avg:.1f} % on average on the {len(targets)} target domains never "
                     f"seen in training: a domain gap of {src - tgt_avg:.1f} points, the gap FisherTune's "
                     "domain-aware selection is meant to narrow.")
    m = cfg.model
    if is_standin_ref(m.model_name_or_path):
        base = f"{resolve_standin(m.model_name_or_path, build=False, progress=False)} (stand-in VFM {m.model_name_or_path})"
    elif m.tiny_backbone is not None:
        base = os.path.join(out_dir, "base_model")
    else:
        base = str(m.model_name_or_path)
    lines.append("")
    if results.get("adapter_dir"):
        lines.append(f"adapter:    {results['adapter_dir']}")
    elif os.path.isdir(os.path.join(out_dir, "model")):
        lines.append(f"model:      {os.path.join(out_dir, 'model')}")
    lines += [f"base model: {base}", f"results:    {results_path} (and the training log in {out_dir})"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the YAML config the run was trained with")
    args, rest = parser.parse_known_args(argv)
    from peft_fishertune.training import parse_overrides

    try:
        print(demo_report(args.config, parse_overrides(rest)), flush=True)
    except (FileNotFoundError, ValueError) as e:
        print(f"demo report: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
