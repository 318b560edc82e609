"""Re-estimation: Fisher scores on a model that already has active FisherTune elements.

The scores must be those of the same effective weights W + δ with nothing active (the merged model), for both
estimators and both fisher_mode values. Before the fix, the variational estimator sampled the base layer's
weight while an active FisherTune layer reads it directly (its sparse-delta path), so the sample was never used
and every layer with active elements scored all zeros.
"""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from peft_fishertune import FisherTuneConfig, select_parameters, set_active_fraction
from peft_fishertune.fisher import estimate_dr_fim
from peft_fishertune.tuner.layer import FisherTuneLayer
from peft_fishertune.tuner.selection import target_parameters

TARGETS = ["q_proj", "v_proj", "fc1", "norm1"]  # Linear (fast path) and LayerNorm (generic path)


class TinySeg(nn.Module):
    def __init__(self):
        super().__init__()
        cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=28, patch_size=14)
        self.backbone = Dinov2Model(cfg)
        self.head = nn.Conv2d(32, 3, 1)

    def forward(self, pixel_values, labels):
        h = self.backbone(pixel_values=pixel_values).last_hidden_state[:, 1:]
        b, n, c = h.shape
        logits = self.head(h.transpose(1, 2).reshape(b, c, 2, 2))
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return {"loss": F.cross_entropy(logits, labels)}


def _batches(n=2, b=2):
    g = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(b, 3, 28, 28, generator=g, dtype=torch.float64),
             "labels": torch.randint(0, 3, (b, 28, 28), generator=g)} for _ in range(n)]


def _active_model(estimator, mode):
    """A PEFT model with half its candidates active and trained-looking deltas, and its merged plain twin."""
    torch.manual_seed(0)
    # float64: the two models round differently (fp(W + σξ) + δ against fp(W + δ) + σξ); in fp64 that is far below
    # the tolerance, so the comparison tests the estimate, not fp32 rounding
    base = TinySeg().double().eval()
    cfg = FisherTuneConfig(target_modules=TARGETS, fisher_estimator=estimator, fisher_mode=mode, seed=3,
                           accumulator_dtype="float32", delta_min=0.05, delta_max=0.3)
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(1)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in target_parameters(model)}
    select_parameters(model, scores)
    set_active_fraction(model, 0.2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FisherTuneLayer):
                v = m.ft_values["default"]
                mask = m.ft_rank["default"] < m.ft_threshold["default"]
                v.copy_(torch.where(mask, 0.2 * torch.randn(v.shape, generator=g, dtype=v.dtype), torch.zeros_like(v)))
    layers = [m for m in model.modules() if isinstance(m, FisherTuneLayer)]
    assert len(layers) == 2 * len(TARGETS) and all(m.num_active("default") for m in layers)
    merged = copy.deepcopy(model).merge_and_unload()
    return model, merged, cfg


def _merged_params(merged, names):
    own = dict(merged.named_parameters())
    return {n: own[n] for n in names}


@pytest.mark.parametrize("mode", ["batch", "per_sample"])
@pytest.mark.parametrize("estimator", ["variational", "empirical"])
def test_scores_with_active_elements_equal_the_merged_model(estimator, mode, caplog):
    model, merged, cfg = _active_model(estimator, mode)
    names = [n for n, _ in target_parameters(model)]
    batches = _batches()
    with caplog.at_level(logging.WARNING, logger="peft_fishertune.fisher"):
        active = estimate_dr_fim(model, batches, config=cfg, progress=False)
    assert "never called" not in caplog.text  # every FisherTune layer is called: no misleading warning
    ref = estimate_dr_fim(merged, batches, config=cfg, params=_merged_params(merged, names), progress=False)
    assert list(active.scores) == names
    for n in names:
        assert float(active.scores[n].abs().sum()) > 0, f"{n}: all-zero scores on the model with active elements"
        torch.testing.assert_close(active.scores[n], ref.scores[n], rtol=1e-4, atol=1e-6, msg=n)
        torch.testing.assert_close(active.fisher_x[n], ref.fisher_x[n], rtol=1e-4, atol=1e-9, msg=n)


