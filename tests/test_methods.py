"""The method table, the stage plan (sequential and alternating), the model's parameter groups for late
parameters, and the typed evaluation table: pure pieces, tested without training."""

from __future__ import annotations

import pytest
import torch

from peft_fishertune.inference import EvaluationTable, evaluation_table
from peft_fishertune.trainer.plan import StagePlan
from peft_fishertune.training import config as config_module
from peft_fishertune.training.methods import METHODS, get_method, method_names


def test_every_config_method_is_a_row_of_the_table():
    assert config_module.METHODS == tuple(METHODS)
    assert set(config_module.SPARSE_METHODS) == {n for n, m in METHODS.items() if m.selection is not None}
    assert {"lora", "rein", "full", "freeze"} <= set(method_names(sparse=False))  # + the PEFT baselines' rows
    for m in METHODS.values():
        assert m.estimator == (m.selection == "fisher")
        assert m.saves in ("adapter", "model")
        assert set(m.stage_requirements()) <= {"stage2_steps", "stage3_steps"}
    assert get_method("fim").fishertune_overrides == {"fisher_estimator": "empirical", "lambda_dr": 0.0}
    assert get_method("rein").backbone_from_stage == 1 and not get_method("rein").estimator
    with pytest.raises(ValueError, match="method.name='no_such_method' is not allowed"):
        get_method("no_such_method")


def _phases(plan):
    return [plan.at(s) for s in range(plan.total)]


def test_sequential_plan_matches_algorithm_1():
    plan = StagePlan(2, 2, 3, estimates=True, selects=True, backbone_from_stage=3)
    ph = _phases(plan)
    assert [p.stage for p in ph] == [1, 1, 2, 2, 3, 3, 3]
    assert [p.estimating for p in ph] == [False, False, True, True, False, False, False]
    assert [p.backbone_trains for p in ph] == [False] * 4 + [True] * 3
    assert [p.select_now for p in ph] == [False] * 4 + [True, False, False]
    assert [p.tune_step for p in ph] == [None] * 4 + [0, 1, 2]
    fr = [plan.fraction_at(s, 0.01, 0.15, "exp") for s in range(7)]
    assert fr[:4] == [None] * 4 and fr[4] == pytest.approx(0.01) and fr[6] == pytest.approx(0.15) and fr[4:] == sorted(fr[4:])
    lora = StagePlan(2, 2, 3, estimates=False, selects=False, backbone_from_stage=2)
    assert [p.backbone_trains for p in _phases(lora)] == [False] * 2 + [True] * 5
    assert not any(p.select_now or p.estimating for p in _phases(lora)) and lora.fraction_at(5, 0.01, 0.1) is None
    freeze = StagePlan(2, 2, 3, estimates=False, selects=False, backbone_from_stage=None)
    assert not any(p.backbone_trains for p in _phases(freeze))


def test_alternating_plan_blocks():
    # warm-up 2, then 9 steps in blocks of 2: E E T T E E T T [E -> tuned: nothing would use its estimate]
    plan = StagePlan(2, 4, 5, alternate_steps=2)
    ph = _phases(plan)
    assert [p.stage for p in ph] == [1, 1, 2, 2, 3, 3, 2, 2, 3, 3, 3]
    assert [p.select_now for p in ph] == [False] * 4 + [True, False, False, False, True, False, False]
    assert [p.estimating for p in ph] == [p.stage == 2 for p in ph]
    assert [p.backbone_trains for p in ph] == [p.stage == 3 for p in ph]
    assert plan.tune_steps == 5 and [p.tune_step for p in ph if p.stage == 3] == [0, 1, 2, 3, 4]
    fr = [plan.fraction_at(s, 0.02, 0.2, "linear") for s in range(plan.total)]
    tuned = [f for f in fr if f is not None]
    assert tuned[0] == pytest.approx(0.02) and tuned[-1] == pytest.approx(0.2) and tuned == sorted(tuned)
    assert "alternating" in plan.describe()


