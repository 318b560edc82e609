"""Runs that never lose work: checkpoints cut at every write (deterministically), resume from the newest complete
checkpoint (`true`), refusal to resume another method's run, re-runs into the same folder, periodic evaluation,
the output folder, stage 2 freeing its estimator, and alternating execution resumed exactly."""

from __future__ import annotations

import copy
import csv
import gc
import json
import os
import stat
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_trainer import _run, tiny_config

from peft_fishertune.trainer import checkpointing as ck
from peft_fishertune.trainer.schedule import FisherTuneSchedule
from peft_fishertune.trainer.trainer import FisherTuneTrainer
from peft_fishertune.training import ConfigError, load_config
from peft_fishertune.training import experiment as ex


def _trainer(raw):
    """The trainer of a config, built by the same steps as run_experiment (and scripts/train.py)."""
    from accelerate.utils import set_seed

    cfg = load_config(copy.deepcopy(raw))
    args = ex.training_arguments(cfg)
    set_seed(args.seed)
    model, peft_config = ex.build_model(cfg, ex.build_base_model(cfg))
    train, evals = ex.build_data(cfg, ex.num_training_samples(args), args.seed)
    return ex.build_trainer(cfg, model, peft_config, train, evals, args)


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _same_adapter(a: Path, b: Path) -> None:
    x, y = _adapter(a), _adapter(b)
    assert x.keys() == y.keys()
    for k in x:
        assert torch.allclose(x[k].float(), y[k].float(), atol=1e-6), k


# ------------------------------------------------------------------------------------ unit level


def test_resolve_resume_and_rotation(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ck.CheckpointError, match="no complete checkpoint"):
        ck.resolve_resume("true", str(out))
    for step, complete in ((2, True), (4, True), (6, False)):
        d = out / f"checkpoint-{step}"
        d.mkdir(parents=True)
        if complete:
            ck.write_marker(str(d), {"step": step})
    assert ck.resolve_resume(None, str(out)) is None and ck.resolve_resume("false", str(out)) is None
    assert ck.resolve_resume(True, str(out)) == str(out / "checkpoint-4")
    assert ck.resolve_resume("true", str(out)) == str(out / "checkpoint-4")  # checkpoint-6 is incomplete
    with pytest.raises(ck.CheckpointError, match=r"checkpoint-6.* is incomplete .*newest complete .*checkpoint-4"):
        ck.resolve_resume(str(out / "checkpoint-6"), str(out))
    # rotation keeps the newest complete ones and never counts an incomplete folder as a kept checkpoint
    assert ck.rotate(str(out), 1) == [str(out / "checkpoint-2")]
    assert sorted(os.listdir(out)) == ["checkpoint-4", "checkpoint-6"]


def test_atomic_write_has_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        ck.atomic_write_text(str(tmp_path / "a.txt"), "x")
        p = tmp_path / "b.bin"
        with ck.atomic_path(str(p)) as tmp:
            os.chmod(tmp, 0o600)  # what some writers (safetensors) do
            Path(tmp).write_bytes(b"1")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.bin"]  # no temporary files left


# ----------------------------------------------------------------------- a save cut at each write


class _Cut(KeyboardInterrupt):
    """Stands for a kill arriving in the middle of a save."""


def test_a_save_cut_at_any_write_leaves_the_previous_checkpoints_resumable(synth, tmp_path, monkeypatch):
    raw = tiny_config(synth, tmp_path / "run", stages=(1, 1, 2), save_strategy="no", save_total_limit=1)
    trainer = _trainer(raw)
    trainer.train()
    out = Path(trainer.args.output_dir)
    trainer.state.global_step = 10
    trainer._save_checkpoint(trainer.model, None)  # a complete checkpoint to fall back on
    assert ck.latest_complete_checkpoint(str(out)) == str(out / "checkpoint-10")
    names = [n for n, _ in trainer._checkpoint_steps("s", "f", None)]
    assert names[-3:] == ["marker", "publish", "rotate"]
    original = FisherTuneTrainer._checkpoint_steps
    for i, name in enumerate(names):
        def cut_at_i(self, staging, final, trial, i=i):
            steps = original(self, staging, final, trial)

            def cut():
                raise _Cut(f"cut at {steps[i][0]}")

            return steps[:i] + [(steps[i][0], cut)] + steps[i + 1:]

        monkeypatch.setattr(FisherTuneTrainer, "_checkpoint_steps", cut_at_i)
        step = 11 + i
        trainer.state.global_step = step
        with pytest.raises(_Cut):
            trainer._save_checkpoint(trainer.model, None)
        published = i > names.index("publish")
        latest = ck.latest_complete_checkpoint(str(out))
        if published:  # cut during rotation: the new checkpoint is complete and the older one still there
            assert latest == str(out / f"checkpoint-{step}")
            assert (out / "checkpoint-10").is_dir()
        else:
            assert latest == str(out / "checkpoint-10")
            assert not (out / f"checkpoint-{step}").exists(), f"cut at {name}: a half-written checkpoint is visible"
            assert (out / f"checkpoint-{step}.partial").is_dir()
        # the newest complete checkpoint holds every file a resume reads
        files = set(os.listdir(latest))
        assert {ck.MARKER, ck.RUN_CONFIG, "trainer_state.json", "fishertune_state_rank0.pt", "optimizer.pt",
                "adapter_model.safetensors"} <= files
        torch.load(Path(latest) / "fishertune_state_rank0.pt", weights_only=False)
    monkeypatch.setattr(FisherTuneTrainer, "_checkpoint_steps", original)
    trainer.state.global_step = 40
    trainer._save_checkpoint(trainer.model, None)
    ck.remove_stale_staging(str(out))  # what the next train() does first
    assert not [n for n in os.listdir(out) if n.endswith(ck.STAGING_SUFFIX)]
    assert [os.path.basename(p) for _, p, ok in ck.checkpoint_dirs(str(out)) if ok] == ["checkpoint-40"]  # limit 1