class ReadsWeightDirectly(nn.Module):
    """`a` is never called: the parent reads its weight (the case the warning is for)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, pixel_values, labels):
        h = torch.relu(F.linear(pixel_values, self.a.weight, self.a.bias))
        return {"loss": F.cross_entropy(self.b(h), labels)}


def test_uncalled_warning_only_for_a_module_that_is_really_never_called(caplog):
    from peft_fishertune.fisher import VariationalFisherEstimator

    torch.manual_seed(0)
    model = ReadsWeightDirectly()
    batch = {"pixel_values": torch.randn(6, 4), "labels": torch.randint(0, 3, (6,))}
    est = VariationalFisherEstimator(model, params={"a.weight": model.a.weight, "b.weight": model.b.weight},
                                     mode="batch", perturb=False)
    with caplog.at_level(logging.WARNING, logger="peft_fishertune.fisher"):
        est.step(batch)
    res = est.result()
    assert "never called" in caplog.text and "'a'" in caplog.text and "'b'" not in caplog.text
    assert float(res.fisher_x["a.weight"].abs().sum()) == 0 and float(res.fisher_x["b.weight"].sum()) > 0


# ------------------------------------------------------------------ alternating execution (Table 2's AE)
def test_alternating_execution_second_selection_spreads_like_the_first(synth, tmp_path, monkeypatch):
    """AE re-estimates on a model with active elements: the second selection's scores must not be all zero for the
    layers that were active (before the fix every such tensor scored 0 and the second selection went entirely to
    the few tensors without active elements)."""
    from test_trainer import _run, tiny_config

    import peft_fishertune.tuner.selection as selection

    seen: list[dict[str, torch.Tensor]] = []
    original = selection.select_parameters

    def recording(model, scores, *args, **kwargs):
        seen.append({n: s.detach().float().clone() for n, s in scores.items()})
        return original(model, scores, *args, **kwargs)

    monkeypatch.setattr(selection, "select_parameters", recording)
    # warm-up 1, then blocks of 1: estimate [1], tune [2], estimate [3], tune [4]
    raw = tiny_config(synth, tmp_path / "ae", stages=(1, 2, 2), alternate_steps=1, save_strategy="no")
    raw["data"]["eval"] = raw["data"]["eval"][:1]
    raw["method"]["fishertune"]["fisher_estimator"] = "variational"
    _run(raw)
    assert len(seen) == 2, f"expected two selections in AE, saw {len(seen)}"
    first, second = seen
    zero = [n for n, s in second.items() if float(s.abs().sum()) == 0]
    assert not zero, f"all-zero re-estimated scores for {zero}"

    def shares(scores):  # share of the global top 20 % (δ_max) per layer type
        flat = torch.cat([s.reshape(-1) for s in scores.values()])
        thr = torch.topk(flat, int(0.2 * flat.numel())).values.min()
        out: dict[str, int] = {}
        for n, s in scores.items():
            kind = n.rsplit(".", 2)[-2]
            out[kind] = out.get(kind, 0) + int(((s >= thr) & (s > 0)).sum())  # a zero score is no selection
        total = sum(out.values())
        return {k: v / total for k, v in out.items()}

    s1, s2 = shares(first), shares(second)
    assert set(s1) == set(s2) and len(s1) >= 4, (s1, s2)
    assert all(s2[k] > 0 for k in s1 if s1[k] > 0.02), (s1, s2)  # no layer type drops to 0 %


def test_reloaded_adapter_scores_equal_the_merged_model(tmp_path):
    from peft import PeftModel

    model, merged, cfg = _active_model("variational", "batch")
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(TinySeg().double().eval(), tmp_path).eval()
    names = [n for n, _ in target_parameters(loaded)]
    batches = _batches()
    again = estimate_dr_fim(loaded, batches, config=cfg, progress=False)
    ref = estimate_dr_fim(merged, batches, config=cfg, params=_merged_params(merged, names), progress=False)
    for n in names:
        assert float(again.scores[n].abs().sum()) > 0, n
        torch.testing.assert_close(again.scores[n], ref.scores[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("regenerate", [True, False])
def test_without_block_checkpointing_the_wrapper_is_checkpointed_and_scores_equal(regenerate):
    """estimator_checkpointing=False: the FisherTune wrapper itself runs under activation checkpointing (backward
    re-runs it and regenerates the sample), or keeps its sample (regenerate_samples=False)."""
    model, merged, cfg = _active_model("variational", "batch")
    cfg.estimator_checkpointing = False
    names = [n for n, _ in target_parameters(model)]
    batches = _batches()
    active = estimate_dr_fim(model, batches, config=cfg, progress=False, regenerate_samples=regenerate)
    ref = estimate_dr_fim(merged, batches, config=cfg, params=_merged_params(merged, names), progress=False,
                          regenerate_samples=regenerate)
    assert active.metadata["checkpointed_blocks"] == 0
    for n in names:
        assert float(active.scores[n].abs().sum()) > 0, n
        torch.testing.assert_close(active.scores[n], ref.scores[n], rtol=1e-4, atol=1e-6, msg=n)
