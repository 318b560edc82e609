"""What a whole training run costs, per method and per stage: `scripts/train.py`'s run, measured from inside.

    python benchmarks/run_cost.py                 # DINOv2-Base size, linear decoder, 224² crops, batch 2, CPU
    python benchmarks/run_cost.py --quick         # a tiny model, seconds per method (tests/test_run_cost.py)
    python benchmarks/run_cost.py --device cuda --hidden 1024 --layers 24 --heads 16 --decoder mask2former \\
        --crop 512 --batch 4 --bf16               # DINOv2-L size on a GPU (benchmarks/gpu_check.sh runs this)

Each method runs in its own process (so its memory is its own): the worker loads the same kind of YAML config that
`scripts/train.py` takes (written under --workdir) and calls `run_experiment`, the function `scripts/train.py`
calls, with one extra `TrainerCallback` that marks the segments of the run:

    setup      process start -> train begins (imports, model build, wrapping, saving the random-init base model)
    stage1     decoder warm-up steps
    stage2     Fisher estimation steps (LoRA / full: the backbone trains from here on)
    selection  end of the last stage-2 step -> the first stage-3 step begins (ranking, select_parameters)
    stage3     sparse fine-tuning steps
    evaluate   train end -> evaluation done (one small held-out image: configs must name an evaluation domain)
    save       evaluation done -> run_experiment returns (save_pretrained, results.json)

How memory is measured (say so wherever the figures are quoted):
- CPU: peak RSS per segment, from the kernel's own high-water mark. At each segment boundary the worker reads
  VmHWM from /proc/self/status (the peak RSS since the last reset) and resets it to the current RSS by writing 5
  to /proc/self/clear_refs. Nothing else is done to the process (no malloc_trim), so freed-but-kept heap counts, as
  it does for a user. The whole-run peak is the largest segment peak: every moment of the process lies in exactly
  one segment, so it equals the whole-process peak RSS that `/usr/bin/time -f %M` reports for a run without
  resets (only interpreter shutdown after the last reading is missed). `--no-stage-reset` runs without resets and
  reports the kernel's ru_maxrss of the process (as /usr/bin/time does) to check that.
- CUDA (`--device cuda`): torch.cuda.max_memory_allocated() per segment, reset by reset_peak_memory_stats() at
  each boundary (and max_memory_reserved beside it); the host's peak RSS per segment as above.
Step time: from the step's on_step_begin (after the stage logic, so the selection is not in it) to its
on_step_end (forward, backward, estimator step, optimizer step; data loading happens before and is excluded);
CUDA is synchronized at both ends. Median per stage.

Whole-run time (the headline, beside memory): each method's training time at the paper's stage proportions
(--paper-stages, default T1:T2:T3 = 10k:2k:28k steps), T1 x median stage-1 step + T2 x median stage-2 step + T3 x
median stage-3 step + the measured "selection" segment (once) + each stage's first step's excess over the stage's
median (once: the selection inside the first stage-3 step, the fused kernels' compile in the first stage-2 step),
with its ratios to full fine-tuning and to LoRA.
A growing run's δ grows from δ_min to δ_max over --stages' T3 steps; `--fixed-delta 0.05,0.15` adds FisherTune rows
with δ_min = δ_max = each value (label fishertune_d<δ>), whose stage-3 step is at that density throughout. Where the
trainer runs the selection inside the first stage-3 step (after on_step_begin), the "selection" segment holds only
the step boundary and the selection's time is in that first step, which counts once at its excess.
A growing row recomputes δ(t) every second stage-3 step here (`selection_update_steps: 2`; every step with T3 <= 2),
so its steps alternate an update step and a plain one, and the worker times each step's update
(`set_active_fraction`). A real run of 28k steps recomputes it every 28 (the library's default) or 100 (the shipped
paper configs) steps, and a step after an update also reads the base values at the new active entries anew. So the
report charges T3 x the plain steps' mean (with `--stages 2 3 11` they sit at t = 0.1, 0.3, ..., 0.9 of the
schedule) plus the run's updates at the default interval, each at its measured excess over the neighbouring plain
steps (`run_cost_report.growth_steps`). Runs that recomputed δ(t) at every step (before 2026-12-05's thirteenth
round) keep their arithmetic, with the figure at the paper configs' interval as a reading aid.

Targets (ratios from this one run; the issues'): FisherTune's whole-run overhead over the frozen run <= 0.75x full
fine-tuning's and <= 1.5x LoRA r=16's; its median stage-2 step <= 2.5x its median stage-3 step; its whole-run time
at the paper's proportions <= 0.85x full fine-tuning's and <= 1.3x LoRA's; its stage-3 step at δ = 5 % <= 1.15x
LoRA's and at 15 % <= 0.9x full fine-tuning's (with --fixed-delta 0.05,0.15).
Prints one JSON line and a Markdown table; --out / --md write them to files.

`--repeats N` runs every method N times, the rounds interleaved and the method order rotated each round (one run on a
shared machine moves by as much as the targets' margins): the table shows the medians over the rounds, the JSON keeps
every round (`rounds`) and each target ratio per round (`ratios_per_round`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_T0 = time.time()  # the worker's wall clock starts at process start, before the heavy imports

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_cost_report import (  # noqa: E402,F401
    LABELS,
    PAPER_STAGES,
    SEGMENTS,
    MiB,
    combine_rounds,
    markdown,
    ratio_rounds,
    ratios,
    summarize,
    whole_run_time,
)

DEFAULT_METHODS = ["freeze", "lora", "full", "fishertune", "fim", "random"]


# ------------------------------------------------------------------------------------------- the measurements
def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key} line")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class StageMeter:
    """Memory and time of each segment of a run; `callback()` is the TrainerCallback that marks the boundaries."""

    def __init__(self, device: str, stages: tuple[int, int, int], reset: bool = True, snapshot: str | None = None,
                 profile: str | None = None, profile_skip: int = 1):
        self.device, self.stages, self.reset = device, stages, reset
        self.profile_skip = profile_skip  # steps of each stage before the profiler starts (the first holds one-offs)
        self.profile = profile  # torch.profiler tables of stage 2 and 3 (each stage's steps after its first) to FILE
        self.profiles: dict[str, str] = {}
        self._prof = None
        self.snapshot = snapshot  # CUDA: dump the allocator history at the end of stage 2 and stage 3 (FILE_<stage>)
        self.snapshots: list[str] = []
        self.segments: dict[str, dict] = {}
        self.step_times: dict[str, list[float]] = {"stage1": [], "stage2": [], "stage3": []}
        # per step: CPU seconds in user and kernel mode (all threads) and minor page faults
        self.step_rusage: dict[str, list[list[float]]] = {"stage1": [], "stage2": [], "stage3": []}
        self._ru0 = None
        # per step: seconds inside the δ(t) update (`set_active_fraction`, timed by `time_updates`), 0 where none ran
        self.step_updates: dict[str, list[float]] = {"stage1": [], "stage2": [], "stage3": []}
        self._update_s = 0.0
        self.current = "setup"
        self.t_start = _T0
        self.rss_start = 0
        self.reset_works = True
        self._step_t0 = None

    def _cuda(self):
        import torch

        return torch.cuda if self.device.startswith("cuda") and torch.cuda.is_available() else None

    def _sync(self):
        cuda = self._cuda()
        if cuda is not None:
            cuda.synchronize()

    def stage_of(self, step: int) -> int:
        t1, t2, _ = self.stages
        return 1 if step < t1 else 2 if step < t1 + t2 else 3

    def switch(self, new: str) -> None:
        """Close the current segment (record its peaks), reset the peak counters, open `new`."""
        self._sync()
        now = time.time()
        seg = {"wall_s": now - self.t_start, "rss_start_bytes": self.rss_start,
               "peak_rss_bytes": _proc_status("VmHWM"), "rss_end_bytes": _proc_status("VmRSS"),
               # file-backed resident pages (libraries, compiled kernels mapped from disk): part of RSS, and more of
               # them in a freshly installed environment, whose files are all in the page cache
               "rss_file_end_bytes": _proc_status("RssFile")}
        cuda = self._cuda()
        if cuda is not None and self.snapshot and self.current in ("stage2", "stage3"):
            stem, ext = os.path.splitext(self.snapshot)
            path = f"{stem}_{self.current}{ext or '.pickle'}"
            cuda.memory._dump_snapshot(path)  # the trace leading to this boundary, with the blocks alive now
            self.snapshots.append(path)
        if cuda is not None:
            seg["cuda_peak_allocated_bytes"] = cuda.max_memory_allocated()
            seg["cuda_peak_reserved_bytes"] = cuda.max_memory_reserved()
            seg["cuda_allocated_end_bytes"] = cuda.memory_allocated()
            cuda.reset_peak_memory_stats()
        if self.current in self.segments:  # a segment entered twice (not expected): merge
            old = self.segments[self.current]
            for k in seg:
                seg[k] = old[k] + seg[k] if k == "wall_s" else max(old[k], seg[k]) if "peak" in k else seg[k]
        self.segments[self.current] = seg
        if self.reset:
            self.reset_works = _reset_hwm() and self.reset_works
        self.current, self.t_start, self.rss_start = new, time.time(), _proc_status("VmRSS")

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class _StageCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                meter.switch(f"stage{meter.stage_of(state.global_step)}")

            def on_step_begin(self, args, state, control, **kwargs):
                if meter.current == "selection":  # the stage logic (selection) has just run
                    meter.switch("stage3")
                meter._profile_begin(state.global_step)
                meter._sync()
                meter._ru0 = resource.getrusage(resource.RUSAGE_SELF)
                meter._update_s = 0.0
                meter._step_t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                meter._sync()
                done = state.global_step - 1  # the step that just finished
                meter.step_times[f"stage{meter.stage_of(done)}"].append(time.perf_counter() - meter._step_t0)
                ru, ru0 = resource.getrusage(resource.RUSAGE_SELF), meter._ru0
                meter.step_rusage[f"stage{meter.stage_of(done)}"].append(
                    [ru.ru_utime - ru0.ru_utime, ru.ru_stime - ru0.ru_stime, ru.ru_minflt - ru0.ru_minflt])
                meter.step_updates[f"stage{meter.stage_of(done)}"].append(meter._update_s)
                nxt = meter.stage_of(state.global_step)
                if meter._prof is not None and (nxt != meter.stage_of(done) or state.global_step >= state.max_steps):
                    meter._profile_end(meter.stage_of(done))
                if state.global_step < state.max_steps and nxt != meter.stage_of(done):
                    meter.switch("selection" if nxt == 3 else f"stage{nxt}")

            def on_train_end(self, args, state, control, **kwargs):
                meter.switch("evaluate")

            def on_evaluate(self, args, state, control, **kwargs):
                if meter.current == "evaluate":
                    meter.switch("save")

        return _StageCallback()

    def time_updates(self) -> None:
        """Time every δ(t) update from here on: the schedule calls `tuner.selection.set_active_fraction` (looked up
        at each call) inside the step (FisherTuneTrainer's training_step), so the step times include it; the time is
        also kept per step, for the whole-run figure at another update interval (`whole_run_time`)."""
        from peft_fishertune.tuner import selection

        inner = selection.set_active_fraction

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self._update_s += time.perf_counter() - t0

        selection.set_active_fraction = timed

    def _profile_begin(self, step: int) -> None:
        """Start the profiler after `profile_skip` steps of stage 2 and of stage 3 (default 1: the first holds a compile
        or the selection; more leaves out the first steps' recompiles too); it stops at the stage's last step."""
        t1, t2, _ = self.stages
        k = self.profile_skip
        if self.profile and self._prof is None and step in (t1 + k, t1 + t2 + k) and self.stage_of(step) in (2, 3):
            from torch.profiler import ProfilerActivity, profile

            cuda = self._cuda() is not None
            self._prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
            self._prof.__enter__()
            self._prof_steps = (step, self.stage_of(step))

    def _profile_end(self, stage: int) -> None:
        self._sync()
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        sort = "self_cuda_time_total" if self._cuda() is not None else "self_cpu_time_total"
        n = len(self.step_times[f"stage{stage}"]) - self.profile_skip
        self.profiles[f"stage{stage}"] = (f"{n} step(s) from step {self._prof_steps[0]}, sorted by {sort}\n\n"
                                          + prof.key_averages().table(sort_by=sort, row_limit=30,
                                                                      max_name_column_width=60))

    def finish(self) -> dict:
        if self.current == "evaluate":  # nothing was evaluated: what followed training was the saving
            self.current = "save"
        self.switch("done")
        out = {"segments": self.segments, "reset_per_segment": self.reset and self.reset_works,
               "step_s": {k: v for k, v in self.step_times.items()},
               "step_user_sys_s_minflt": {k: v for k, v in self.step_rusage.items()},
               "step_update_s": {k: v for k, v in self.step_updates.items()},
               "step_s_median": {k: (statistics.median(v) if v else None) for k, v in self.step_times.items()},
               "whole_run_peak_rss_bytes": max(s["peak_rss_bytes"] for s in self.segments.values())}
        peak = max(self.segments.values(), key=lambda s: s["peak_rss_bytes"])
        if "rss_file_end_bytes" in peak:  # the peak less the file-backed pages of its segment's end
            out["whole_run_peak_rss_less_file_bytes"] = peak["peak_rss_bytes"] - peak["rss_file_end_bytes"]
        if any("cuda_peak_allocated_bytes" in s for s in self.segments.values()):
            out["whole_run_cuda_peak_allocated_bytes"] = max(s.get("cuda_peak_allocated_bytes", 0)
                                                            for s in self.segments.values())
            out["whole_run_cuda_peak_reserved_bytes"] = max(s.get("cuda_peak_reserved_bytes", 0)
                                                           for s in self.segments.values())
        return out


def worker(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    from peft_fishertune.training import load_config, run_experiment

    cfg = load_config(args.config)
    t = cfg.training  # a dict, or typed FisherTuneTrainingArguments where the config parser makes them
    t = t if isinstance(t, dict) else vars(t)
    snapshot = args.cuda_memory_snapshot and args.device.startswith("cuda") and torch.cuda.is_available()
    meter = StageMeter(args.device, (t["stage1_steps"], t["stage2_steps"], t["stage3_steps"]),
                       reset=not args.no_stage_reset, snapshot=args.cuda_memory_snapshot if snapshot else None,
                       profile=args.torch_profile, profile_skip=args.profile_skip)
    meter.time_updates()
    if snapshot:  # the last allocations with their Python stacks, for https://pytorch.org/memory_viz
        torch.cuda.memory._record_memory_history(max_entries=30_000, stacks="python")
    result = run_experiment(cfg, callbacks=[meter.callback()], report_to=[])
    out = meter.finish()
    if snapshot:
        torch.cuda.memory._record_memory_history(enabled=None)
        out["cuda_memory_snapshots"] = meter.snapshots
    out.update(wall_s=time.time() - _T0, selection=result.selection, trainable=_trainable_note(result))
    if args.torch_profile:
        Path(args.torch_profile).write_text(
            f"# torch.profiler, `{args.config}`\n\n" + "\n".join(
                f"## {k}\n\n```\n{v}\n```\n" for k, v in meter.profiles.items()))
        out["torch_profile"] = args.torch_profile
    Path(args.result_file).write_text(json.dumps(out))
    return 0


def _trainable_note(result) -> dict:
    s = result.selection or {}
    return {k: s[k] for k in ("num_active", "num_candidates", "num_targeted") if k in s}


# ------------------------------------------------------------------------------------------------- the parent
def method_spec(spec: str) -> tuple[str, str, dict]:
    """'fishertune' -> ('fishertune', 'fishertune', {}); 'LABEL:METHOD:key=val;key=val' -> FisherTuneConfig fields
    (values parsed as YAML) for a variant row, e.g. 'fishertune_offload:fishertune:fisher_accumulator_device=cpu'."""
    import yaml

    parts = spec.split(":")
    if len(parts) == 1:
        return spec, spec, {}
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise SystemExit(f"--methods entry {spec!r}: expected METHOD or LABEL:METHOD[:key=value;...]")
    extra = {}
    for kv in filter(None, (parts[2].split(";") if len(parts) == 3 else [])):
        if "=" not in kv:
            raise SystemExit(f"--methods entry {spec!r}: {kv!r} is not key=value")
        k, v = kv.split("=", 1)
        extra[k] = yaml.safe_load(v)
    return parts[0], parts[1], extra


def run_config(args, method: str, extra: dict, out: Path, data_root: Path) -> dict:
    model = {"backbone": "dinov2", "decoder": args.decoder, "pyramid_channels": args.pyramid_channels,
             "tiny_backbone": {"hidden_size": args.hidden, "num_hidden_layers": args.layers,
                               "num_attention_heads": args.heads, "intermediate_size": args.intermediate,
                               "patch_size": args.patch, "image_size": args.crop}}
    if args.decoder_config:
        model["decoder_config"] = json.loads(args.decoder_config)
    if method == "rein" and args.decoder == "mask2former":  # Rein's recipe: its 100 tokens are the decoder's queries
        model["decoder_config"] = {**model.get("decoder_config", {}), "num_queries": 100, "replace_query_feat": True}
    extra = dict(extra)
    train_extra = {k.split(".", 1)[1]: extra.pop(k) for k in list(extra) if k.startswith("training.")}
    method_extra = {k.split(".", 1)[1]: extra.pop(k) for k in list(extra) if k.startswith("method.")}
    ft = {"delta_min": 0.01, "delta_max": 0.15, "schedule": "exp", "lambda_dr": 0.5,
          "fisher_estimator": "variational", "fisher_mode": args.fisher_mode, **extra}
    training = {"output_dir": str(out), "stage1_steps": args.stages[0], "stage2_steps": args.stages[1],
                "stage3_steps": args.stages[2], "per_device_train_batch_size": args.batch,
                "backbone_lr": 1e-5, "decoder_lr": 1e-4, "weight_decay": 0.05, "logging_steps": 1000,
                "report_to": [], "disable_tqdm": True, "seed": 0, "dataloader_num_workers": 0,
                "use_cpu": args.device == "cpu"}
    if args.bf16:
        training["bf16"] = True
    training.update(train_extra)  # a variant row's `training.FIELD=value` entries
    w, h = args.image_size
    return {
        "model": model,
        "data": {"train": {"name": "cityscapes", "root": str(data_root / "clean"), "split": "train"},
                 # one small held-out image, evaluated whole: a run must name an evaluation domain, and evaluation
                 # is not what this benchmark compares (its own "evaluate" segment)
                 "eval": [{"name": "cityscapes", "root": str(data_root / "clean"), "split": "val", "max_images": 1}],
                 "crop_size": [args.crop, args.crop], "base_scale": [w, h], "ratio_range": [1.0, 1.0],
                 "test_scale": [w, h], "eval_mode": "whole"},
        # a variant row's `method.FIELD=value` entries (e.g. method.selection_update_steps=100) override these.
        # δ(t) every second stage-3 step: updates and plain steps alternate (`run_cost_report.growth_steps`); every
        # step where stage 3 is too short for that (--quick)
        "method": {"name": method, "lora_r": 16, "selection_update_steps": 2 if args.stages[2] > 2 else 1,
                   "fishertune": ft, **method_extra},
        "training": training,
    }


def check_configs(args, specs, data_root: Path) -> None:
    """Type and validate every row's config as `scripts/train.py` would, before any row runs: a bad variant key
    (e.g. `method.selection_update_steps` not below the measured stage-3 steps) stops the benchmark here, naming the
    row, instead of after the rows before it have run."""
    from peft_fishertune.training import load_config

    for label, method, extra in specs:
        try:
            load_config(run_config(args, method, extra, args.workdir / "runs" / label, data_root))
        except (TypeError, ValueError) as e:  # ConfigError is a ValueError
            raise SystemExit(f"--methods row {label!r}: its config is refused: {e}") from None


def run_one(args, label: str, method: str, extra: dict, data_root: Path, round_index: int = 0) -> dict:
    out = args.workdir / "runs" / (f"round{round_index}" if args.repeats > 1 else "") / label
    out.mkdir(parents=True, exist_ok=True)
    cfg = out / "config.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(run_config(args, method, extra, out, data_root)))
    result_file = out / "cost.json"
    if result_file.exists():
        result_file.unlink()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--config", str(cfg), "--result-file",
           str(result_file), "--threads", str(args.threads), "--device", args.device]
    if args.no_stage_reset:
        cmd.append("--no-stage-reset")
    for spec in args.cuda_memory_snapshot or []:
        lab, _, path = spec.partition("=")
        if lab == label and round_index == 0:
            cmd += ["--cuda-memory-snapshot", path]
    for spec in args.torch_profile or []:
        lab, _, path = spec.partition("=")
        if lab == label and round_index == 0:  # the first round's run only (a profiled run is not timed as the others)
            cmd += ["--torch-profile", str(Path(path).resolve()), "--profile-skip", str(args.profile_skip)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    log = out / "worker.log"
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, rusage = os.wait4(proc.pid, 0)  # ru_maxrss: what /usr/bin/time -f %M reports (KiB)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not result_file.exists():
        tail = log.read_text()[-3000:]
        raise SystemExit(f"method {label} failed (exit {proc.returncode}); {log}:\n{tail}")
    res = json.loads(result_file.read_text())
    res.update(method=method, label=label, extra=extra, process_wall_s=time.time() - t0,
               ru_maxrss_bytes=rusage.ru_maxrss * 1024)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model and data, 1 + 2 + 2 steps (the test)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help="comma-separated METHOD or LABEL:METHOD:key=value;key=value entries: FisherTuneConfig "
                         "fields, training.FIELD for a training argument (e.g. training.deltas_in_weights=false), or "
                         "method.FIELD for the config's method section (e.g. method.selection_update_steps=100)")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--intermediate", type=int, default=None, help="default 4 x hidden")
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--decoder", default="linear", choices=["linear", "upernet", "mask2former"])
    ap.add_argument("--decoder-config", default=None, help="JSON of Mask2FormerConfig fields")
    ap.add_argument("--pyramid-channels", type=int, default=256)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("W", "H"),
                    help="synthetic image size (default 2*crop x crop)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--stages", type=int, nargs=3, default=None, metavar=("T1", "T2", "T3"),
                    help="steps of stages 1, 2, 3 (default 2 3 3; --quick: 1 2 2)")
    ap.add_argument("--paper-stages", type=int, nargs=3, default=list(PAPER_STAGES), metavar=("T1", "T2", "T3"),
                    help="stage proportions of the whole-run time figure (default the paper's 10000 2000 28000)")
    ap.add_argument("--fixed-delta", default="",
                    help="comma-separated δ values: add a FisherTune row per value with delta_min = delta_max = δ "
                         "(label fishertune_d<δ>), e.g. 0.05,0.15 for the stage-3 step targets")
    ap.add_argument("--fisher-mode", default="batch", choices=["batch", "per_sample"])
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-stage-reset", action="store_true",
                    help="do not reset the peak-RSS counter at stage boundaries (check: whole-run peak = ru_maxrss)")
    ap.add_argument("--cuda-memory-snapshot", action="append", default=None, metavar="LABEL=FILE",
                    help="CUDA: record the allocator's history in method LABEL's run; dump it at the end of stage 2 and of "
                         "stage 3 to FILE_stage2.pickle / FILE_stage3.pickle")
    ap.add_argument("--torch-profile", action="append", default=None, metavar="LABEL=FILE",
                    help="profile method LABEL's stage-2 and stage-3 steps (each stage's after its first) with "
                         "torch.profiler; the tables go to FILE (Markdown). Its step times are the profiler's: "
                         "make it an extra row (e.g. ft_prof:fishertune), as for the memory snapshot")
    ap.add_argument("--profile-skip", type=int, default=1, metavar="K",
                    help="with --torch-profile: steps of stage 2 and of stage 3 left out before profiling (default 1; "
                         "each stage needs more than K steps)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds of every method, interleaved (the order rotated each round): the figures are the "
                         "medians over rounds, each target ratio is also given per round (default 1)")
    ap.add_argument("--workdir", type=Path, default=None, help="configs, data and run outputs (default: a temp dir)")
    ap.add_argument("--out", type=Path, help="also write the JSON line to this file")
    ap.add_argument("--md", type=Path, help="also write the Markdown table to this file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1:  # before any data is made or any method runs
        raise SystemExit(f"--repeats {args.repeats}: expected a positive number of rounds")
    if args.profile_skip < 1:
        raise SystemExit(f"--profile-skip {args.profile_skip}: expected at least 1 (the first step of a stage holds "
                         "its one-off work)")
    if args.worker:
        args.cuda_memory_snapshot = (args.cuda_memory_snapshot or [None])[-1]
        args.torch_profile = (args.torch_profile or [None])[-1]
        return worker(args)
    if args.quick:
        args.hidden, args.layers, args.heads, args.intermediate, args.patch = 32, 4, 2, 64, 8
        args.crop, args.batch, args.pyramid_channels = 32, 2, 32
        args.stages = args.stages or [1, 2, 2]
        if args.decoder == "mask2former" and not args.decoder_config:
            args.decoder_config = json.dumps({"feature_size": 32, "mask_feature_size": 32, "hidden_dim": 32,
                                              "num_queries": 10, "decoder_layers": 2, "dim_feedforward": 64,
                                              "encoder_layers": 1, "encoder_feedforward_dim": 64,
                                              "num_attention_heads": 2, "train_num_points": 256})
    args.stages = args.stages or [2, 3, 3]
    if args.torch_profile and min(args.stages[1:]) <= args.profile_skip:
        raise SystemExit(f"--torch-profile with --profile-skip {args.profile_skip}: stages 2 and 3 need more steps "
                         f"than that (--stages {' '.join(map(str, args.stages))})")
    args.intermediate = args.intermediate or 4 * args.hidden
    args.image_size = args.image_size or [max(64, 2 * args.crop), max(32, args.crop)]
    specs = [method_spec(s) for s in args.methods.split(",") if s]
    for d in filter(None, args.fixed_delta.split(",")):
        specs.append((f"fishertune_d{float(d)}", "fishertune", {"delta_min": float(d), "delta_max": float(d)}))
    command = "python benchmarks/run_cost.py " + " ".join(sys.argv[1:] if argv is None else argv)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="run_cost_")
        args.workdir = Path(tmp.name)
    t0 = time.time()
    sys.path.insert(0, str(ROOT / "src"))
    from peft_fishertune.data import generate_synthetic_domains

    data_root = args.workdir / "data"
    n_train = args.batch * sum(args.stages)
    if not (data_root / "synthetic_domains.json").is_file():  # shared by every method, made before any is measured
        generate_synthetic_domains(data_root, styles=("clean",), num_images={"train": min(n_train, 16), "val": 1},
                                   size=tuple(args.image_size), seed=0, progress=False)
    check_configs(args, specs, data_root)  # every row's config, before the first run (not when its turn comes)
    rounds: list[dict] = []
    setting = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
               if k not in ("worker", "config", "result_file", "out", "md", "workdir", "cuda_memory_snapshot",
                            "torch_profile")}
    # settings that move the figures: OpenMP's, and glibc's allocator tunables (MALLOC_MMAP_THRESHOLD_ and the like
    # move every method's peak RSS and step time; benchmarks/results/run_cost_allocator_*_2026-12-05.md)
    setting["env"] = {k: v for k, v in os.environ.items()
                      if k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") or k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    args.env = setting["env"]  # shown on the report's command line
    setting["load_average_at_start"] = os.getloadavg()

    def write(final: bool):
        done = [r for r in rounds if len(r) == len(specs)]  # complete rounds; before the first, its finished rows
        shown, rat, per_round = summarize(done or rounds[-1:] or [{}])
        body = {"benchmark": "run_cost", "command": command, "setting": setting, "results": shown, "ratios": rat}
        if args.repeats > 1:
            body.update(ratios_per_round=per_round, rounds=rounds)
        line = json.dumps({**body, "wall_s": time.time() - t0, "complete": final})
        md = markdown(shown, rat, args, command, per_round)
        for path, text in ((args.out, line + "\n"), (args.md, md)):
            if path:  # rewritten after every method: an interrupted run keeps the finished rows
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        return line, md

    for r in range(args.repeats):
        results = {}
        rounds.append(results)
        shift = r % len(specs)
        for label, method, extra in specs[shift:] + specs[:shift]:  # rotated: no method always runs first or last
            print(f"[run_cost] {label}" + (f" (round {r + 1} of {args.repeats})" if args.repeats > 1 else "") + " ...",
                  file=sys.stderr, flush=True)
            results[label] = run_one(args, label, method, extra, data_root, r)
            results[label]["whole_run_time"] = whole_run_time(results[label], tuple(args.paper_stages))
            write(False)
        rounds[r] = {label: results[label] for label, _, _ in specs}  # the rows in --methods order
    line, md = write(True)
    print(line)
    print(md)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
