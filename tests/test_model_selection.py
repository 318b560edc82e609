"""Source-side model selection (training/eval_sets.py, config/evaluation_checks.py): a held-out part of the source
training set (or a named dataset) is the set `save_strategy: best` ranks on; it is never trained on, logged as its
own domain and kept out of the target mean; ranking on the target domains warns that it is test-set selection."""

from __future__ import annotations

import copy
import csv
import json
import warnings

import numpy as np
import pytest
import torch
from test_trainer import tiny_config
from transformers import TrainerCallback

from peft_fishertune.training import ConfigError, load_config, run_experiment
from peft_fishertune.training.eval_sets import Subset, selection_domain, split_holdout
from peft_fishertune.training.experiment import build_data

HOLDOUT = "selection/cityscapes-holdout"


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _with_holdout(synth, out, fraction=0.34, **training):
    raw = tiny_config(synth, out, stages=(1, 1, 2), pictures_per_domain=0, **training)
    raw["data"]["selection_holdout"] = fraction
    return raw


def _pixels(sample) -> bytes:
    return np.asarray(sample["image"]).tobytes()


def test_held_out_images_are_not_in_the_training_set(synth, tmp_path):
    cfg = load_config(_with_holdout(synth, tmp_path / "run"))
    train, evals = build_data(cfg, train_length=8, seed=0)
    assert list(evals) == ["clean", "fog", HOLDOUT]  # the selection domain after the targets
    assert isinstance(train.base, Subset) and isinstance(evals[HOLDOUT].base, Subset)
    source = train.base.base  # the whole source training split (6 images)
    assert len(source) == 6 and len(train.base) == 4 and len(evals[HOLDOUT]) == 2  # round(0.34 * 6) = 2 held out
    trained = {_pixels(train.base[i]) for i in range(len(train.base))}
    held = {_pixels(evals[HOLDOUT].base[i]) for i in range(len(evals[HOLDOUT]))}
    assert len(trained) == 4 and len(held) == 2 and not trained & held  # no held-out image is trained on
    assert trained | held == {_pixels(source[i]) for i in range(6)}  # and none is lost
    # every training item (iteration i is image i % N of the training part) comes from the training part
    assert train.base.indices == split_holdout(6, 0.34, seed=0)[0]
    # the split is drawn by data.selection_seed, the same every time
    assert split_holdout(6, 0.34, 0) == split_holdout(6, 0.34, 0)
    assert split_holdout(6, 0.34, 0) != split_holdout(6, 0.34, 3)
    assert selection_domain(cfg.data) == HOLDOUT


def test_a_selection_set_by_name_keeps_every_training_image(synth, tmp_path):
    raw = tiny_config(synth, tmp_path / "run", stages=(1, 1, 2))
    raw["data"]["selection_set"] = {"name": "cityscapes", "root": str(synth / "clean"), "split": "val",
                                    "label": "clean-val"}
    cfg = load_config(raw)
    train, evals = build_data(cfg, train_length=8, seed=0)
    assert len(train.base) == 6 and list(evals) == ["clean", "fog", "selection/clean-val"]
    assert len(evals["selection/clean-val"]) == 2