def test_killed_mid_save_then_resume_true_gives_the_uninterrupted_result(synth, tmp_path, monkeypatch):
    stages = (1, 2, 3)
    ref = tiny_config(synth, tmp_path / "ref", stages=stages)
    _run(ref)
    raw = tiny_config(synth, tmp_path / "run", stages=stages, save_strategy="steps", save_steps=1, save_total_limit=2)
    original = FisherTuneTrainer._checkpoint_steps

    def cut_state_file_of_checkpoint_4(self, staging, final, trial):
        steps = original(self, staging, final, trial)
        if not final.endswith("checkpoint-4"):
            return steps

        def cut():  # the state file is half-written when the kill arrives
            Path(staging, "fishertune_state_rank0.pt").write_bytes(b"PK\x03\x04 cut")
            raise _Cut("killed while saving checkpoint-4")

        return [(n, cut if n == "fishertune_state" else f) for n, f in steps]

    monkeypatch.setattr(FisherTuneTrainer, "_checkpoint_steps", cut_state_file_of_checkpoint_4)
    with pytest.raises(_Cut):
        _run(raw)
    monkeypatch.setattr(FisherTuneTrainer, "_checkpoint_steps", original)
    out = tmp_path / "run"
    assert ck.latest_complete_checkpoint(str(out)) == str(out / "checkpoint-3")
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    _run(raw, resume_from_checkpoint="true")
    _same_adapter(tmp_path / "ref", out)


def test_resume_with_another_method_names_what_differs(synth, tmp_path):
    raw = tiny_config(synth, tmp_path / "run", stages=(1, 1, 1), save_strategy="steps", save_steps=1)
    _run(raw)
    other = copy.deepcopy(raw)
    other["method"]["name"] = "random"
    with pytest.raises(ConfigError, match=r"(?s)different run configuration.*method\.name: checkpoint 'fishertune', "
                                          r"this run 'random'"):
        _run(other, resume_from_checkpoint="true")
    other = copy.deepcopy(raw)
    other["method"]["fishertune"]["delta_max"] = 0.3
    with pytest.raises(ConfigError, match=r"method\.fishertune\.delta_max: checkpoint 0\.2, this run 0\.3"):
        _run(other, resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))


# ------------------------------------------------------------------- re-runs and the output folder


