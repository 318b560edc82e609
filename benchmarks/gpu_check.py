"""The first GPU run (issue 15), as one prepared command: correctness on CUDA, the whole-run cost table at DINOv2-L
size, and EVA02-L through timm. `benchmarks/gpu_check.sh OUTDIR` runs this; see that file for the wheels.

    python benchmarks/gpu_check.py OUTDIR                # on a CUDA machine (< 8 min on one H200)
    python benchmarks/gpu_check.py OUTDIR --cpu-smoke    # the same three parts at tiny sizes on the CPU

Writes under OUTDIR (at most 8 files, flat, so a device run can bring them all back):
    gpu_check.json      everything: environment, test counts and failures, the run_cost results, EVA02
    gpu_check.md        the same as tables (run_cost's own table included)
    device_tests.xml    pytest's JUnit XML of tests/test_on_device.py --device cuda
    run_cost.json       benchmarks/run_cost.py's JSON line (rewritten after every method)
    fishertune_cuda_memory_stage2.pickle, _stage3.pickle   torch.cuda.memory snapshots of an extra FisherTune run
                        at the end of stage 2 and 3 (CUDA only; load them in https://pytorch.org/memory_viz)
    fishertune_torch_profile.md   torch.profiler tables (CUDA time) of another extra FisherTune run's stage-2 and
                        stage-3 steps (CUDA only)
    gpu_check.log       the parts' output
Part (d), `crossover`, runs benchmarks/sddmm_crossover.py on the device (SDDMM vs dense dW + gather for one Linear
layer at DINOv2-L shapes); its table is in gpu_check.md / .json, with the density to put into
`SDDMM_MAX_DENSITY["cuda"]` (tuner/sparse_delta.py), which is unmeasured until this runs.
Each part runs in its own process with its own time limit, so one failing part does not hide the others; the exit
status is non-zero if any part failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # run_cost_report (the whole-run arithmetic)
PAPER_GB = {"full": 14.7, "rein": 10.0, "fishertune": 12.5}  # supplementary Table 3, DINOv2-L, batch 4, 512²


def environment(device: str) -> dict:
    import torch

    env = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "device": device, "cpu_count": os.cpu_count()}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for name in ("transformers", "peft", "accelerate", "datasets", "evaluate", "timm", "scipy"):
        try:
            env[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - reported, not raised
            env[name] = f"not importable: {type(e).__name__}: {e}"[:200]
    return env


def _run(cmd: list[str], log, timeout: int, env=None) -> tuple[int, float]:
    """Run a part in its own process group; on timeout the whole group (its workers too) is killed."""
    import signal

    t0 = time.time()
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})},
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = 124
        log.write(f"\n[gpu_check] timed out after {timeout} s: killed\n")
    log.flush()
    return rc, time.time() - t0


# ---------------------------------------------------------------------------------------------- (a) the tests
def part_tests(args, log) -> dict:
    xml = args.outdir / "device_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_on_device.py",
           "--device", args.device, f"--junitxml={xml}"]
    if args.cpu_smoke:  # the whole file is the CI's anyway; a few cases are enough to exercise the script
        cmd += ["-k", "vit or estimator or option"]
    rc, wall = _run(cmd, log, args.tests_timeout)
    out = {"returncode": rc, "wall_s": wall, "command": " ".join(cmd[1:])}
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        failures = []
        for case in suite.iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                failures.append({"test": case.get("name"), "message": (bad.get("message") or "")[:600]})
        out.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        out["failed"] = failures
    return out


# --------------------------------------------------------------------------------------- (b) the cost table
def offload_variant() -> tuple[str, object] | None:
    """The FisherTuneConfig field that puts the Fisher accumulators on the host, if this checkout has one."""
    from peft_fishertune import FisherTuneConfig

    fields = {f.name: f for f in dataclasses.fields(FisherTuneConfig)}
    for name in ("accumulator_device", "fisher_accumulator_device", "fisher_offload", "offload_accumulators",
                 "accumulator_offload"):
        if name in fields:
            default = fields[name].default
            return name, True if isinstance(default, bool) else "cpu"
    return None


def part_cost(args, log) -> dict:
    from peft_fishertune.training.config import METHODS

    # rows in the order of what the open targets need, so a timeout (rows are kept as they finish) drops the least:
    # the four baselines; the same FisherTune run with activation checkpointing of the backbone blocks in stages 1
    # and 3 (issue 23's memory target below the activation floor; the estimator turns it off for its own passes and
    # checkpoints per block itself); torch.profiler over FisherTune's stage-2 and stage-3 steps (where a GPU step's
    # time goes); then host-offloaded accumulators, Rein, the allocator snapshots, and last FisherTune with the
    # per-sample Fisher (the paper configs' fisher_mode; every other FisherTune row runs --fisher-mode, batch by default)
    methods = ["freeze", "lora", "full", "fishertune", "fishertune_gc:fishertune:training.gradient_checkpointing=true"]
    notes = []
    profile = args.device == "cuda" and args.profile
    if profile:  # its step times are the profiler's: an extra row, not the one the targets use
        methods.append("fishertune_torch_profile:fishertune")
    off = offload_variant()
    if off is not None:
        methods.append(f"fishertune_offload:fishertune:{off[0]}={str(off[1]).lower() if off[1] is True else off[1]}")
    else:
        notes.append("FisherTune with host-offloaded accumulators: not run (FisherTuneConfig has no accumulator "
                     "device / offload field in this checkout)")
    if "rein" in METHODS:
        methods.append("rein")
    else:
        notes.append("Rein: not run (method 'rein' is not in this checkout's training.config.METHODS)")
    if profile:  # recording the allocator's history slows its steps: a separate row
        methods.append("fishertune_profiled:fishertune")
    if args.fisher_mode != "per_sample":
        methods.append("fishertune_per_sample:fishertune:fisher_mode=per_sample")
    cmd = [sys.executable, "benchmarks/run_cost.py", "--device", args.device, "--methods", ",".join(methods),
           "--out", str(args.outdir / "run_cost.json"), "--md", str(args.workdir / "run_cost.md"),
           "--workdir", str(args.workdir / "run_cost"), "--threads", str(args.threads),
           "--fisher-mode", args.fisher_mode, "--stages", *map(str, args.stages), "--bf16"]
    if args.cpu_smoke:
        cmd += ["--quick", "--decoder", "mask2former"]
    else:
        cmd += ["--hidden", "1024", "--layers", "24", "--heads", "16", "--intermediate", "4096", "--patch", "14",
                "--decoder", "mask2former", "--crop", "512", "--batch", "4"]
    if profile:
        cmd += ["--cuda-memory-snapshot", f"fishertune_profiled={args.outdir / 'fishertune_cuda_memory.pickle'}",
                "--torch-profile", f"fishertune_torch_profile={args.outdir / 'fishertune_torch_profile.md'}"]
    rc, wall = _run(cmd, log, args.cost_timeout)
    out = {"returncode": rc, "wall_s": wall, "command": " ".join(cmd[1:]), "methods": methods, "notes": notes}
    f = args.outdir / "run_cost.json"  # written after every method, so a timeout keeps the finished rows
    if f.is_file():
        data = json.loads(f.read_text())
        out["results"], out["ratios"] = data["results"], data["ratios"]
        out["paper_targets"] = paper_targets(data["results"], args.device)
    return out


def part_crossover(args, log) -> dict:
    """(d) Where SDDMM stops paying on this device (tuner/sparse_delta.py's SDDMM_MAX_DENSITY)."""
    out_json, out_md = args.workdir / "sddmm_crossover.json", args.workdir / "sddmm_crossover.md"
    cmd = [sys.executable, "benchmarks/sddmm_crossover.py", "--device", args.device, "--out", str(out_json),
           "--md", str(out_md), "--threads", str(args.threads)]
    if args.cpu_smoke:
        cmd += ["--shapes", "64x32", "--densities", "0.05,0.5", "--reps", "2", "--tokens", "32"]
    else:  # DINOv2-L: hidden 1024, MLP 4096; batch 4 x (1 + (512/14)^2 = 1297) tokens
        cmd += ["--shapes", "1024x1024,4096x1024,1024x4096", "--tokens", "5188"]
    rc, wall = _run(cmd, log, args.crossover_timeout)
    out = {"returncode": rc, "wall_s": wall, "command": " ".join(cmd[1:])}
    if out_json.is_file():
        data = json.loads(out_json.read_text())
        out.update(crossover=data["crossover"], recommended_sddmm_max_density=data["recommended_sddmm_max_density"])
    if out_md.is_file():
        out["markdown"] = out_md.read_text()
    return out


def paper_targets(results: dict, device: str) -> dict:
    """Issue 15's targets on this run: FisherTune's whole-run peak < 12.5 GB and <= 1.15x LoRA's with offloaded
    accumulators; FisherTune's stage-3 step <= 1.1x LoRA's; the peak with activation checkpointing (fishertune_gc)
    against 12.5 GB, and its stage-3 step against the plain run's; issue 23's whole-run time <= 0.92x full's."""
    key = "whole_run_cuda_peak_allocated_bytes" if device == "cuda" else "whole_run_peak_rss_bytes"
    gb = {k: r[key] / 1e9 for k, r in results.items() if r.get(key) is not None}
    out = {"whole_run_peak_GB": gb, "memory_measure": key}
    ft = "fishertune_offload" if "fishertune_offload" in gb else "fishertune"
    if ft in gb:
        out[f"{ft}_peak_below_paper_12.5GB"] = gb[ft] < PAPER_GB["fishertune"]
        if "lora" in gb:
            out[f"{ft}_peak_over_lora (<= 1.15)"] = gb[ft] / gb["lora"]
    if "fishertune_gc" in gb:  # with activation checkpointing: the peak against the paper's, and what it costs
        out["fishertune_gc_peak_below_paper_12.5GB"] = gb["fishertune_gc"] < PAPER_GB["fishertune"]
    from run_cost_report import steady_step  # run_cost's whole-run step (the selection's first step left out)

    med = {k: steady_step(r, "stage3") for k, r in results.items()}
    if med.get("fishertune_gc") and med.get("fishertune"):
        out["fishertune_gc_stage3_step_over_fishertune"] = med["fishertune_gc"] / med["fishertune"]
    if med.get("fishertune") and med.get("lora"):
        out["fishertune_stage3_step_over_lora (<= 1.1)"] = med["fishertune"] / med["lora"]
    total = {k: (r.get("whole_run_time") or {}).get("total_s") for k, r in results.items()}
    if total.get("fishertune") and total.get("full"):  # issue 23: the time at the paper's proportions
        out["fishertune_whole_run_time_over_full (<= 0.92)"] = total["fishertune"] / total["full"]
    return out


# ------------------------------------------------------------------------------------------ (c) EVA02 via timm
def eva02_worker(args) -> int:
    """Build EVA02 (random init) + Mask2Former, wrap with FisherTune, take one bf16 training step."""
    import torch
    from peft import get_peft_model

    import peft_fishertune as pf
    from peft_fishertune.models import build_segmentation_model

    dev = torch.device(args.device)
    res = {"device": args.device}
    t0 = time.time()
    if args.cpu_smoke:
        from peft_fishertune.models import tiny_backbone_config

        bb_cfg, size, batch = tiny_backbone_config(args.backbone), 56, 2
        dec = {"feature_size": 32, "mask_feature_size": 32, "hidden_dim": 32, "num_queries": 10, "decoder_layers": 2,
               "dim_feedforward": 64, "encoder_layers": 1, "encoder_feedforward_dim": 64, "num_attention_heads": 2,
               "train_num_points": 256}
        seg = build_segmentation_model(args.backbone, backbone_config=bb_cfg, decoder="mask2former", decoder_config=dec,
                                       pyramid_channels=32)
    else:
        bb_cfg, size, batch = {"model_name": "eva02_large_patch14_448", "img_size": 512}, 512, 2
        seg = build_segmentation_model("eva02", backbone_config=bb_cfg, decoder="mask2former")
    res["backbone"], res["backbone_config"], res["build_s"] = args.backbone, str(bb_cfg)[:300], time.time() - t0
    cfg = pf.FisherTuneConfig(target_modules=seg.fisher_target_modules(("linear",)),
                              modules_to_save=seg.decoder_module_names(), init_selection="random",
                              delta_min=0.15, delta_max=0.15)
    model = get_peft_model(seg, cfg).to(dev)
    s = pf.selection_summary(model)
    res.update(num_targeted=s.num_targeted, num_active=s.num_active, target_modules=len(cfg.target_modules))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(dev)
    y = torch.randint(0, 19, (batch, size, size), generator=g).to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.time()
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        loss = model(pixel_values=x, labels=y).loss
    loss.backward()
    values = [p for n, p in model.named_parameters() if ".ft_values." in n]
    res["ft_values_with_grad"] = sum(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in values)
    res["ft_values"] = len(values)
    opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        res["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    res.update(step_s=time.time() - t0, loss=float(loss), batch=batch, crop=size,
               ok=bool(torch.isfinite(loss)) and res["ft_values_with_grad"] == len(values) > 0)
    Path(args.result_file).write_text(json.dumps(res))
    return 0 if res["ok"] else 1


def part_eva02(args, log) -> dict:
    backbone, skipped = "eva02", None
    try:
        import timm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - timm needs torchvision, absent on the CPU machines
        skipped = f"timm not importable: {type(e).__name__}: {e}"[:300]
        if not args.cpu_smoke:
            return {"skipped": skipped}
        backbone = "dinov2"  # CPU smoke without timm: the same build / wrap / step code on a tiny DINOv2
    result = args.workdir / "eva02.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), str(args.outdir), "--eva02-worker", "--result-file",
           str(result), "--device", args.device, "--backbone", backbone] + (["--cpu-smoke"] if args.cpu_smoke else [])
    rc, wall = _run(cmd, log, args.eva_timeout)
    out = {"returncode": rc, "wall_s": wall}
    if skipped:
        out["skipped"] = f"EVA02 not built ({skipped}); the same step code ran on a tiny {backbone} instead"
    if result.is_file():
        out.update(json.loads(result.read_text()))
    return out


