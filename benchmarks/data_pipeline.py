"""Training data pipeline throughput on synthetic data (images/s), 0 and 2 DataLoader workers.

Writes a small synthetic Cityscapes-layout domain (1024x512 PNGs, like Cityscapes at Rein's
base scale), loads it with load_dgss_dataset("cityscapes") + TrainTransform (random resize
0.5-2.0 of 1024x512, 512 crop with cat_max_ratio 0.75, flip, photometric distortion) and
collate_fn, and times full batches of 4. Also times writing the synthetic domain.
Prints one JSON line, then a table.  python benchmarks/data_pipeline.py [--images 24] [--batches 10]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from peft_fishertune.data import (
    STYLES,
    TrainTransform,
    apply_style,
    collate_fn,
    generate_synthetic_domains,
    load_dgss_dataset,
    render_scene,
)


def throughput(ds, workers, batch_size, batches):
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate_fn,
        persistent_workers=False, drop_last=True,
    )
    it = iter(loader)
    next(it)  # warm-up (worker start, first decode)
    n = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        n += batch["pixel_values"].shape[0]
    return n / (time.perf_counter() - t0), batch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--size", default="1024x512")
    args = p.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    torch.manual_seed(0)
    # in-memory render + style at 512x256, every style, CPU time of this process (robust to other load)
    t0, n = time.process_time(), 24
    for i in range(n):
        rng = np.random.default_rng(i)
        image, lab, depth = render_scene(rng, (512, 256))
        apply_style(image, STYLES[i % len(STYLES)], rng, depth, lab)
    render_rate = n / (time.process_time() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        roots = generate_synthetic_domains(tmp, styles=("synthetic",), num_images={"train": args.images},
                                           size=(w, h), seed=0, progress=False)
        gen_rate = args.images / (time.perf_counter() - t0)
        ds = load_dgss_dataset("cityscapes", roots["synthetic"], split="train", transform=TrainTransform())
        rates = {}
        for workers in (0, 2):
            rate, batch = throughput(ds, workers, args.batch_size, args.batches)
            rates[workers] = rate
        assert batch["pixel_values"].shape == (args.batch_size, 3, 512, 512) and batch["labels"].dtype == torch.long
    res = {
        "benchmark": "data_pipeline",
        "source_size": [w, h],
        "crop": [512, 512],
        "batch_size": args.batch_size,
        "images_per_s_workers0": round(rates[0], 1),
        "images_per_s_workers2": round(rates[2], 1),
        "synthetic_write_images_per_s": round(gen_rate, 1),
        "render_style_images_per_cpu_s_512x256": round(render_rate, 1),
        "cpu_count": os.cpu_count(),
        "timer": "wall clock",
    }
    print(json.dumps(res))
    print(f"{'pipeline (decode PNG + TrainTransform + collate)':<52}{'images/s':>10}")
    print(f"{'  num_workers=0':<52}{rates[0]:>10.1f}")
    print(f"{'  num_workers=2':<52}{rates[2]:>10.1f}")
    print(f"{'synthetic generation + PNG write at ' + args.size:<52}{gen_rate:>10.1f}")
    print(f"{'render + style in memory at 512x256 (per CPU second)':<52}{render_rate:>10.1f}")


if __name__ == "__main__":
    main()
