"""What per-sample Fisher statistics cost by single-sample passes, against one batched pass (issue 23's next lever).

    python benchmarks/per_sample_passes.py                      # DINOv2-B size, 224², batch 2 and 4, CPU
    python benchmarks/per_sample_passes.py --quick              # a tiny model (tests/test_per_sample_passes.py)
    python benchmarks/per_sample_passes.py --device cuda --hidden 1024 --layers 24 --heads 16   # DINOv2-L on a GPU

The paper configs estimate the per-sample Fisher (`fisher_mode: per_sample`, per_sample_method `loop`): one
forward + backward per image for x and again for x'. This benchmark sizes the alternative for targets that are
`nn.Linear` weights: one forward + backward of the whole micro-batch, each Linear's per-sample gradient made from its
saved input and its output gradient (dW_i = g_iᵀ x_i), squared and summed. Only the arithmetic of the gradients is
timed (no weight samples, no checkpointing, no folds into accumulators), on a transformers `Dinov2Model` built from a
config with a 1x1-conv head and pixel-wise cross-entropy. Rows, each summing every targeted weight's squared
gradients into one statistic (median of --reps after one warm-up):
    loop                  B single-image passes, each image's loss its own pixel mean (per_sample_method `loop`)
    batched_per_sample    one pass of B images whose loss is the sum of the per-image means, per-sample dW by hooks
    batch_mode            one pass, the batch-mean loss's gradient squared (`fisher_mode: batch`, the cheap proxy)
Before timing, the batched statistic is checked against the loop's (`rel_err`, the largest relative difference over
the weights). `rel_err_batch_mean_loss` is the same check when the batched pass uses the usual batch-mean loss instead:
the images' pixel counts differ (ignored pixels), so each image's gradient comes scaled by n_i / N and the statistic
is wrong. A batched per-sample estimate therefore needs each image's own loss, which a model computing its loss inside
its forward does not give. Prints one JSON line and a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from torch import nn


def build(args):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       intermediate_size=4 * args.hidden, patch_size=args.patch, image_size=args.crop)
    backbone = Dinov2Model(cfg).train()
    head = nn.Conv2d(args.hidden, args.classes, 1)
    for p in list(backbone.parameters()) + list(head.parameters()):
        p.requires_grad_(False)
    linears = [m for n, m in backbone.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")]
    return backbone, head, linears


def per_image_losses(backbone, head, x, y, patch: int) -> torch.Tensor:
    """Each image's pixel-mean cross-entropy (ignore index 255), a vector of B."""
    h = backbone(pixel_values=x).last_hidden_state[:, 1:]
    b, n, c = h.shape
    side = x.shape[-1] // patch
    feats = h.transpose(1, 2).reshape(b, c, side, n // side)
    logits = nn.functional.interpolate(head(feats), size=y.shape[-2:], mode="bilinear", align_corners=False)
    pix = nn.functional.cross_entropy(logits, y, ignore_index=255, reduction="none")
    valid = (y != 255).sum(dim=(1, 2)).clamp(min=1)
    return pix.sum(dim=(1, 2)) / valid, pix.sum() / valid.sum()


class Stat:
    """Σ of squared gradients per targeted weight."""

    def __init__(self, linears):
        self.linears = linears
        self.acc = [torch.zeros_like(m.weight) for m in linears]

    def zero(self):
        for a in self.acc:
            a.zero_()

    def rel_err(self, ref: "Stat") -> float:
        return max(float((a - r).abs().max() / r.abs().max().clamp(min=1e-30)) for a, r in zip(self.acc, ref.acc))


@contextlib.contextmanager
def trainable(stat: Stat):
    """The targeted weights require grad inside (set before the forward, so the graph reaches them)."""
    weights = [m.weight for m in stat.linears]
    for w in weights:
        w.requires_grad_(True)
    try:
        yield weights
    finally:
        for w in weights:
            w.requires_grad_(False)


def loop(model, stat: Stat, x, y, patch):
    with trainable(stat) as weights:
        for i in range(x.shape[0]):
            per, _ = per_image_losses(*model[:2], x[i:i + 1], y[i:i + 1], patch)
            for a, g in zip(stat.acc, torch.autograd.grad(per.sum(), weights)):
                a.addcmul_(g, g)


def batched_per_sample(model, stat: Stat, x, y, patch, *, batch_mean_loss: bool = False):
    saved, handles, done = {}, [], set()

    def on_grad(j, g):
        done.add(j)
        xin = saved.pop(j)
        g2, x2 = g.reshape(g.shape[0], -1, g.shape[-1]), xin.reshape(xin.shape[0], -1, xin.shape[-1])
        for i in range(g2.shape[0]):
            gw = g2[i].t() @ x2[i]
            stat.acc[j].addcmul_(gw, gw)

    def forward_hook(j):
        def hook(mod, inputs, out):
            saved[j] = inputs[0].detach()
            out.register_hook(lambda g: on_grad(j, g))
        return hook

    for j, m in enumerate(stat.linears):
        handles.append(m.register_forward_hook(forward_hook(j)))
    try:
        xr = x.clone().requires_grad_(True)  # the frozen model's activations need a graph to carry output gradients
        per, mean = per_image_losses(*model[:2], xr, y, patch)
        torch.autograd.grad(mean if batch_mean_loss else per.sum(), [xr])
    finally:
        for h in handles:
            h.remove()
    missing = len(stat.linears) - len(done)
    if missing:  # never called, or called without reaching the loss: its statistic would stay zero
        raise RuntimeError(f"{missing} targeted Linear layers got no output gradient")


def batch_mode(model, stat: Stat, x, y, patch):
    with trainable(stat) as weights:
        _, mean = per_image_losses(*model[:2], x, y, patch)
        for a, g in zip(stat.acc, torch.autograd.grad(mean, weights)):
            a.addcmul_(g, g)


ROWS = {"loop": loop, "batched_per_sample": batched_per_sample, "batch_mode": batch_mode}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny model (seconds)")
    ap.add_argument("--batches", default="2,4", help="micro-batch sizes, comma-separated (default 2,4)")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--classes", type=int, default=19)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timings then synchronize at both ends)")
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.heads, args.patch, args.crop = 32, 2, 2, 8, 32
    batches = [int(b) for b in args.batches.split(",") if b]
    if not batches or min(batches) < 2:
        raise SystemExit(f"--batches {args.batches}: expected sizes >= 2 (per-sample and batch statistics differ there)")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    backbone, head, linears = build(args)
    model = (backbone.to(device), head.to(device), linears)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    patch = args.patch
    out = {"benchmark": "per_sample_passes", "setting": {k: v for k, v in vars(args).items()},
           "num_targeted": sum(m.weight.numel() for m in model[2]), "results": {}}
    for b in batches:
        gen = torch.Generator().manual_seed(b)
        x = torch.randn(b, 3, args.crop, args.crop, generator=gen).to(device)
        y = torch.randint(0, args.classes, (b, args.crop, args.crop), generator=gen)
        y[0, : args.crop // 2] = 255
        y = y.to(device)  # the images' valid pixel counts differ, as with real ignore labels
        ref, got = Stat(model[2]), Stat(model[2])
        loop(model, ref, x, y, patch)
        batched_per_sample(model, got, x, y, patch)
        rel = got.rel_err(ref)
        got.zero()
        batched_per_sample(model, got, x, y, patch, batch_mean_loss=True)
        rel_mean = got.rel_err(ref)
        row = {"rel_err": rel, "rel_err_batch_mean_loss": rel_mean, "step_s": {}}
        for name, fn in ROWS.items():
            stat = Stat(model[2])
            fn(model, stat, x, y, patch)  # warm-up
            times = []
            for _ in range(args.reps):
                sync()
                t0 = time.perf_counter()
                fn(model, stat, x, y, patch)
                sync()
                times.append(time.perf_counter() - t0)
            row["step_s"][name] = statistics.median(times)
        out["results"][str(b)] = row
    print(json.dumps(out))
    print(f"\nPer-sample squared gradients of {out['num_targeted']:,} Linear weights (hidden {args.hidden}, "
          f"{args.layers} blocks, {args.crop}², {args.device}, {args.threads} threads; median of {args.reps}):\n")
    print("| batch | loop s | batched per-sample s | batch mode s | batched / loop | rel. error (per-image loss) "
          "| rel. error (batch-mean loss) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for b, row in out["results"].items():
        s = row["step_s"]
        print(f"| {b} | {s['loop']:.2f} | {s['batched_per_sample']:.2f} | {s['batch_mode']:.2f} | "
              f"{s['batched_per_sample'] / s['loop']:.2f} | {row['rel_err']:.1e} | {row['rel_err_batch_mean_loss']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
