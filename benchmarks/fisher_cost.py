"""Cost of one DR-FIM estimation step (x and x' passes) relative to one plain training step.

Model: DINOv2-Base-size encoder (hidden 768, 12 layers, 12 heads, MLP 3072, 224², patch 14),
randomly initialized, with a 1x1-conv head and CE loss on 224x224 labels; batch 2.
Targets: every nn.Linear weight of the encoder (72 tensors, 85M elements).
Training step: AdamW on the targets + head (zero_grad, forward, backward, step) -- a dense stand-in for a
stage-3 step (stage 3 trains a sparse subset of the targets; `--cases floor` also times the real one).
Decoder step: AdamW on the head only.
A stage-2 step is a decoder step plus an estimator step; the target is <= 2.5x a stage-3 step.

`--cases floor` times what any DR-FIM step must do at least, whatever the memory: two forward + backward
passes that produce every targeted weight's gradient (x and x'; the gradients are dropped, nothing is squared
or accumulated) and, for the variational estimate, one noise draw of every targeted weight (one weight sample
per step, shared by both passes). Plus the decoder step, that is a lower bound on a stage-2 step; the stage-3
step it is divided by is FisherTune's own at its largest active set (delta_max = 15 %), the most expensive
stage-3 step, so the ratio is a lower bound too.

    python benchmarks/fisher_cost.py [--reps 2] [--threads 2] [--quick] [--cases default,empirical_batch,floor]

Prints one JSON line, then a table. Case `trainer` is the estimator the trainer builds for stage 2 from a
`FisherTuneConfig(fisher_mode="batch")` (variational natural, bfloat16 accumulators, block checkpointing).

`--profile FILE` profiles --profile-steps stage-2 steps of the trainer's estimator (decoder step + estimator step)
under torch.profiler and writes to FILE: the step's wall time, the time inside the estimator's labelled regions
(`fishertune::weight_sample`: making θ = θ̂ + σ⊙ξ; `fishertune::fold`: squaring and folding each gradient into the
accumulators), and the top operators by self CPU time.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from _seg_model import LinearSegModel, encoder_linear_weights, make_batches
from transformers import Dinov2Config

from peft_fishertune.fisher import EmpiricalFisherEstimator, VariationalFisherEstimator
from peft_fishertune.fisher.seeds import derived_normal


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def trainer_estimator(model, params):
    """The stage-2 estimator of the trainer: make_estimator from a FisherTuneConfig with fisher_mode='batch'."""
    import peft_fishertune as pf
    from peft_fishertune.fisher import make_estimator

    config = pf.FisherTuneConfig(target_modules=["query", "key", "value", "dense", "fc1", "fc2"], fisher_mode="batch")
    return make_estimator(model, config, params=params)


REGIONS = ("fishertune::weight_sample", "fishertune::fold")


def profile_stage2(model, params, batch, args, cfg) -> None:
    """--profile: stage-2 steps (decoder step + the trainer's estimator step) under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    head_opt = torch.optim.AdamW(model.head.parameters(), lr=1e-4)
    est = trainer_estimator(model, params)

    def stage2_step():
        head_opt.zero_grad(set_to_none=True)
        model(**batch)["loss"].backward()
        head_opt.step()
        est.step(batch)

    stage2_step()  # warm-up
    walls = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.profile_steps):
            t = time.perf_counter()
            stage2_step()
            walls.append(time.perf_counter() - t)
    est.release()
    events = prof.key_averages()
    n = args.profile_steps
    regions = {e.key: (e.cpu_time_total / 1e6 / n, e.count // n) for e in events if e.key in REGIONS}
    table = events.table(sort_by="self_cpu_time_total", row_limit=args.profile_rows, max_name_column_width=60)
    wall = statistics.median(walls)
    lines = [
        "# torch.profiler: one stage-2 step (decoder step + the trainer's DR-FIM estimator step)", "",
        f"Command: `python benchmarks/fisher_cost.py {' '.join(sys.argv[1:])}`" + (f" ({args.label})" if args.label else ""),
        "",
        f"DINOv2 hidden {cfg.hidden_size}, {cfg.num_hidden_layers} blocks, {cfg.image_size}², batch 2, 1x1-conv head; "
        f"{len(params)} targeted weights ({sum(p.numel() for p in params.values()) / 1e6:.1f} M elements); "
        f"estimator: make_estimator(FisherTuneConfig(fisher_mode='batch')) = variational natural, bfloat16 "
        f"accumulators, block checkpointing; {args.threads} threads, torch {torch.__version__}; "
        f"{n} steps profiled after one warm-up; load average before: {os.getloadavg()[0]:.2f}.", "",
        f"Wall time per stage-2 step under the profiler (median): **{wall:.2f} s**", "",
        "| region (per step) | CPU s (total incl. children) | calls |", "|---|---:|---:|",
    ]
    for key in REGIONS:
        s_, c = regions.get(key, (0.0, 0))
        lines.append(f"| `{key}` | {s_:.2f} | {c} |")
    lines += ["", f"Top {args.profile_rows} operators by self CPU time ({n} steps):", "", "```", table, "```", ""]
    with open(args.profile, "w") as f:
        f.write("\n".join(lines))
    print(json.dumps({"benchmark": "fisher_cost_profile", "wall_s_median": round(wall, 3),
                      "regions_s_per_step": {k: round(v[0], 3) for k, v in regions.items()}}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a small model (for a smoke run)")
    ap.add_argument("--cases", default="all", help="comma-separated estimator cases to time (default: all)")
    ap.add_argument("--profile", default=None, help="write a torch.profiler table of the trainer's stage-2 step here")
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--label", default="", help="a note for the --profile file's header (code version, load)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        cfg = Dinov2Config(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=384,
                           image_size=112, patch_size=14)
    else:
        cfg = Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           image_size=224, patch_size=14)
    model = LinearSegModel(cfg).eval()
    params = encoder_linear_weights(model)
    batch = make_batches(1, 2, cfg.image_size)[0]

    opt = torch.optim.AdamW(list(params.values()) + list(model.head.parameters()), lr=1e-5)

    def train_step():
        opt.zero_grad(set_to_none=True)
        model(**batch)["loss"].backward()
        opt.step()

    if args.profile:
        opt = None
        model.backbone.requires_grad_(False)
        profile_stage2(model, params, batch, args, cfg)
        return
    rows = [("train step (AdamW, targets + head)", timed(train_step, args.reps), "")]
    opt.zero_grad(set_to_none=True)
    opt = None  # free the optimizer state before the estimators run
    head_opt = torch.optim.AdamW(model.head.parameters(), lr=1e-4)

    def decoder_step():
        head_opt.zero_grad(set_to_none=True)
        model(**batch)["loss"].backward()
        head_opt.step()

    model.backbone.requires_grad_(False)  # stage 2: the whole backbone is frozen, the decoder trains
    decoder_s = timed(decoder_step, args.reps)
    rows.append(("decoder step (AdamW, head only)", decoder_s, ""))
    floor = {}
    if "floor" in args.cases.split(","):
        targets = list(params.values())

        def weight_grad_pass():
            for p in targets:
                p.requires_grad_(True)
            grads = torch.autograd.grad(model(**batch)["loss"], targets)
            for p in targets:
                p.requires_grad_(False)
            return grads

        def noise_draw():
            return [derived_normal(p.shape, 0, i) for i, p in enumerate(targets)]

        floor["pass"] = timed(weight_grad_pass, args.reps)
        floor["noise"] = timed(noise_draw, args.reps)
        floor["empirical"] = decoder_s + 2 * floor["pass"]
        floor["variational"] = floor["empirical"] + floor["noise"]

    cases = [
        ("default of the estimator API: DR-FIM variational natural, per_sample (auto)",
         lambda: VariationalFisherEstimator(model, params=params)),
        ("DR-FIM empirical, batch", lambda: EmpiricalFisherEstimator(model, params=params, mode="batch")),
        ("DR-FIM empirical, per_sample (loop)",
         lambda: EmpiricalFisherEstimator(model, params=params, mode="per_sample", per_sample_method="loop")),
        ("DR-FIM empirical, per_sample (vmap)",
         lambda: EmpiricalFisherEstimator(model, params=params, mode="per_sample", per_sample_method="vmap")),
        ("DR-FIM variational natural, batch",
         lambda: VariationalFisherEstimator(model, params=params, method="natural", mode="batch")),
        ("DR-FIM variational natural, batch, no estimator checkpointing",
         lambda: VariationalFisherEstimator(model, params=params, method="natural", mode="batch",
                                            checkpointing=False)),
        ("DR-FIM variational natural, per_sample (loop)",
         lambda: VariationalFisherEstimator(model, params=params, method="natural", mode="per_sample",
                                            per_sample_method="loop")),
        ("DR-FIM variational reparam",
         lambda: VariationalFisherEstimator(model, params=params, method="reparam")),
        ("DR-FIM variational reparam, antithetic",
         lambda: VariationalFisherEstimator(model, params=params, method="reparam", antithetic=True)),
    ]
    cases.append(("DR-FIM as the trainer builds it (FisherTuneConfig, batch: natural, bf16, checkpointed)",
                  lambda: trainer_estimator(model, params)))
    keys = ["default", "empirical_batch", "empirical_loop", "empirical_vmap", "natural_batch", "natural_no_ckpt",
            "natural_loop",
            "reparam", "reparam_antithetic", "trainer"]
    wanted = keys if args.cases == "all" else [c for c in args.cases.split(",") if c != "floor"]
    unknown = [c for c in wanted if c not in keys]
    if unknown:
        ap.error(f"--cases: unknown {unknown}; choose from {keys + ['floor']}")
    for key, (name, make) in zip(keys, cases):
        if key not in wanted:
            continue
        est = make()
        rows.append((name, timed(lambda: est.step(batch), args.reps), ""))
        est.release()
        est = None
    if floor:  # last: wrapping changes the model. The most expensive stage-3 step (delta_max active), so the
        # floor ratio below is conservative.
        from peft import get_peft_model

        import peft_fishertune as pf

        pm = get_peft_model(model, pf.FisherTuneConfig(
            target_modules=["query", "key", "value", "dense", "fc1", "fc2"], init_selection="random",
            delta_min=0.15, delta_max=0.15))
        for p in model.head.parameters():
            p.requires_grad_(True)
        opt3 = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-5)

        def stage3_step():
            opt3.zero_grad(set_to_none=True)
            pm(**batch)["loss"].backward()
            opt3.step()

        floor["stage3"] = timed(stage3_step, args.reps)
        rows.append(("stage-3 step, FisherTune at delta_max = 15 % (AdamW)", floor["stage3"], ""))
    base = rows[0][1]
    ref = floor.get("stage3", base)  # the real stage-3 step when measured, else the dense stand-in
    stage2 = {n: round((t + decoder_s) / ref, 3) for n, t, _ in rows[2:] if not n.startswith("stage-3")}
    record = {
        "benchmark": "fisher_cost",
        "model": f"DINOv2 hidden={cfg.hidden_size} layers={cfg.num_hidden_layers} image={cfg.image_size}",
        "batch": 2,
        "targets": len(params),
        "target_elements": sum(p.numel() for p in params.values()),
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "seconds": {n: round(t, 4) for n, t, _ in rows},
        "x_train_step": {n: round(t / base, 3) for n, t, _ in rows},
        "stage2_step_x_stage3_step": stage2,
    }
    if floor:
        record["floor_seconds"] = {k: round(v, 4) for k, v in floor.items()}
        record["floor_stage2_x_stage3_step"] = {k: round(floor[k] / floor["stage3"], 3)
                                                for k in ("empirical", "variational")}
    print(json.dumps(record))
    print(f"\n| {'step':<56} | {'seconds':>8} | {'x train step':>12} |")
    print(f"|{'-' * 58}|{'-' * 10}|{'-' * 14}|")
    for n, t, _ in rows:
        print(f"| {n:<56} | {t:8.3f} | {t / base:12.2f} |")
    print(f"\nstage-2 step (decoder step + estimator step) / {'FisherTune stage-3 step at 15 %' if floor else 'train step'}"
          " (target <= 2.5):")
    for n, r in stage2.items():
        print(f"  {n}: {r:.2f}")
    if floor:
        print(f"\nlower bound (floor): one forward + backward with every targeted weight's gradient "
              f"{floor['pass']:.3f} s, one noise draw of every targeted weight {floor['noise']:.3f} s")
        for k in ("empirical", "variational"):
            print(f"  stage-2 step of any {k} DR-FIM estimator >= {floor[k]:.3f} s = "
                  f"{floor[k] / floor['stage3']:.2f}x the FisherTune stage-3 step at 15 % ({floor['stage3']:.3f} s)")


if __name__ == "__main__":
    main()
