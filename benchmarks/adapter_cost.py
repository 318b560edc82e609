"""Training cost of FisherTune vs frozen / full fine-tuning / LoRA / Rein / SHiRA, side by side in one run.

    python benchmarks/adapter_cost.py                 # DINOv2-Base size, batch 2 x 224², CPU
    python benchmarks/adapter_cost.py --device cuda --hidden 1024 --layers 24 --heads 16 --image-size 518 --batch 4

Each method runs in its own process (so peak memory is its own). Measured per method:
- peak memory during the timed training steps (after warm-up; model building and the selection are
  excluded): CPU -> peak RSS (VmHWM, reset through /proc/self/clear_refs after malloc_trim(0) has handed
  freed heap back to the OS); CUDA -> torch.cuda.max_memory_allocated() after reset_peak_memory_stats();
  "overhead" is that minus the frozen backbone's. The peak RSS of setup (model building, selection, warm-up)
  is reported too;
- median step time (forward + backward + AdamW step) over --steps steps after --warmup;
- adapter file size: adapter_model.safetensors from save_pretrained (frozen: 0; full: the backbone's weights).
Prints one JSON line (all figures and the target ratios) and a table.

    python benchmarks/adapter_cost.py --methods full,lora,fishertune@0.05,fishertune@0.15 \\
        --profile benchmarks/results/profile_stage3.md

`fishertune@0.05+dw`: the same, with the active deltas written into the weights once per step
(`deltas_in_weights`, what FisherTuneTrainer does) instead of in every forward and backward. A further `+eagerT`
(`fishertune@0.05+dw+eagerT`) transposes SDDMM's operands with eager `t().contiguous()` instead of the compiled
kernel (`sparse_delta.contiguous_t`), to measure what that kernel saves.

`--profile FILE` also runs --profile-steps more steps per method under torch.profiler (after the timed ones, so
the figures above are not affected) and writes the top operators by self CPU time, one table per method, to FILE.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]


def build(args):
    import torch
    from torch import nn
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       intermediate_size=4 * args.hidden, image_size=args.image_size, patch_size=14)

    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Dinov2Model(cfg)
            self.head = nn.Conv2d(args.hidden, 19, 1)

        def forward(self, pixel_values, labels):
            tokens = self.backbone(pixel_values=pixel_values).last_hidden_state[:, 1:]
            b, n, c = tokens.shape
            h = w = int(n**0.5)
            logits = self.head(tokens.transpose(1, 2).reshape(b, c, h, w))
            logits = nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            return nn.functional.cross_entropy(logits, labels, ignore_index=255)

    return Seg()


def per_block_sums(args):
    h, f = args.hidden, 4 * args.hidden
    numel = 4 * h * h + 2 * h * f
    fan = 4 * (2 * h) + 2 * (h + f)
    return numel * args.layers, fan * args.layers


def shira_r(args, fraction):
    numel, fan = per_block_sums(args)
    return max(1, round(fraction * numel / fan))


def wrap(model, method, args):
    """Returns (model, object with save_pretrained or None). `inputgrad` and `densegrad` are floors, not methods:
    the backward through every block with no block weight gradient (what any method that trains the first block's
    weights pays, LoRA's step less its adapters); every dense weight gradient with no optimizer update (what any
    method that takes its values' gradient from the dense dW pays)."""
    import torch

    if method == "frozen":
        model.backbone.requires_grad_(False)
        return model, None
    if method == "inputgrad":  # floor: backward through every block (input gradients), no block weight gradient
        model.backbone.requires_grad_(False)
        model.backbone.embeddings.patch_embeddings.projection.weight.requires_grad_(True)  # 3x14x14 per channel
        return model, None
    if method == "densegrad":  # floor: every weight's dense gradient, as full fine-tuning, but no optimizer update
        return model, None
    if method == "full":
        return model, None
    from peft import LoraConfig, ShiraConfig, get_peft_model

    if method == "lora":
        pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS))
    elif method == "rein":  # every block; no Mask2Former here, so no query linking (it adds 459,264 values at L size)
        import peft_fishertune as pf

        pm = get_peft_model(model, pf.ReinConfig(target_modules=r"backbone\.encoder\.layer\.\d+", num_prefix_tokens=1,
                                                 link_token_to_query=False))
    elif method.startswith("shira"):
        pm = get_peft_model(model, ShiraConfig(r=shira_r(args, float(method.split("@")[1])), target_modules=TARGETS))
    elif method.startswith("fishertune"):
        import peft_fishertune as pf

        fraction = float(method.split("@")[1].split("+")[0])
        numel, fan = per_block_sums(args)
        if args.match_shira:  # the same number of trainable values as SHiRA at this fraction
            fraction = shira_r(args, fraction) * fan / numel
        pm = get_peft_model(model, pf.FisherTuneConfig(target_modules=TARGETS, init_selection="random",
                                                       delta_min=fraction, delta_max=fraction))
    else:
        raise ValueError(f"unknown method {method!r}")
    for p in pm.base_model.model.head.parameters():
        p.requires_grad_(True)
    torch.manual_seed(0)
    return pm, pm


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def worker(args):
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(args)
    model, saveable = wrap(model, args.method, args)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    head = sum(p.numel() for p in (model.base_model.model.head if saveable else model.head).parameters())
    trainable = sum(p.numel() for p in params) - head
    # densegrad: the gradients are computed, only the head is updated (the floor of any dense-dW method's step)
    opt = torch.optim.AdamW(list(model.head.parameters()) if args.method == "densegrad" else params, lr=1e-5,
                            weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)
    y = torch.randint(0, 19, (args.batch, args.image_size, args.image_size), generator=g).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step_context = contextlib.nullcontext
    if args.method.endswith("+eagerT"):  # SDDMM's operands transposed eagerly (no compiled kernel)
        from peft_fishertune.tuner import sparse_delta

        sparse_delta.TRANSPOSE_COMPILE_MIN_ELEMENTS = 1 << 62
    if "+dw" in args.method:  # the deltas written into the weights once per step (FisherTuneTrainer's way)
        from peft_fishertune.tuner.sparse_delta import deltas_in_weights

        step_context = lambda: deltas_in_weights(model)  # noqa: E731
    times = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:  # measure the training steps only, not model building or selection
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            else:
                setup_peak = _vm_hwm()
                ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS is live memory
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with step_context():
            loss = model(pixel_values=x, labels=y)
            loss.backward()
        opt.step()
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak, setup_peak = torch.cuda.max_memory_allocated(), None
    else:
        peak = _vm_hwm()
    profile = None
    if args.profile_steps:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            for _ in range(args.profile_steps):
                opt.zero_grad(set_to_none=True)
                with step_context():
                    model(pixel_values=x, labels=y).backward()
                opt.step()
                sync()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        profile = prof.key_averages().table(sort_by=sort, row_limit=args.profile_rows, max_name_column_width=60)
    size = 0
    with tempfile.TemporaryDirectory() as d:
        if saveable is not None:
            saveable.save_pretrained(d)
            size = os.path.getsize(os.path.join(d, "adapter_model.safetensors"))
        elif args.method == "full":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, os.path.join(d, "w.safetensors"))
            size = os.path.getsize(os.path.join(d, "w.safetensors"))
    print(json.dumps({"method": args.method, "trainable_backbone": trainable, "peak_bytes": peak,
                      "setup_peak_rss_bytes": setup_peak,
                      "step_s_median": statistics.median(times), "step_s_all": times, "adapter_bytes": size,
                      "loss": float(loss), "profile": profile}))


