"""What verifying an evaluation set costs: load_dgss_dataset(verify="full") on N synthetic Cityscapes-layout pairs
(1024x512 RGB PNG + 8-bit labelIds PNG), first run (cold cache: every file decoded) and second run (cache hit:
one stat per file), against verify="none" (the label check on a 24-file sample only).

    python benchmarks/verify_cost.py --n 500 --out /tmp/verify_cost
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_tree(root: Path, n: int, size=(1024, 512)) -> int:
    from peft_fishertune.data import colorize
    from peft_fishertune.data.labels import TRAINID_TO_ID

    w, h = size
    rng = np.random.default_rng(0)
    total = 0
    for i in range(n):
        tid = np.zeros((h, w), np.uint8)  # a street-like layout: sky, buildings/vegetation, sidewalk, road, cars
        tid[: h * 3 // 10] = 10
        tid[h * 3 // 10: h * 11 // 20, : w // 2] = 2
        tid[h * 3 // 10: h * 11 // 20, w // 2:] = 8
        tid[h * 11 // 20: h * 13 // 20] = 1
        for _ in range(3):
            cx, cy = int(rng.integers(0, w - 120)), int(rng.integers(h // 2, h - 80))
            tid[cy: cy + 60, cx: cx + 110] = 13
        tid[h - 20:] = 255
        lid = np.ones_like(tid)
        for t, k in TRAINID_TO_ID.items():
            lid[tid == t] = k
        img = colorize(tid).astype(np.int16) + rng.normal(0, 8, (h, w, 3)).astype(np.int16)
        city = f"city{i % 5}"
        stem = f"{city}_{i:06d}_000019"
        ip = root / "leftImg8bit/val" / city / f"{stem}_leftImg8bit.png"
        lp = root / "gtFine/val" / city / f"{stem}_gtFine_labelIds.png"
        ip.parent.mkdir(parents=True, exist_ok=True)
        lp.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(ip)
        Image.fromarray(lid, mode="L").save(lp)
        total += ip.stat().st_size + lp.stat().st_size
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--out", default=None, help="where to write the tree (default: a temporary folder, removed)")
    a = p.parse_args()
    base = Path(a.out or tempfile.mkdtemp(prefix="verify_cost_"))
    os.environ["PEFT_FISHERTUNE_CACHE"] = str(base / "cache")  # a cold cache of its own
    from peft_fishertune.data import load_dgss_dataset

    root = base / "cityscapes"
    if not (root / "gtFine").is_dir():
        t = time.perf_counter()
        nbytes = write_tree(root, a.n)
        print(f"wrote {a.n} pairs ({nbytes / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f} s")
    shutil.rmtree(base / "cache", ignore_errors=True)
    rows = []
    for what, kw in (("verify='none' (label check, 24-file sample, cold)", {"verify": "none"}),
                     ("verify='full', first run (cold cache)", {"verify": "full"}),
                     ("verify='full', second run (cache hit)", {"verify": "full"}),
                     ("verify='headers'", {"verify": "headers"})):
        t = time.perf_counter()
        ds = load_dgss_dataset("cityscapes", root, split="val", **kw)
        rows.append((what, time.perf_counter() - t))
        assert len(ds) == a.n
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{a.n} pairs 1024x512, {os.cpu_count()} CPUs, load average {load:.1f}")
    for what, s in rows:
        print(f"  {what:<52} {s:7.2f} s  ({1000 * s / a.n:.2f} ms/pair)")
    if a.out is None:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