class _SpoilDecoder(TrainerCallback):
    """Scrambles the decoder before step 3, so the evaluations after step 2 are far worse than step 2's: the best
    checkpoint is then an early one, and loading it at the end must bring step 2's numbers back."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 2:
            from peft_fishertune.training.methods import segmentor_of

            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in segmentor_of(model).decode_head.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 3)


def test_the_best_checkpoint_is_chosen_by_the_selection_domain(synth, tmp_path, capsys):
    out = tmp_path / "run"
    raw = _with_holdout(synth, out, eval_strategy="steps", eval_steps=1, save_strategy="best",
                        metric_for_best_model="selection_mIoU", load_best_model_at_end=True,
                        decoder_lr=0.05, backbone_lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # ranking on the selection set: no test-set warning
        cfg = load_config(copy.deepcopy(raw))
    result = run_experiment(cfg, callbacks=[_SpoilDecoder()])
    rows = [r for r in csv.DictReader(open(out / "log.csv")) if r.get("eval_selection_mIoU")]
    periodic = {int(r["step"]): r for r in rows[:4]}  # steps 1..4; the last row is the final re-evaluation
    assert sorted(periodic) == [1, 2, 3, 4]
    sel = {s: float(r["eval_selection_mIoU"]) for s, r in periodic.items()}
    target = {s: float(r["eval_mIoU"]) for s, r in periodic.items()}
    assert all(sel[s] != target[s] for s in sel)  # two different rankings are possible
    best = max(sel, key=lambda s: (sel[s], -s))
    info = result.model_selection
    assert info["metric"] == "eval_selection_mIoU" and info["ranks_on"] == "selection"
    assert info["best_step"] == best and info["best_metric"] == pytest.approx(sel[best])
    assert best <= 2  # the scrambled decoder (steps 3, 4) is never the best
    # save_strategy best: a checkpoint exactly where the selection metric improved on its running best
    improved, top = [], float("-inf")
    for s in sorted(sel):
        if sel[s] > top:
            improved, top = improved + [s], sel[s]
    assert sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == improved
    assert info["best_checkpoint"] == str(out / f"checkpoint-{best}")
    # load_best_model_at_end: the final table is the best checkpoint's (evaluated again, not the last step's)
    assert result.table["fog"] == pytest.approx(float(periodic[best]["eval_fog_mIoU"]), abs=1e-6)
    assert info["mIoU"] == pytest.approx(sel[best], abs=1e-6)
    # the selection domain is reported, outside the target mean and outside result.table
    saved = json.loads((out / "results.json").read_text())
    ev = saved["evaluation"]
    assert ev["domains"][HOLDOUT]["role"] == "selection" and set(result.table) == {"clean", "fog"}
    assert ev["mean_mIoU"] == pytest.approx((result.table["clean"] + result.table["fog"]) / 2)
    assert f"{HOLDOUT} (model selection, source side) left out" in ev["mean_definition"]
    assert f"model selection: best eval_selection_mIoU {sel[best]:.2f} at step {best}" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- config time


def test_ranking_on_the_target_domains_warns_that_it_is_test_set_selection(synth, tmp_path):
    raw = tiny_config(synth, tmp_path / "run", eval_strategy="steps", eval_steps=1, save_strategy="best",
                      metric_for_best_model="mIoU")
    with pytest.warns(UserWarning, match=r"TEST-SET SELECTION: training.save_strategy=best .* ranks checkpoints on "
                                         r"the target domains \['clean', 'fog'\]") as caught:
        load_config(copy.deepcopy(raw))
    assert "data.selection_holdout: 0.1" in str(caught[0].message)
    assert "training.metric_for_best_model: selection_mIoU" in str(caught[0].message)
    # a selection set does not help when the metric still names a target domain
    raw["data"]["selection_holdout"] = 0.34
    raw["training"]["metric_for_best_model"] = "eval_fog_mIoU"
    with pytest.warns(UserWarning, match="TEST-SET SELECTION"):
        load_config(copy.deepcopy(raw))
    # load_best_model_at_end ranks too (with save_strategy steps)
    raw["training"].update(save_strategy="steps", save_steps=1, load_best_model_at_end=True)
    with pytest.warns(UserWarning, match=r"TEST-SET SELECTION: training.metric_for_best_model='eval_fog_mIoU'"):
        load_config(copy.deepcopy(raw))


@pytest.mark.parametrize("data, training, match", [
    ({}, {"metric_for_best_model": "selection_mIoU"},
     r"metric_for_best_model='selection_mIoU' ranks on the model-selection set, but the config has none: set "
     r"data.selection_holdout"),
    ({"selection_holdout": 0.1, "selection_set": {"name": "cityscapes", "root": "x", "split": "val"}}, {},
     r"data.selection_holdout and data.selection_set are both set"),
    ({"selection_holdout": 1.0}, {}, r"data.selection_holdout=1.0: expected a fraction strictly between 0 and 1"),
    ({"selection_holdout": 0.1}, {"metric_for_best_model": None},
     r"save_strategy=best saves a checkpoint each time metric_for_best_model improves, but metric_for_best_model "
     r"is not set"),
    ({"selection_holdout": 0.1}, {"eval_strategy": "no"}, r"training.eval_strategy is 'no': nothing is evaluated"),
    ({"selection_holdout": 0.1}, {"metric_for_best_model": "loss"},
     r"metric_for_best_model='loss' is not a metric the evaluation logs \(it logs no loss\)"),
    ({"selection_holdout": 0.1}, {"greater_is_better": False}, r"greater_is_better=false .* would keep the lowest"),
])
def test_model_selection_mistakes_are_config_errors(synth, tmp_path, data, training, match):
    raw = tiny_config(synth, tmp_path / "run", eval_strategy="steps", eval_steps=1, save_strategy="best",
                      metric_for_best_model="selection_mIoU")
    raw["data"].update(data)
    raw["training"].update(training)
    with pytest.raises(ConfigError, match=match):
        load_config(raw)


def test_a_target_may_not_be_named_like_the_selection_set(synth, tmp_path):
    raw = tiny_config(synth, tmp_path / "run")
    raw["data"]["eval"][1]["label"] = "selection/fog"
    with pytest.raises(ConfigError, match=r"data.eval\[1\] is named 'selection/fog'"):
        load_config(raw)


def test_holding_out_everything_or_nothing_is_refused(synth, tmp_path):
    # at config time, from the images the source folder holds
    with pytest.raises(ConfigError, match=r"data.selection_holdout=0.05: holding out 0.05 of the 6 source training "
                                          r"images leaves 0 for model selection and 6 for training"):
        load_config(_with_holdout(synth, tmp_path / "run", fraction=0.05))
    # and when the data is built (a config loaded without its paths checked)
    cfg = load_config(_with_holdout(synth, tmp_path / "run", fraction=0.05), check_paths=False)
    with pytest.raises(ValueError, match="leaves 0 for model selection and 6 for training"):
        build_data(cfg, train_length=8, seed=0)
    with pytest.raises(ValueError, match="leaves 6 for model selection and 0 for training"):
        split_holdout(6, 0.95, 0)