# ------------------------------------------------------------------------------------------------- reporting
def markdown(report: dict) -> str:
    env, t, c, e = report["environment"], report["tests"], report["cost"], report["eva02"]
    lines = ["# GPU check" + (" (CPU smoke run: tiny sizes, not a GPU result)" if report["cpu_smoke"] else ""), "",
             f"Date {env['date_utc']} UTC; {env.get('gpu', 'CPU')}; torch {env['torch']}, CUDA {env['cuda']}, "
             f"transformers {env['transformers']}, peft {env['peft']}, timm {env['timm']}.", "",
             f"Command: `{report['command']}` (wall {report['wall_s']:.0f} s)", "",
             "## (a) Correctness on the device (tests/test_on_device.py)", "",
             f"`{t.get('command', '')}`: {t.get('tests', '?')} tests, {t.get('failures', '?')} failures, "
             f"{t.get('errors', '?')} errors, {t.get('skipped', '?')} skipped (exit {t.get('returncode')}).", ""]
    for f in t.get("failed", []):
        lines.append(f"- FAILED `{f['test']}`: {f['message'][:300]}")
    lines += ["", "## (b) Whole-run cost", "", f"`{c.get('command', '')}` (exit {c.get('returncode')})", ""]
    md = Path(report["workdir"]) / "run_cost.md"
    if md.is_file() and "command" in c:
        lines += [md.read_text().split("\n", 2)[2].strip(), ""]
    for n in c.get("notes", []):
        lines.append(f"- {n}")
    if c.get("paper_targets"):
        pt = c["paper_targets"]
        lines += ["", f"Whole-run peak ({pt['memory_measure']}) against the paper's Table 3 (DINOv2-L, batch 4, 512²):",
                  "", "| method | this run GB | paper GB |", "|---|---:|---:|"]
        for k, v in pt["whole_run_peak_GB"].items():
            paper = PAPER_GB.get(k.split("_")[0] if k != "fishertune_offload" else "fishertune")
            lines.append(f"| {k} | {v:.2f} | {paper if paper is not None else ''} |")
        lines += [""] + [f"- `{k}`: {v:.3f}" if isinstance(v, float) else f"- `{k}`: {v}"
                         for k, v in pt.items() if k not in ("whole_run_peak_GB", "memory_measure")]
    x = report.get("crossover", {})
    lines += ["", "## (d) SDDMM vs dense dW + gather (benchmarks/sddmm_crossover.py)", ""]
    if "skipped" in x:
        lines.append(f"skipped: {x['skipped']}")
    else:
        lines += [f"`{x.get('command', '')}` (exit {x.get('returncode')})", "",
                  (x.get("markdown") or "").split("\n", 2)[-1].strip()]
    lines += ["", "## (c) EVA02 through timm", ""]
    if "skipped" in e:
        lines.append(f"skipped: {e['skipped']}")
    if e.get("returncode") is not None:
        lines.append(f"exit {e.get('returncode')}; ok={e.get('ok')}; {e.get('num_active', '?'):,} active of "
                     f"{e.get('num_targeted', '?'):,} targeted; step {e.get('step_s', float('nan')):.2f} s; loss "
                     f"{e.get('loss', float('nan')):.3f}; peak {e.get('cuda_peak_allocated_bytes', 0) / 1e9:.2f} GB"
                     if e.get("ok") is not None else f"exit {e.get('returncode')}: see gpu_check.log")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: checks the script, not the GPU")
    ap.add_argument("--device", default=None, help="default cuda (cpu with --cpu-smoke)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpu_check_work"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--stages", type=int, nargs=3, default=[3, 3, 5], help="steps of stages 1, 2, 3 per run_cost row (more stage-3 steps: a steadier median past the selection step)")
    ap.add_argument("--fisher-mode", default="batch", choices=["batch", "per_sample"])
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="skip the extra FisherTune run that records a CUDA memory snapshot")
    ap.add_argument("--parts", default="tests,cost,eva02,crossover",
                    help="comma-separated subset of tests,cost,eva02,crossover")
    ap.add_argument("--crossover-timeout", type=int, default=None, help="s; default 90 (cuda), 300 (--cpu-smoke)")
    ap.add_argument("--tests-timeout", type=int, default=None, help="s; default 100 (cuda), 600 (--cpu-smoke)")
    ap.add_argument("--cost-timeout", type=int, default=None, help="s; default 400 (cuda), 900 (--cpu-smoke)")
    ap.add_argument("--eva-timeout", type=int, default=None, help="s; default 60 (cuda), 300 (--cpu-smoke)")
    ap.add_argument("--eva02-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    ap.add_argument("--backbone", default="eva02", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.cpu_smoke else "cuda")
    args.threads = args.threads or (2 if args.cpu_smoke else 8)
    scale = 1 if args.device == "cuda" else 6  # CPU: the same parts at tiny sizes, on a slow shared machine
    args.tests_timeout = args.tests_timeout or 100 * scale
    args.cost_timeout = args.cost_timeout or (400 if scale == 1 else 900)
    args.eva_timeout = args.eva_timeout or (60 if scale == 1 else 300)
    args.crossover_timeout = args.crossover_timeout or (90 if scale == 1 else 300)
    sys.path.insert(0, str(ROOT / "src"))
    if args.eva02_worker:
        return eva02_worker(args)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch.cuda.is_available() is False; use --cpu-smoke for the CPU run", file=sys.stderr)
        return 2
    args.outdir.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    t0 = time.time()
    report = {"command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "cpu_smoke": args.cpu_smoke, "environment": environment(args.device)}
    with open(args.outdir / "gpu_check.log", "w") as log:
        parts = {"tests": part_tests, "cost": part_cost, "eva02": part_eva02, "crossover": part_crossover}
        unknown = set(args.parts.split(",")) - set(parts)
        if unknown:
            raise SystemExit(f"--parts: unknown {sorted(unknown)}; expected a subset of {list(parts)}")
        for name, part in parts.items():
            if name not in args.parts.split(","):
                report[name] = {"skipped": "not in --parts"}
                continue
            print(f"[gpu_check] {name} ... ({time.time() - t0:.0f} s)", flush=True)
            try:
                report[name] = part(args, log)
            except Exception as e:  # noqa: BLE001 - a broken part is reported, the others still run
                report[name] = {"returncode": 1, "error": f"{type(e).__name__}: {e}"}
            print(f"[gpu_check] {name}: exit {report[name].get('returncode', 'skipped')}", flush=True)
    report["wall_s"] = time.time() - t0
    report["outdir"], report["workdir"] = args.outdir, str(args.workdir)
    md = markdown(report)
    report["outdir"] = str(args.outdir)
    (args.outdir / "gpu_check.md").write_text(md)
    (args.outdir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print(md)
    failed = [n for n in ("tests", "cost", "eva02", "crossover") if report[n].get("returncode", 0) != 0]
    if failed:
        print(f"gpu_check: failed parts: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