def test_rerun_into_the_same_folder_with_periodic_evaluation(synth, tmp_path, capsys):
    raw = tiny_config(synth, tmp_path / "run", stages=(1, 1, 1), eval_strategy="steps", eval_steps=2,
                      save_merged_model=True)
    raw["data"]["eval"][1]["label"] = "avg"  # a domain named like the mean must keep its column
    _run(raw)
    assert "already holds a run" not in capsys.readouterr().out
    raw["training"]["stage3_steps"] = 2  # the second run logs other columns at other steps
    result = _run(raw)
    printed = capsys.readouterr().out
    assert "already holds a run" in printed and "starts afresh and overwrites" in printed
    out = tmp_path / "run"
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [r["step"] for r in rows if r.get("loss")] == ["1", "2", "3", "4"]  # the second run's steps only
    periodic = [r for r in rows if r.get("eval_mIoU") and r["step"] == "2"]
    assert periodic and periodic[0]["eval_avg_mIoU"] != ""  # periodic evaluation ran at step 2
    # the last step is evaluated once (by the periodic evaluation; finish_run reuses its table)
    assert len([r for r in rows if r.get("eval_mIoU") and r["step"] == "4"]) == 1
    assert printed.count("step 4: mIoU") == 1
    # each param group family's learning rate is logged, not only the first group's
    assert all(r["lr_backbone"] != "" and r["lr_decoder"] != "" for r in rows if r.get("loss"))
    assert set(result.table) == {"clean", "avg"}
    # the output folder
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["stage3_steps"] == 2
    saved = json.loads((out / "results.json").read_text())
    assert saved["table"] == pytest.approx(result.table) and saved["warnings"] == []
    assert "| clean | avg | avg |" in (out / "results.md").read_text()
    assert (out / "results.csv").read_text().splitlines()[0] == "metric,class,clean,avg,avg"  # EvaluationTable.write
    sel = (out / "selection.csv").read_text().splitlines()
    assert sel[0] == "weight,block,module_type,active,numel,fraction" and len(sel) > 1
    assert (out / "selection.png").read_bytes()[:4] == b"\x89PNG"
    assert result.merged_dir and (out / "merged_model" / "model.safetensors").is_file()
    for f in (out / "adapter" / "adapter_model.safetensors", out / "merged_model" / "model.safetensors",
              out / "base_model" / "model.safetensors"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~_umask(), f


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_end_of_run_writes_never_lose_the_trained_adapter(synth, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ex, "_selection_outputs", broken)
    result = _run(tiny_config(synth, tmp_path / "run", stages=(1, 1, 1)))
    assert (Path(result.adapter_dir) / "adapter_model.safetensors").is_file()
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert any("disk full" in w for w in saved["warnings"])


# ------------------------------------------------------------------------------- stage 2 frees memory


def test_stage_2_frees_what_the_estimator_owned(synth, tmp_path, monkeypatch):
    raw = tiny_config(synth, tmp_path / "run", stages=(1, 2, 1))
    trainer = _trainer(raw)
    model_tensors = {id(t) for t in list(trainer.model.parameters()) + list(trainer.model.buffers())}
    refs: list = []
    alive_after_selection: list = []
    original = FisherTuneSchedule.select

    def watching(self, step=None):
        est = self.estimator
        refs.append(weakref.ref(est))
        seen = set()

        def collect(obj, depth=0):
            if isinstance(obj, torch.Tensor):
                if id(obj) not in model_tensors and id(obj) not in seen:
                    seen.add(id(obj))
                    refs.append(weakref.ref(obj))
            elif isinstance(obj, dict) and depth < 4:
                for v in obj.values():
                    collect(v, depth + 1)
            elif isinstance(obj, (list, tuple)) and depth < 4:
                for v in obj:
                    collect(v, depth + 1)

        collect(vars(est))
        assert len(refs) > 2, "the estimator must own accumulators to watch"
        del est
        out = original(self, step)
        gc.collect()
        alive_after_selection.extend(r for r in refs if r() is not None)
        return out

    monkeypatch.setattr(FisherTuneSchedule, "select", watching)
    trainer.train()
    assert refs and trainer.estimator is None
    assert not alive_after_selection, (f"{len(alive_after_selection)} of {len(refs)} estimator objects/tensors are "
                                       "still referenced after the selection")


# ------------------------------------------------------------------------ alternating execution


@pytest.mark.parametrize("stop_at", [4, 6], ids=["in-tuning-block", "in-second-estimation-block"])
def test_alternating_execution_resumes_exactly(synth, tmp_path, stop_at):
    # warm-up 1, then blocks of 2: estimate [1,2], tune [3,4], estimate [5,6], tune [7]
    raw = tiny_config(synth, tmp_path / "full", stages=(1, 3, 4), alternate_steps=2, save_strategy="steps",
                      save_steps=1)
    raw["data"]["eval"] = raw["data"]["eval"][:1]
    _run(raw)
    sel = json.loads((tmp_path / "full" / "selection_rank0.json").read_text())
    assert sel["selections"] == 2 and sel["step"] == 7  # selected again after the second estimation block
    rows = list(csv.DictReader(open(tmp_path / "full" / "log.csv")))
    assert [int(r["stage"]) for r in rows if r.get("loss")] == [1, 2, 2, 3, 3, 2, 2, 3]
    resumed = copy.deepcopy(raw)
    resumed["training"].update(output_dir=str(tmp_path / "resumed"), save_strategy="no")
    _run(resumed, resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{stop_at}"))
    _same_adapter(tmp_path / "full", tmp_path / "resumed")


def test_periodic_evaluation_needs_eval_domains(synth, tmp_path):
    raw = tiny_config(synth, tmp_path / "run", eval_strategy="steps", eval_steps=1)
    raw["data"]["eval"] = []
    with pytest.raises(ConfigError, match=r"data\.eval is empty"):
        _run(raw)
    assert not (tmp_path / "run" / "log.csv").exists()
