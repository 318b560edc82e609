#!/usr/bin/env python
"""Evaluate a model (merged, or base + saved adapter) on any DGSS dataset, as the papers report it: mIoU, aAcc,
mAcc and a class x domain IoU table, all in percent, under a named protocol.

    python scripts/evaluate.py --model outputs/demo/base_model --adapter outputs/demo/adapter \
        --dataset cityscapes:outputs/demo_data/fog:val --dataset cityscapes:outputs/demo_data/night:val \
        --mode slide --window 128 --stride 85 --test-scale 256 128
    python scripts/evaluate.py --config configs/fishertune_dinov2-l_mask2former_gta2citybddmap_512x512_bs4.yaml \
        --adapter outputs/fishertune_dinov2-l_gta/adapter --protocol rein \
        --dataset cityscapes:data/cityscapes:val --dataset bdd100k:data/bdd100k:val \
        --dataset mapillary:data/mapillary:val --output-dir outputs/eval_rein --pictures outputs/eval_rein/pictures

--dataset NAME:ROOT:SPLIT[:CONDITION] (or LABEL=NAME:ROOT:SPLIT[:CONDITION]); a domain is called by dataset and split
(`cityscapes/val`, `acdc/fog/val`; two roots of one dataset: `cityscapes@<root folder>/val`). With the four ACDC
conditions, an `acdc-all` row is added from their summed confusion matrices.

--protocol NAME takes the test scale per dataset, mode, window, stride, half-size Mapillary and TTA of a published
protocol (rein, rein-1024, soma, soma-tta, tqdm, whole: see docs/evaluation.md); without it the protocol is
`custom`, given by --test-scale / --mode / --window / --stride / --tta-scales / --flip (default: 1024x512, slide
512/341, no TTA). Every table names its protocol.

With --config, the base model is the one the adapter was trained on: `base_model/` beside the adapter when the run
saved one (random-init backbones), else the config's checkpoint; a random-init config without a saved base is
refused. Input errors (unknown dataset, missing folder, --num-labels not the model's) exit 2 with one line.
"""

import argparse
import json
import os
import sys

import torch


def parse_dataset(spec: str):
    label, sep, rest = spec.partition("=")
    if not sep:
        label, rest = None, spec
    parts = rest.split(":")
    if len(parts) not in (3, 4) or not all(parts[:3]):
        raise argparse.ArgumentTypeError(f"--dataset {spec!r}: expected [LABEL=]NAME:ROOT:SPLIT[:CONDITION]")
    return {"label": label, "name": parts[0], "root": parts[1], "split": parts[2],
            "condition": parts[3] if len(parts) == 4 else None, "spec": spec}


def domain_names(datasets: list[dict]) -> list[str]:
    """`name[/condition]/split`; a dataset given with two roots gets `name@<root folder>[/condition]/split`."""

    def base(d, with_root):
        name = f"{d['name']}@{os.path.basename(os.path.normpath(d['root']))}" if with_root else d["name"]
        return "/".join([name] + ([d["condition"]] if d["condition"] else []) + [d["split"]])

    plain = [base(d, False) for d in datasets]
    names = [d["label"] or (base(d, True) if plain.count(p) > 1 else p) for d, p in zip(datasets, plain)]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"two --dataset entries would share the name(s) {dup}: give them labels (LABEL=NAME:...)")
    return names


def _fail(message: str) -> int:
    print("error: " + " ".join(str(message).split()), file=sys.stderr)  # one line
    return 2


