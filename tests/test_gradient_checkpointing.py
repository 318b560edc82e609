"""Fisher estimation under transformers' gradient checkpointing (issue 21, deliverable 6): with
`model.gradient_checkpointing_enable()` both estimators give the same scores as without it (they turn the
checkpointing flags off for their own passes and restore them after)."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from peft import get_peft_model

import peft_fishertune as pf
from peft_fishertune.fisher import estimate_dr_fim, make_estimator


def _model(checkpointing: bool, estimator: str, mode: str):
    torch.manual_seed(0)
    m = T.Dinov2ForImageClassification(T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                      mlp_ratio=2, image_size=32, patch_size=8, num_labels=3))
    if checkpointing:
        m.gradient_checkpointing_enable()
    cfg = pf.FisherTuneConfig(fisher_estimator=estimator, fisher_mode=mode, modules_to_save=["classifier"],
                              accumulator_dtype="float32")
    model = get_peft_model(m, cfg)
    model.train()
    return model


def _batches():
    g = torch.Generator().manual_seed(1)
    return [{"pixel_values": torch.randn(3, 3, 32, 32, generator=g), "labels": torch.randint(0, 3, (3,), generator=g)}
            for _ in range(2)]


def _flags(model):
    return [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")
            and isinstance(m.gradient_checkpointing, bool)]


@pytest.mark.parametrize("estimator, mode", [("empirical", "per_sample"), ("empirical", "batch"),
                                             ("variational", "per_sample")])
def test_scores_equal_with_and_without_gradient_checkpointing(estimator, mode):
    plain = _model(False, estimator, mode)
    ref = estimate_dr_fim(plain, _batches(), config=plain.peft_config["default"], progress=False).scores
    ckpt = _model(True, estimator, mode)
    flags = _flags(ckpt)
    assert flags and all(flags)  # checkpointing is on in the model
    got = estimate_dr_fim(ckpt, _batches(), config=ckpt.peft_config["default"], progress=False).scores
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=0)
    assert _flags(ckpt) == flags  # restored for training


def test_training_step_still_checkpoints_between_estimator_steps():
    """The stateful API (stage 2 interleaved with training steps): the flags are off only inside step()."""
    model = _model(True, "empirical", "batch")
    est = make_estimator(model, model.peft_config["default"])
    for batch in _batches():
        model(**batch).loss.backward()  # a training step, checkpointed
        est.step(batch)
        assert all(_flags(model))
    assert est.result().scores
    est.release()
