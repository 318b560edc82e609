"""The arithmetic and the tables of `benchmarks/run_cost.py`: whole-run time at the paper's stage proportions, the
target ratios, the Markdown report. Pure functions of the measured results (tests/test_run_cost.py checks them)."""

from __future__ import annotations

import math
import statistics

SEGMENTS = ["setup", "stage1", "stage2", "selection", "stage3", "evaluate", "save"]
LABELS = {"freeze": "freeze", "lora": "LoRA r=16", "full": "full fine-tuning", "fishertune": "FisherTune",
          "fim": "FIM-only", "random": "random sparse", "drfim_empirical": "DR-FIM (empirical)", "rein": "Rein"}
MiB = 2**20
PAPER_STAGES = (10_000, 2_000, 28_000)  # the paper's T1 : T2 : T3 (METHOD.md)
# the shipped paper configs' `method.selection_update_steps`: δ(t) recomputed every 100 stage-3 steps. Runs before
# 2026-12-05's thirteenth round recomputed it at every step (their few stage-3 steps stand for 28k), so each of their
# growing row's steps includes an update; for them the report adds the figure at this interval as a reading aid.
PAPER_UPDATE_STEPS = 100


def default_update_interval(t3: int) -> int:
    """The library's default δ(t) interval at T3 tuning steps (`tuner.schedule.update_interval`: T3 // 1000)."""
    try:
        from peft_fishertune.tuner.schedule import update_interval
    except ImportError:  # pragma: no cover - src not importable
        return max(1, t3 // 1000)
    return update_interval(t3, None)


def updates_in_run(t3: int, every: int) -> int:
    """δ(t) updates a run of T3 tuning steps makes at interval `every`: at each multiple of it and at the last step
    (FisherTuneSchedule.before_step)."""
    return len(range(0, t3, every)) + (1 if (t3 - 1) % every else 0)


def growth_steps(result: dict) -> dict | None:
    """A growing row whose stage-3 steps (after the first) alternate a δ(t) update and a plain step (run_cost's
    `selection_update_steps: 2`): the plain steps' mean (they sample the schedule at evenly spaced δ: with 11 stage-3
    steps at t = 0.1, 0.3, ..., 0.9, the midpoint rule for the step's mean over the run), and the update's excess: the
    median over the update steps of (step - the mean of its plain neighbours). None where there are fewer than two of
    either: a fixed δ or a baseline (no update), a run that updated at every step."""
    steps = ((result.get("step_s") or {}).get("stage3") or [])[1:]
    upd = ((result.get("step_update_s") or {}).get("stage3") or [])[1:]
    if not steps or len(upd) != len(steps):
        return None
    updated = [u > 0 for u in upd]
    plain = [t for t, u in zip(steps, updated) if not u]
    excess = []
    for j, t in enumerate(steps):
        if updated[j]:
            near = [steps[i] for i in (j - 1, j + 1) if 0 <= i < len(steps) and not updated[i]]
            if near:
                excess.append(t - statistics.fmean(near))
    if len(plain) < 2 or len(excess) < 2:
        return None
    return {"plain_s": statistics.fmean(plain), "excess_s": statistics.median(excess), "plain": plain,
            "excess": excess}


def stage_kinds(result: dict) -> tuple[str, str, str]:
    """What a step of stage 1, 2 and 3 computes for this result's method (`Method.step_kinds`: "decoder",
    "estimate", "backbone"); each stage its own kind where the method is not in the table (made-up results)."""
    try:
        from peft_fishertune.training.methods import METHODS
    except ImportError:  # pragma: no cover - src not importable: every stage its own kind
        METHODS = {}
    method = METHODS.get(result.get("method"))
    return method.step_kinds if method is not None else ("stage1", "stage2", "stage3")


def steady_steps(result: dict, growth: dict | None = None) -> tuple[dict, float] | None:
    """({stageN: steady step s}, one-off s) from the measured steps, or None where a stage has none.

    `growth` is `growth_steps(result)` where the caller has it. Stages of one kind (`stage_kinds`) run the same step and are timed as one. A kind's steady step is the median of
    its last stage's steps, leaving out that stage's first step where it is the kind's first; the steps left out (that
    first step, every step of the kind's earlier stages) are its warm-up, each counted once at its excess over the
    steady step (at least 0). So the selection inside the first stage-3 step and the fused kernels' compile in the
    first stage-2 step count once, and so do a backbone's first training steps (full fine-tuning's first three run
    1.4-1.7x its later ones while the allocator settles; a per-stage median charged them x T2). Results with medians
    only (no `step_s`): those medians, no one-off."""
    med = result["step_s_median"]
    if any(med.get(f"stage{i}") is None for i in (1, 2, 3)):
        return None
    steps = result.get("step_s")
    if not steps:
        return {f"stage{i}": med[f"stage{i}"] for i in (1, 2, 3)}, 0.0
    kinds = stage_kinds(result)
    runs = [list(steps.get(f"stage{i}") or []) for i in (1, 2, 3)]
    if any(not r for r in runs):
        return None
    growth = growth if growth is not None else growth_steps(result)
    steady, one_off = {}, 0.0
    for kind in dict.fromkeys(kinds):
        stages = [i for i, k in enumerate(kinds) if k == kind]
        last = runs[stages[-1]]
        if len(stages) > 1:  # the last stage's steps are steady; the earlier stages' are the warm-up
            sample, warm = last, [t for i in stages[:-1] for t in runs[i]]
        elif len(last) > 1:  # one stage: its first step is the warm-up
            sample, warm = last[1:], last[:1]
        else:  # one step measured: that step, no warm-up
            sample, warm = last, []
        # a growing stage 3 alternating updates and plain steps: the plain steps' mean (the updates count apart)
        s = growth["plain_s"] if growth is not None and stages == [2] else statistics.median(sample)
        one_off += sum(max(0.0, t - s) for t in warm)
        steady.update({f"stage{i + 1}": s for i in stages})
    return steady, one_off


def whole_run_time(result: dict, stages=PAPER_STAGES) -> dict | None:
    """Training time at `stages` steps per stage: Σ T_i x the steady stage-i step + the selection segment's wall
    time + the warm-up's excess once (`steady_steps`: the selection where the trainer runs it inside the first
    stage-3 step, the fused kernels' compile in the first stage-2 step, a backbone's first training steps)."""
    growth = growth_steps(result)
    steady = steady_steps(result, growth)
    if steady is None:
        return None
    step, one_off = steady
    selection = result["segments"].get("selection", {}).get("wall_s", 0.0)
    total = sum(t * step[f"stage{i}"] for i, t in enumerate(stages, 1))
    out = {"stages": list(stages), "step_s": step, "selection_s": selection, "one_off_s": one_off,
           "total_s": total + selection + one_off}
    if growth is not None:  # the run's δ(t) updates at the library's default interval, each at its measured excess
        out["updates"] = _updates(stages[2], growth["excess_s"])
        out["total_s"] += out["updates"]["charge_s"]
        return out
    update = _update_interval(result, step["stage3"], stages[2], out["total_s"])
    if update:
        out["update"] = update
    return out


def _updates(t3: int, excess: float) -> dict:
    """T3's updates at the library's default interval, less the first (inside the first stage-3 step, with the
    selection: the warm-up), each at `excess`."""
    every = default_update_interval(t3)
    count = updates_in_run(t3, every) - 1
    return {"every": every, "count": count, "excess_s": excess, "charge_s": count * excess}


def _update_interval(result: dict, med3: float, t3: int, total: float, every: int = PAPER_UPDATE_STEPS) -> dict | None:
    """The whole run with δ(t) recomputed every `every` stage-3 steps instead of every step, where the measured steps
    timed their δ(t) update (`step_update_s`, run_cost's worker) and at least half of the steps after the first ran
    one (a growing row): T3 x median(step - its update) + ceil(T3 / every) x median(update), over the steps after the
    first (as the steady step), in place of T3 x the steady step."""
    steps = ((result.get("step_s") or {}).get("stage3") or [])[1:]
    upd = ((result.get("step_update_s") or {}).get("stage3") or [])[1:]
    ran = [u for u in upd if u > 0]
    if not steps or len(upd) != len(steps) or 2 * len(ran) < len(steps):
        return None
    less = statistics.median(t - u for t, u in zip(steps, upd))
    per_update = statistics.median(ran)
    return _with_update(total, med3, t3, every, less, per_update)


def _with_update(total: float, med3: float, t3: int, every: int, less: float, per_update: float) -> dict:
    return {"every": every, "step_less_update_s": less, "update_s": per_update,
            "total_s": total - t3 * med3 + t3 * less + math.ceil(t3 / every) * per_update}


def ratios(results: dict) -> dict:
    def overhead(label, key):
        if label in results and "freeze" in results and results[label].get(key) is not None:
            return results[label][key] - results["freeze"][key]
        return None

    def div(a, b):
        return a / b if a is not None and b else None

    out = {}
    for key, unit, target in (("whole_run_peak_rss_bytes", "rss", True), ("whole_run_cuda_peak_allocated_bytes", "cuda", True),
                              ("whole_run_peak_rss_less_file_bytes", "rss_less_file", False)):
        ft, full, lora = overhead("fishertune", key), overhead("full", key), overhead("lora", key)
        if ft is None:
            continue
        # the file-backed pages left out: a reading aid beside the target, not the target
        out[f"{unit}_overhead_fishertune_over_full" + (" (<= 0.75)" if target else "")] = div(ft, full)
        out[f"{unit}_overhead_fishertune_over_lora" + (" (<= 1.5)" if target else "")] = div(ft, lora)
    total = {k: (r.get("whole_run_time") or {}).get("total_s") for k, r in results.items()}
    if total.get("fishertune") is not None:
        out["time_fishertune_over_full (<= 0.85)"] = div(total["fishertune"], total.get("full"))
        out["time_fishertune_over_lora (<= 1.3)"] = div(total["fishertune"], total.get("lora"))
    upd = ((results.get("fishertune") or {}).get("whole_run_time") or {}).get("update")
    if upd:  # a reading aid beside the target (the measured row, δ(t) every step, stays the target's)
        out[f"time_fishertune_over_full, δ(t) every {upd['every']} steps"] = div(upd["total_s"], total.get("full"))
        out[f"time_fishertune_over_lora, δ(t) every {upd['every']} steps"] = div(upd["total_s"], total.get("lora"))
    s3 = {k: steady_step(r, "stage3") for k, r in results.items()}
    for label, ref, target in (("fishertune_d0.05", "lora", 1.15), ("fishertune_d0.15", "full", 0.9)):
        if label in results:
            out[f"step_stage3_{label}_over_{ref} (<= {target})"] = div(s3[label], s3.get(ref))
    for label in ("fishertune", "fim"):
        if label in results:
            target = " (<= 2.5)" if label == "fishertune" else ""
            out[f"step_stage2_over_stage3_{label}{target}"] = div(steady_step(results[label], "stage2"),
                                                                  steady_step(results[label], "stage3"))
    return out


def steady_step(result: dict, stage: str) -> float | None:
    """The step time the whole-run figure charges for `stage` (`steady_steps`), else the stage's median."""
    return ((result.get("whole_run_time") or {}).get("step_s") or result["step_s_median"]).get(stage)


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def combine_rounds(rounds: list[dict]) -> dict:
    """Several rounds of the same methods (`--repeats`), one result per method: every figure is the median over the
    rounds of that round's figure (each stage's median step, each segment's peak and wall time, the whole-run peak,
    the selection and first-step costs), and the whole-run time is recomputed from those medians (so its arithmetic
    holds as for one round). `rounds` keeps each round's own results."""
    out = {}
    for label in rounds[0]:
        rs = [r[label] for r in rounds if label in r]
        first = rs[0]
        seg = {}
        for name in first["segments"]:
            keys = {k for r in rs for k in r["segments"].get(name, {})}
            seg[name] = {k: _median([r["segments"].get(name, {}).get(k) for r in rs]) for k in sorted(keys)}
        res = {k: v for k, v in first.items() if k not in ("segments", "step_s", "whole_run_time", "torch_profile")}
        res.update(segments=seg, rounds=len(rs),
                   step_s_median={f"stage{i}": _median([r["step_s_median"].get(f"stage{i}") for r in rs])
                                  for i in (1, 2, 3)},
                   step_s_rounds={f"stage{i}": [r["step_s_median"].get(f"stage{i}") for r in rs] for i in (1, 2, 3)},
                   wall_s=_median([r["wall_s"] for r in rs]))
        for key in ("whole_run_peak_rss_bytes", "whole_run_cuda_peak_allocated_bytes", "ru_maxrss_bytes",
                    "whole_run_peak_rss_less_file_bytes"):
            if any(r.get(key) is not None for r in rs):
                res[key] = _median([r.get(key) for r in rs])
        w = [r.get("whole_run_time") for r in rs]
        if all(w):
            med = {f"stage{i}": _median([steady_step(r, f"stage{i}") for r in rs]) for i in (1, 2, 3)}
            selection, one_off = _median([x["selection_s"] for x in w]), _median([x["one_off_s"] for x in w])
            stages = w[0]["stages"]
            res["whole_run_time"] = {"stages": stages, "step_s": med, "selection_s": selection, "one_off_s": one_off,
                                     "total_s": sum(t * med[f"stage{i}"] for i, t in enumerate(stages, 1))
                                     + selection + one_off,
                                     "total_s_rounds": [x["total_s"] for x in w]}
            if all(x.get("updates") for x in w):  # the median update excess over rounds, charged as in one round
                upd = _updates(stages[2], _median([x["updates"]["excess_s"] for x in w]))
                res["whole_run_time"]["updates"] = upd
                res["whole_run_time"]["total_s"] += upd["charge_s"]
            if all(x.get("update") for x in w):  # recomputed from the medians over rounds, as the total is
                u = [x["update"] for x in w]
                res["whole_run_time"]["update"] = _with_update(
                    res["whole_run_time"]["total_s"], med["stage3"], stages[2], u[0]["every"],
                    _median([x["step_less_update_s"] for x in u]), _median([x["update_s"] for x in u]))
        out[label] = res
    return out


def ratio_rounds(rounds: list[dict]) -> dict:
    """Each target ratio computed within each round (the methods of one round ran back to back): {key: [per round]}."""
    per = [ratios(r) for r in rounds]
    return {k: [p.get(k) for p in per] for k in per[0]}


def summarize(rounds: list[dict]) -> tuple[dict, dict, dict | None]:
    """(results, target ratios, ratios per round or None): one round as it is, several combined by `combine_rounds`."""
    if len(rounds) == 1:
        return rounds[0], ratios(rounds[0]), None
    results = combine_rounds(rounds)
    return results, ratios(results), ratio_rounds(rounds)


def _mib(x) -> str:
    return f"{x / MiB:,.0f}" if x is not None else "n/a"


def _s(x) -> str:
    return f"{x:.2f}" if x is not None else "n/a"


def _env_prefix(env) -> str:
    """`K=V ` for each recorded environment setting (OpenMP's, glibc's allocator tunables), as a shell would take it."""
    return "".join(f"{k}={v} " for k, v in sorted((env or {}).items()))


def _update_lines(results: dict, tot: dict) -> list[str]:
    lines = []
    for label, r in results.items():
        u = (r.get("whole_run_time") or {}).get("update")
        if not u:
            continue
        rel = ", ".join(f"{u['total_s'] / tot[ref]:.3f}x {LABELS[ref]}'s" for ref in ("full", "lora") if tot.get(ref))
        lines += [f"{LABELS.get(label, label)} with δ(t) recomputed every {u['every']} stage-3 steps, as the shipped "
                  f"paper configs do (`method.selection_update_steps: {u['every']}`; here it is recomputed every step, "
                  f"so that δ grows over the few steps measured, and each step's update is timed): stage-3 step less "
                  f"its update {u['step_less_update_s']:.3f} s, one update {u['update_s'] * 1e3:.1f} ms: whole run "
                  f"**{u['total_s']:,.0f} s** ({rel}; a reading aid, the targets read the row above).", ""]
    return lines


def markdown(results: dict, rat: dict, args, command: str, per_round: dict | None = None, note: str = "") -> str:
    cuda = args.device.startswith("cuda")
    mem_key = "cuda_peak_allocated_bytes" if cuda else "peak_rss_bytes"
    whole_key = "whole_run_cuda_peak_allocated_bytes" if cuda else "whole_run_peak_rss_bytes"
    unit = ("torch.cuda.max_memory_allocated, reset per segment" if cuda else
            "peak RSS (VmHWM, reset per segment through /proc/self/clear_refs)"
            if not args.no_stage_reset else "cumulative peak RSS (no resets: each column is the peak so far)")
    freeze = results.get("freeze", {}).get(whole_key)
    head = ("| method | " + " | ".join(f"{s} MiB" for s in SEGMENTS) + " | **whole run MiB** | over freeze MiB | "
            + ("host peak RSS MiB | " if cuda else "") + "step s stage 1 / 2 / 3 (median) | wall s | active / candidates |")
    lines = [head, "|---|" + "---:|" * (len(SEGMENTS) + 5 + cuda)]
    for label, r in results.items():
        seg = r["segments"]
        over = r.get(whole_key) - freeze if freeze is not None and r.get(whole_key) is not None else None
        med = r["step_s_median"]
        t = r.get("trainable") or {}
        sel = f"{t['num_active']:,} / {t['num_candidates']:,}" if "num_active" in t else ""
        cells = [_mib(seg.get(s, {}).get(mem_key)) for s in SEGMENTS]
        lines.append(f"| {LABELS.get(label, label)} | " + " | ".join(cells) + f" | **{_mib(r.get(whole_key))}** | "
                     f"{_mib(over) if over is not None else 'n/a'} | "
                     + (f"{_mib(r['whole_run_peak_rss_bytes'])} | " if cuda else "") + f"{_s(med['stage1'])} / {_s(med['stage2'])} / "
                     f"{_s(med['stage3'])} | {r['wall_s']:.1f} | {sel} |")
    file_lines = []
    if not cuda and all(r.get("whole_run_peak_rss_less_file_bytes") is not None for r in results.values()) and results:
        file_lines = ["File-backed pages (RssFile: libraries and compiled kernels mapped from disk) are part of RSS, and a "
                      "freshly installed environment maps more of them. The whole-run peak less the file-backed pages "
                      "at its segment's end, MiB: " + ", ".join(
                          f"{LABELS.get(k, k)} {_mib(r['whole_run_peak_rss_less_file_bytes'])}"
                          for k, r in results.items()) + ".", ""]

    def _rounds(k):
        vals = (per_round or {}).get(k)
        if not vals or len(vals) < 2:
            return ""
        return " (per round: " + ", ".join(f"{v:.3f}" if v is not None else "n/a" for v in vals) + ")"

    rat_lines = [(f"- `{k}`: {v:.3f}" if v is not None else f"- `{k}`: n/a") + _rounds(k) for k, v in rat.items()]
    n_rounds = max((r.get("rounds", 1) for r in results.values()), default=1)
    rounds_note = (f" {n_rounds} rounds, interleaved (the method order rotated each round); every figure is the median "
                   f"over the rounds of each round's figure, the whole-run time recomputed from those medians; the "
                   f"target ratios are those of the medians, with each round's own beside them." if n_rounds > 1 else "")
    stages = next((r["whole_run_time"]["stages"] for r in results.values() if r.get("whole_run_time")), PAPER_STAGES)
    tot = {k: (r.get("whole_run_time") or {}).get("total_s") for k, r in results.items()}
    time_lines = [f"| method | steady step s stage 1 / 2 / 3 | selection s | warm-up excess s | δ(t) updates s | "
                  f"**whole run s** ({stages[0]:,} + {stages[1]:,} + {stages[2]:,} steps) | hours | / full | / LoRA |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in results.items():
        w = r.get("whole_run_time")
        if not w:
            continue
        med = w.get("step_s") or r["step_s_median"]
        rel = [f"{w['total_s'] / tot[ref]:.2f}" if tot.get(ref) else "n/a" for ref in ("full", "lora")]
        u = w.get("updates")
        ups = f"{u['charge_s']:.0f} ({u['count']:,} x {u['excess_s'] * 1e3:.0f} ms)" if u else ""
        time_lines.append(f"| {LABELS.get(label, label)} | {_s(med['stage1'])} / {_s(med['stage2'])} / {_s(med['stage3'])} | "
                          f"{w['selection_s']:.1f} | {w.get('one_off_s', 0.0):.1f} | {ups} | **{w['total_s']:,.0f}** | "
                          f"{w['total_s'] / 3600:.1f} | {rel[0]} | {rel[1]} |")
    return "\n".join([
        f"# Whole-run cost per method ({args.device})", "",
        f"Command: `{_env_prefix(getattr(args, 'env', None))}{command}`", "",
        *([note, ""] if note else []),
        f"DINOv2 size: hidden {args.hidden}, {args.layers} blocks, {args.heads} heads, intermediate {args.intermediate}, "
        f"patch {args.patch}, random init; decoder `{args.decoder}`; {args.crop}² crops, batch {args.batch}"
        f"{', bf16' if args.bf16 else ''}; stages {args.stages[0]} + {args.stages[1]} + {args.stages[2]} steps; "
        f"synthetic data; {args.threads} torch threads per process; fisher_mode `{args.fisher_mode}`; each method in "
        f"its own process. Memory: {unit}. Step time: median per stage, on_step_begin -> on_step_end (data loading "
        f"excluded). Timings on a shared machine are noisy.{rounds_note}", "",
        "**Whole-run time at the paper's stage proportions** (T1 x steady stage-1 step + T2 x stage-2 + T3 x stage-3 "
        "+ the selection segment once + the warm-up's excess over the steady step once; the steps measured here, "
        "scaled). Stages that run the same step for a method (LoRA's and full fine-tuning's 2 and 3, all three for "
        "freeze) are timed as one: the steady step is the median of the last such stage's steps, less the method's "
        "first step of that kind; the first step of each kind (the selection inside FisherTune's first stage-3 step, "
        "a compile in its first stage-2 step) and the earlier stages' steps of that kind (a backbone's first training "
        "steps) count once, at their excess. A growing row whose stage-3 steps alternate a δ(t) update and a plain "
        "step (`selection_update_steps: 2`) is charged T3 x the plain steps' mean (they sample δ across its schedule) "
        "and, apart, the updates a run of T3 steps makes at the library's default interval (every T3 // 1000 steps), "
        "each at its measured excess over the neighbouring plain steps (the update itself and the step's new read of "
        "the base values at the new active entries):", "",
        *time_lines, "", *_update_lines(results, tot),
        "**Memory and step time per segment:**", "",
        *lines, "", *file_lines, "Target ratios (same run" + (", medians over rounds" if n_rounds > 1 else "") + "):", *rat_lines, ""])


# the measured setting: runs pooled together must agree on these
SAME_SETTING = ("device", "hidden", "layers", "heads", "intermediate", "patch", "decoder", "decoder_config", "crop",
                "image_size", "batch", "stages", "paper_stages", "threads", "fisher_mode", "bf16", "no_stage_reset")


def pool(lines: list[dict]) -> tuple[list[dict], dict]:
    """The rounds of several run_cost JSON lines (each a `--repeats` run or a single run), restricted to the methods
    every line has, in the first line's order; and the shared setting. Refuses lines measured in different settings."""
    if not lines:
        raise ValueError("pool: no run_cost JSON lines")
    first = lines[0]["setting"]
    for i, line in enumerate(lines[1:], 2):
        diff = [k for k in SAME_SETTING if line["setting"].get(k) != first.get(k)]
        if diff:
            theirs = ", ".join(f"{k}={line['setting'].get(k)!r} vs {first.get(k)!r}" for k in diff)
            raise ValueError(f"pool: run {i} was measured with other {', '.join(diff)} than run 1 ({theirs})")
    rounds = [r for line in lines for r in (line.get("rounds") or [line["results"]])]
    labels = [k for k in rounds[0] if all(k in r for r in rounds)]
    if not labels:
        raise ValueError("pool: the runs have no method in common")
    return [{k: r[k] for k in labels} for r in rounds], first


def main(argv=None) -> int:
    """`python benchmarks/run_cost_report.py A.jsonl B.jsonl [--md FILE] [--out FILE]`: the rounds of several runs of
    `run_cost.py` pooled into one table (medians over all rounds, each target ratio per round). Each round's
    whole-run time is recomputed from its measured steps with this file's arithmetic, so older runs read as new ones
    do; one file alone gives that run again."""
    import argparse
    import json
    from pathlib import Path
    from types import SimpleNamespace

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("runs", nargs="+", type=Path, help="run_cost.py --out files (one JSON line each)")
    ap.add_argument("--md", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    lines = []
    for path in args.runs:
        try:
            lines.append(json.loads(path.read_text().strip().splitlines()[-1]))
        except (OSError, ValueError, IndexError) as exc:
            raise SystemExit(f"{path}: not a run_cost.py JSON line ({exc})") from None
    try:
        rounds, setting = pool(lines)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    for r in (res for rnd in rounds for res in rnd.values()):  # this file's arithmetic, also for older runs
        if r.get("step_s"):
            r["whole_run_time"] = whole_run_time(r, tuple(setting.get("paper_stages") or PAPER_STAGES))
    results, rat, per = summarize(rounds)
    command = "python benchmarks/run_cost_report.py " + " ".join(str(p) for p in args.runs)
    note = "Pooled: " + ", ".join(f"`{line['command']}`" for line in lines) + f" ({len(rounds)} rounds)."
    md = markdown(results, rat, SimpleNamespace(**setting), command, per, note=note)
    out = json.dumps({"benchmark": "run_cost_pooled", "command": command, "runs": [str(p) for p in args.runs],
                      "setting": setting, "results": results, "ratios": rat, "ratios_per_round": per})
    for path, text in ((args.out, out + "\n"), (args.md, md)):
        if path:
            path.write_text(text)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