@pytest.mark.parametrize("kwargs,match", [
    (dict(alternate_steps=2, estimates=False, selects=True), "needs a method that estimates"),
    (dict(alternate_steps=7), "leaves no tuning block"),
    (dict(alternate_steps=-1), "alternate_steps=-1"),
    (dict(backbone_from_stage=4), "backbone_from_stage=4"),
])
def test_plan_refuses_what_cannot_run(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StagePlan(1, 3, 4, **kwargs)


def test_late_parameters_are_grouped_by_the_model():
    import peft

    from peft_fishertune import FisherTuneConfig
    from peft_fishertune.models import build_segmentation_model, tiny_backbone_config

    seg = build_segmentation_model("dinov2", backbone_config=tiny_backbone_config(
        "dinov2", hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=8,
        image_size=32), decoder="linear", num_labels=3)
    model = peft.get_peft_model(seg, FisherTuneConfig(target_modules=seg.fisher_target_modules(),
                                                      modules_to_save=seg.decoder_module_names()))
    inner = model.base_model.model
    from peft_fishertune.training.methods import adapter_parameters

    values = adapter_parameters(model)
    assert values and all(p.ndim == 1 for p in values)
    inner.set_backbone_trainable(False)
    groups = {g["name"]: g["params"] for g in inner.param_groups(1e-5, 1e-4, 0.05, params=values)}
    # the values are deltas of Linear weights: they decay with them, and they sit in the backbone groups
    assert [id(p) for p in groups["backbone/decay"]] == [id(p) for p in values]
    assert not groups["backbone/no_decay"] and not groups["decoder/decay"] and not groups["decoder/no_decay"]
    with pytest.raises(ValueError, match="not parameters of this model"):
        inner.param_groups(params=[torch.nn.Parameter(torch.zeros(2))])


def test_evaluation_table_keeps_every_domain():
    results = {"avg": {"mean_iou": 0.5, "per_category_iou": [0.5, float("nan")]},
               "fog": {"mean_iou": 0.25, "per_category_iou": [0.25, 0.25]}}
    table = evaluation_table(results, sizes={"avg": 3, "fog": 2}, step=7)
    assert table.names == ["avg", "fog"] and table.miou == {"avg": 50.0, "fog": 25.0}
    assert table.mean == pytest.approx(37.5) and table["avg"].num_images == 3
    metrics = table.log_metrics()
    assert metrics == {"eval_avg_mIoU": 50.0, "eval_fog_mIoU": 25.0, "eval_mIoU": 37.5}
    csv_text = table.to_csv().splitlines()
    assert csv_text[0] == "domain,mIoU,images" and csv_text[1].startswith("avg,50.0000") and "mean of 2" in csv_text[-1]
    assert "| avg | fog | avg |" in table.to_markdown()
    with pytest.raises(ValueError, match="distinct names"):
        EvaluationTable((table["fog"], table["fog"]))


def test_stage_plan_lines_come_from_the_table():
    from types import SimpleNamespace

    from peft_fishertune.training.experiment import stage_plan

    args = SimpleNamespace(stage1_steps=2, stage2_steps=2, stage3_steps=3, alternate_steps=0)
    ft = stage_plan(args, "fishertune")
    assert len(ft) == 3 and "Fisher scores estimated" in ft[1] and "selected backbone elements" in ft[2]
    lora = stage_plan(args, "lora")
    assert "what lora trains (LoRA" in lora[1] and "Fisher" not in lora[1]
    assert stage_plan(args, "freeze")[2].endswith("decoder")
    assert "backbone frozen" in ft[0] and "backbone frozen" in lora[0]
    rein = stage_plan(args, "rein")  # Rein's tokens train from stage 1 on: its first line says so, not a warm-up
    assert rein[0].startswith("stage 1  steps [0, 2): decoder + what rein trains (Rein"), rein[0]
    assert "warm-up" not in rein[0]
    args.alternate_steps = 2
    alt = stage_plan(args, "fim")
    assert len(alt) == 2 and "alternating blocks of 2" in alt[1] and "3 tuning steps" in alt[1]


def test_step_kinds_say_which_stages_run_the_same_step():
    """What a step of stage 1, 2, 3 computes, from the row: the estimator's stage 2 is its own kind; the stages in
    which the backbone trains share one; the decoder-alone stages another (run_cost times stages of one kind as one)."""
    kinds = {n: m.step_kinds for n, m in METHODS.items()}
    assert kinds["fishertune"] == kinds["fim"] == ("decoder", "estimate", "backbone")
    assert kinds["lora"] == kinds["full"] == kinds["shira"] == ("decoder", "backbone", "backbone")
    assert kinds["random"] == kinds["magnitude"] == ("decoder", "decoder", "backbone")
    assert kinds["rein"] == ("backbone",) * 3 and kinds["freeze"] == ("decoder",) * 3
    for name, m in METHODS.items():  # the plan agrees stage by stage
        plan = StagePlan(1, 1, 1, estimates=m.estimator, selects=m.selects, backbone_from_stage=m.backbone_from_stage)
        for stage, kind in zip((1, 2, 3), m.step_kinds):
            phase = plan.at(stage - 1)
            assert (kind == "estimate") == phase.estimating, (name, stage)
            assert (kind == "backbone") == (phase.backbone_trains and not phase.estimating), (name, stage)
