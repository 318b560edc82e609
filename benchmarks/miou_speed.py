"""mIoU speed: bincount confusion matrix vs evaluate's mean_iou formula.

20 images of 512x1024, 19 classes, 255 = ignore. Three timings (CPU time of this process):
  evaluate_library  evaluate.load(<local faithful copy of evaluate's mean_iou module>).compute(...)
                    (what `evaluate.load("mean_iou")` runs; the Hub module is unreachable offline)
  formula           the same histogram formula called directly on numpy arrays
  bincount          peft_fishertune.metrics.MeanIoU.update + compute
Prints one JSON line, then a table.  python benchmarks/miou_speed.py [--images 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference_mean_iou import reference_mean_iou  # noqa: E402

from peft_fishertune.metrics import MeanIoU  # noqa: E402


def best_of(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
    return min(times), out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import evaluate

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 19, (args.images, args.height, args.width)).astype(np.uint8)
    labels[:, : args.height // 10] = 255
    preds = np.where(rng.random(labels.shape) < 0.7, labels, rng.integers(0, 19, labels.shape)).astype(np.int64)
    preds[preds == 255] = 0  # argmax output: a valid class

    def fast():
        m = MeanIoU()
        for i in range(len(preds)):  # streamed per image, as in an eval loop
            m.update(torch.from_numpy(preds[i]), torch.from_numpy(labels[i]))
        return m.compute()

    module = evaluate.load(str(Path(__file__).resolve().parents[1] / "tests" / "reference_mean_iou.py"))
    t_lib, r_lib = best_of(
        lambda: module.compute(predictions=list(preds), references=list(labels), num_labels=19, ignore_index=255), 1
    )
    t_formula, r_formula = best_of(lambda: reference_mean_iou(list(preds), list(labels.copy()), 19, 255), args.repeats)
    t_fast, r_fast = best_of(fast, args.repeats)
    for r in (r_lib, r_formula):
        assert np.allclose(r["per_category_iou"], r_fast["per_category_iou"], equal_nan=True)
        assert abs(r["mean_iou"] - r_fast["mean_iou"]) < 1e-12
    res = {
        "benchmark": "miou_speed",
        "images": args.images,
        "size": [args.height, args.width],
        "num_classes": 19,
        "seconds_evaluate_library": round(t_lib, 4),
        "seconds_formula": round(t_formula, 4),
        "seconds_bincount": round(t_fast, 4),
        "speedup_vs_evaluate_library": round(t_lib / t_fast, 1),
        "speedup_vs_formula": round(t_formula / t_fast, 1),
        "identical": True,
        "timer": "process CPU time, best of repeats",
    }
    print(json.dumps(res))
    print(f"{'method':<36}{'seconds':>10}{'speed-up':>10}")
    print(f"{'evaluate library (module.compute)':<36}{t_lib:>10.3f}{t_lib / t_fast:>9.1f}x")
    print(f"{'evaluate formula (numpy histogram)':<36}{t_formula:>10.3f}{t_formula / t_fast:>9.1f}x")
    print(f"{'bincount MeanIoU (this package)':<36}{t_fast:>10.3f}{1:>9.1f}x")


if __name__ == "__main__":
    main()