def _write_profile(args, results) -> None:
    head = [f"# torch.profiler: training steps per method ({args.device})", "",
            f"Command: `python benchmarks/adapter_cost.py {' '.join(sys.argv[1:])}`", "",
            f"DINOv2 hidden {args.hidden}, {args.layers} blocks, batch {args.batch} x {args.image_size}², "
            f"{args.threads} threads; {args.profile_steps} steps profiled per method after {args.warmup} warm-up and "
            f"{args.steps} timed steps (forward + backward + AdamW step). Top {args.profile_rows} operators by self "
            f"{'CUDA' if args.device.startswith('cuda') else 'CPU'} time; a shared machine: read the shares, not the "
            "absolute times.", ""]
    for m, r in results.items():
        head += [f"## {m}", "", f"median step {r['step_s_median']:.3f} s (timed steps)", "", "```", r["profile"] or "", "```", ""]
    with open(args.profile, "w") as f:
        f.write("\n".join(head))


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    """The model and batch of `build` (DINOv2-B size, batch 2 x 224² by default)."""
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default="frozen,full,lora,rein,shira@0.05,shira@0.15,fishertune@0.01,fishertune@0.05,fishertune@0.15")
    ap.add_argument("--no-match-shira", dest="match_shira", action="store_false",
                    help="use the nominal fractions for FisherTune instead of SHiRA's exact trainable count")
    ap.add_argument("--mmap-threshold", type=int, default=0,
                    help="set glibc's MALLOC_MMAP_THRESHOLD_ for the workers (e.g. 65536): RSS then tracks live "
                         "memory closely, at some cost in step time; 0 = glibc's default (dynamic) threshold")
    ap.add_argument("--profile", default=None, help="write torch.profiler tables (one per method) to this Markdown file")
    ap.add_argument("--profile-steps", type=int, default=0, help="steps profiled per method (default 3 with --profile)")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--out", help="also write the JSON line to this file")
    args = ap.parse_args()
    if args.profile and not args.profile_steps:
        args.profile_steps = 3
    if args.method:
        return worker(args)

    results = {}
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--method", method]
        for key in ("hidden", "layers", "heads", "image_size", "batch", "steps", "warmup", "threads", "device",
                    "profile_steps", "profile_rows"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        if not args.match_shira:
            cmd.append("--no-match-shira")
        print(f"[adapter_cost] {method} ...", file=sys.stderr, flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        if args.mmap_threshold:  # every block above it is mmapped and returned to the OS at free (glibc)
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit(f"method {method} failed (exit {proc.returncode})")
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])

    frozen = results.get("frozen", {}).get("peak_bytes")
    for r in results.values():
        r["overhead_bytes"] = r["peak_bytes"] - frozen if frozen is not None else None

    def ratio(a, b, key):
        if a in results and b in results and results[b][key]:
            return results[a][key] / results[b][key]
        return None

    targets = {
        "mem_overhead_ft5_over_lora (<=1.15)": ratio("fishertune@0.05", "lora", "overhead_bytes"),
        "mem_overhead_ft15_over_shira15 (<=0.85)": ratio("fishertune@0.15", "shira@0.15", "overhead_bytes"),
        "step_ft5_over_shira5 (<=0.9)": ratio("fishertune@0.05", "shira@0.05", "step_s_median"),
        "step_ft15_over_shira15 (<=0.9)": ratio("fishertune@0.15", "shira@0.15", "step_s_median"),
        "file_ft5_over_shira5 (<=0.5)": ratio("fishertune@0.05", "shira@0.05", "adapter_bytes"),
        "file_ft15_over_shira15 (<=0.5)": ratio("fishertune@0.15", "shira@0.15", "adapter_bytes"),
        # issue 23's stage-3 targets, and the floors under them (see inputgrad / densegrad in wrap())
        "step_ft5_over_lora (<=1.15)": ratio("fishertune@0.05", "lora", "step_s_median"),
        "step_ft15_over_full (<=0.9)": ratio("fishertune@0.15", "full", "step_s_median"),
        "floor_inputgrad_over_lora": ratio("inputgrad", "lora", "step_s_median"),
        "floor_densegrad_over_full": ratio("densegrad", "full", "step_s_median"),
    }
    setting = {k: getattr(args, k) for k in ("hidden", "layers", "heads", "image_size", "batch", "steps", "warmup",
                                             "threads", "device", "match_shira", "mmap_threshold")}
    if args.profile:
        _write_profile(args, results)
    for r in results.values():
        r.pop("profile", None)  # the tables go to --profile, not into the JSON line
    line = json.dumps({"benchmark": "adapter_cost", "setting": setting, "results": results, "ratios": targets})
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    unit = "peak RSS during training steps" if args.device == "cpu" else "max_memory_allocated"
    print(f"\nDINOv2 hidden={args.hidden} layers={args.layers}, batch {args.batch} x {args.image_size}², {args.device}; memory = {unit}")
    print(f"{'method':<18}{'trainable':>12}{'peak MiB':>10}{'overhead MiB':>14}{'step s (median)':>17}"
          f"{'file KiB':>10}{'setup peak MiB':>16}")
    for m, r in results.items():
        oh = r["overhead_bytes"] / 2**20 if r["overhead_bytes"] is not None else float("nan")
        print(f"{m:<18}{r['trainable_backbone']:>12,}{r['peak_bytes'] / 2**20:>10.0f}{oh:>14.0f}"
              f"{r['step_s_median']:>17.3f}{r['adapter_bytes'] / 1024:>10.0f}"
              f"{(r['setup_peak_rss_bytes'] or 0) / 2**20:>16.0f}")
    print("\ntarget ratios (same run):")
    for k, v in targets.items():
        print(f"  {k:<42} {v:.3f}" if v is not None else f"  {k:<42} n/a")


if __name__ == "__main__":
    main()