def main(argv=None) -> int:
    from peft_fishertune.data import list_datasets, load_dgss_dataset
    from peft_fishertune.inference import evaluate_domains, evaluation_table
    from peft_fishertune.inference.pictures import write_domain_pictures
    from peft_fishertune.inference.protocols import (
        EvalDataset,
        ProtocolTransform,
        custom_setting,
        describe_settings,
        protocol_names,
        resolve_protocol,
    )
    from peft_fishertune.inference.tta import TTA
    from peft_fishertune.training.trained_run import add_model_arguments, load_for_inference_or_exit

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--dataset", action="append", type=parse_dataset, required=True,
                   help="[LABEL=]NAME:ROOT:SPLIT[:CONDITION]")
    p.add_argument("--protocol", choices=protocol_names(), help="a published test protocol (sets the next five)")
    p.add_argument("--mode", choices=["slide", "whole"], default=None, help="custom protocol (default slide)")
    p.add_argument("--test-scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                   help="custom protocol (default 1024 512)")
    p.add_argument("--window", type=int, default=None, help="custom protocol (default 512)")
    p.add_argument("--stride", type=int, default=None, help="custom protocol (default 341)")
    p.add_argument("--tta-scales", type=float, nargs="+", default=None, metavar="R",
                   help="custom protocol: test-time scale factors, e.g. 0.5 0.75 1.0 1.25 1.5 1.75")
    p.add_argument("--flip", action="store_true", help="custom protocol: add horizontally flipped passes")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--num-labels", type=int, default=19)
    p.add_argument("--json", help="also write {domain: {mIoU, aAcc, mAcc, per_class_iou, ...}} (percent) here")
    p.add_argument("--output-dir", help="write results.md / results.csv / results.json (per-class tables) here")
    p.add_argument("--pictures", metavar="DIR", help="write a PNG per domain: input | truth | prediction | errors")
    p.add_argument("--num-pictures", type=int, default=4, help="images per domain picture")
    p.add_argument("--tensorboard", metavar="DIR", help="also log the pictures to TensorBoard here")
    a = p.parse_args(argv)

    # 1. everything that can be checked before a model is loaded
    if (a.model is None) == (a.config is None):
        return _fail("give exactly one of --model (a SegmentationModel directory) or --config (a training YAML)")
    custom = {"--mode": a.mode, "--test-scale": a.test_scale, "--window": a.window, "--stride": a.stride,
              "--tta-scales": a.tta_scales, "--flip": a.flip or None}
    given = [k for k, v in custom.items() if v is not None]
    if a.protocol and given:
        return _fail(f"--protocol {a.protocol} sets the test scale, mode, window, stride and TTA; drop "
                     f"{', '.join(given)} (or drop --protocol for a custom protocol)")
    known = list_datasets()
    for d in a.dataset:
        if d["name"] not in known:
            return _fail(f"--dataset {d['spec']!r}: unknown dataset {d['name']!r}; expected one of {known}")
    if (a.stride or 341) > (a.window or 512) or min(a.stride or 1, a.window or 1) < 1:
        return _fail(f"--stride {a.stride or 341} / --window {a.window or 512}: expected 1 <= stride <= window")
    if a.num_labels < 1:
        return _fail(f"--num-labels={a.num_labels}; expected a positive number of classes")
    try:
        names = domain_names(a.dataset)
        settings = {}
        for n, d in zip(names, a.dataset):
            if a.protocol:
                settings[n] = resolve_protocol(a.protocol, d["name"])
            else:
                tta = TTA(tuple(a.tta_scales or (1.0,)), flip=a.flip)
                settings[n] = custom_setting(tuple(a.test_scale or (1024, 512)), a.mode or "slide",
                                             a.window or 512, a.stride or 341, tta, dataset=d["name"])
        domains = {}
        for n, d in zip(names, a.dataset):
            base = load_dgss_dataset(d["name"], d["root"], split=d["split"], condition=d["condition"])
            domains[n] = EvalDataset(base, ProtocolTransform(settings[n]), a.max_images)
    except (ValueError, OSError) as e:  # unknown split / condition, missing folder, layout or file errors
        return _fail(e)

    # 2. the model
    model = load_for_inference_or_exit(a)
    if model is None:
        return 2
    have = getattr(model, "num_labels", None)
    if isinstance(have, int) and have != a.num_labels:
        return _fail(f"--num-labels={a.num_labels}, but the model predicts {have} classes")

    first = next(iter(settings.values()))
    where = describe_settings(settings)
    try:
        with torch.no_grad():
            results = evaluate_domains(model, domains, num_labels=a.num_labels, mode=first.mode, window=first.window,
                                       stride=first.stride, tta=first.tta)
    except ValueError as e:  # e.g. logits with another channel count than --num-labels
        return _fail(e)
    table = evaluation_table(results, sizes={n: len(ds) for n, ds in domains.items()}, protocol=where)
    print(table.to_markdown(title=f"mIoU / aAcc / mAcc (%), {where}", per_class=True))
    if a.json:
        rows = {d.name: {**d.to_dict(), "protocol": where} for d in table.domains}
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)  # NaN (a class absent from a domain) is null
    if a.output_dir:
        paths = table.write(a.output_dir, title=f"mIoU / aAcc / mAcc (%), {where}",
                            json_extra={"command": ["scripts/evaluate.py"] + list(argv if argv is not None
                                                                                   else sys.argv[1:]),
                                        "datasets": {n: d["spec"] for n, d in zip(names, a.dataset)}})
        print(f"wrote {paths['md']}, {paths['csv']}, {paths['json']}")
    if a.pictures:
        paths = write_domain_pictures(model, domains, a.pictures, protocol=where, tensorboard=a.tensorboard,
                                      num_images=a.num_pictures, num_labels=a.num_labels, mode=first.mode,
                                      window=first.window, stride=first.stride, tta=first.tta)
        print("pictures: " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
