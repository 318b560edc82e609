"""DR-FIM: Eq. 14 per draw, the normalized λ-combination, x' = x, and a PEFT-wrapped model."""

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from peft_fishertune import FisherTuneConfig, target_parameters
from peft_fishertune.fisher import (
    EmpiricalFisherEstimator,
    VariationalFisherEstimator,
    combine_dr_fim,
    delta_fisher,
    estimate_dr_fim,
    make_estimator,
    perturb_features,
)
from peft_fishertune.fisher.perturbation import draw


class Softmax2d(nn.Module):
    """Per-pixel softmax regression on a (B, C, H, W) image: a 1x1 conv."""

    def __init__(self, c=3, k=4):
        super().__init__()
        self.conv = nn.Conv2d(c, k, 1)

    def forward(self, pixel_values, labels):
        return {"loss": F.cross_entropy(self.conv(pixel_values), labels)}


def _batches(n=3, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(b, 3, 6, 6, generator=g) * torch.tensor([1.0, 2.0, 0.5])[:, None, None] + 0.3,
             "labels": torch.randint(0, 4, (b, 6, 6), generator=g)} for _ in range(n)]


def test_delta_and_combination_formulas():
    fx = {"a": torch.tensor([1.0, 2.0, 0.0]), "b": torch.tensor([[4.0]])}
    fxp = {"a": torch.tensor([3.0, 2.0, 0.0]), "b": torch.tensor([[1.0]])}
    eps = 1e-3 * (7.0 / 4)  # dr_eps · global mean F(x)
    d = delta_fisher(fx, fxp)
    torch.testing.assert_close(d["a"], torch.tensor([2 / (1 + eps), 0.0, 0.0]))
    torch.testing.assert_close(d["b"], torch.tensor([[3 / (1 + eps)]]))
    s = combine_dr_fim(fx, d, lambda_dr=0.25)
    mf, md = 7.0 / 4, float(d["a"].sum() + d["b"].sum()) / 4
    torch.testing.assert_close(s["a"], 0.75 * fx["a"] / mf + 0.25 * d["a"] / md)
    # λ = 0.5 is an even mix: each term holds half of the score mass
    s = combine_dr_fim(fx, d, lambda_dr=0.5)
    total = sum(float(t.sum()) for t in s.values())
    dr_mass = sum(float((0.5 * d[n] / md).sum()) for n in d)
    assert dr_mass / total == pytest.approx(0.5)
    assert delta_fisher(fx, fx)["a"].abs().max() == 0  # ΔF = 0 when F(x') = F(x)
    with pytest.raises(ValueError, match="lambda_dr=1.5"):
        combine_dr_fim(fx, d, lambda_dr=1.5)


@torch.no_grad()
def _closed_form_fisher(model, batch, x=None):
    """Per-sample empirical Fisher of the 1x1-conv softmax regression on one batch, float64 (weight, bias)."""
    x = batch["pixel_values"] if x is None else x
    fw = torch.zeros(4, 3, 1, 1, dtype=torch.float64)
    fb = torch.zeros(4, dtype=torch.float64)
    for xi, y in zip(x.double(), batch["labels"]):
        r = torch.softmax(torch.einsum("kc,chw->khw", model.conv.weight[:, :, 0, 0].double(), xi)
                          + model.conv.bias.double()[:, None, None], 0) - F.one_hot(y, 4).permute(2, 0, 1)
        fw += (torch.einsum("khw,chw->kc", r, xi) / 36).square()[:, :, None, None]
        fb += r.mean((1, 2)).square()
    return {"conv.weight": fw / len(x), "conv.bias": fb / len(x)}


def test_empirical_dr_fim_matches_closed_form_per_draw():
    torch.manual_seed(0)
    model = Softmax2d()
    batches = _batches()
    params = dict(model.named_parameters())
    cfg = FisherTuneConfig(target_modules=["conv"], fisher_estimator="empirical", seed=11, lambda_dr=0.4,
                           accumulator_dtype="float32")  # exact sums: the test checks the formulas
    res = estimate_dr_fim(model, batches, config=cfg, params=params, progress=False, keep_fisher_xp=True)
    # by hand: batch i is draw i; ΔF_i from that batch's own F(x), F(x'), weighted by its own w_i (Eq. 14)
    ws, fx, fxp, df = [], [], [], {n: 0.0 for n in params}
    for i, bt in enumerate(batches):
        d = draw(3, 11, i)
        ws.append(d.weight)
        fx_i = _closed_form_fisher(model, bt)
        fxp_i = _closed_form_fisher(model, bt, perturb_features(bt["pixel_values"], d.eps_mu, d.eps_sigma))
        fx.append(fx_i)
        fxp.append(fxp_i)
        eps = 1e-3 * float(sum(t.sum() for t in fx_i.values())) / 16
        for n in params:
            df[n] = df[n] + d.weight * (fx_i[n] - fxp_i[n]).abs() / (torch.minimum(fx_i[n], fxp_i[n]) + eps)
    for n in params:
        torch.testing.assert_close(res.fisher_x[n].double(), sum(f[n] for f in fx) / 3, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(res.fisher_xp[n].double(), sum(f[n] for f in fxp) / 3, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(res.delta_f[n].double(), df[n] / sum(ws), rtol=1e-3, atol=1e-6)
    assert res.perturbation_weight == pytest.approx(sum(ws) / 3)
    # not what the averaged estimates give (the per-draw weighting is visible on this data)
    pooled = delta_fisher(res.fisher_x, res.fisher_xp)
    assert not torch.allclose(pooled["conv.weight"], res.delta_f["conv.weight"], rtol=0.05)
    expected = combine_dr_fim(res.fisher_x, res.delta_f, lambda_dr=0.4)
    torch.testing.assert_close(res.scores["conv.weight"], expected["conv.weight"])
    assert 0 <= res.metadata["dr_share_top"] <= 1 and res.metadata["lambda_effective"] == pytest.approx(0.4)


@pytest.mark.parametrize("estimator", ["empirical", "variational"])
def test_delta_f_zero_when_x_prime_equals_x(estimator):
    model = Softmax2d()
    # identical samples: the batch std of the statistics is 0, so x' = x (up to rounding)
    one = _batches(n=1, b=1)[0]
    batches = [{k: v.expand(4, *v.shape[1:]).clone() for k, v in one.items()}] * 2
    cfg = FisherTuneConfig(target_modules=["conv"], fisher_estimator=estimator, data_scale=100.0)
    res = estimate_dr_fim(model, batches, config=cfg, params=dict(model.named_parameters()), progress=False)
    for n in res.delta_f:
        assert res.delta_f[n].abs().max() < 1e-4, n
    # perturbation off: the x' pass is skipped, ΔF is exactly 0 and the score is F / mean F
    res = estimate_dr_fim(model, _batches(), config=cfg, params=dict(model.named_parameters()), progress=False,
                          perturb=False)
    assert res.fisher_xp is None and all(torch.equal(t, torch.zeros_like(t)) for t in res.delta_f.values())
    mean_f = sum(float(t.sum()) for t in res.fisher_x.values()) / sum(t.numel() for t in res.fisher_x.values())
    for n in res.scores:
        torch.testing.assert_close(res.scores[n], 0.5 * res.fisher_x[n] / mean_f)


def test_empirical_resume_equals_uninterrupted():
    model = Softmax2d()
    batches = _batches(n=4)
    kw = dict(params=dict(model.named_parameters()), mode="batch", keep_fisher_xp=True)
    ref = EmpiricalFisherEstimator(model, **kw)
    for b in batches:
        ref.step(b)
    a = EmpiricalFisherEstimator(model, **kw)
    for b in batches[:2]:
        a.step(b)
    b_ = EmpiricalFisherEstimator(model, **kw)
    b_.load_state_dict(a.state_dict())
    for b in batches[2:]:
        b_.step(b)
    r1, r2 = ref.result(), b_.result()
    for n in r1.scores:
        assert torch.equal(r1.scores[n], r2.scores[n]) and torch.equal(r1.fisher_xp[n], r2.fisher_xp[n])
    with pytest.raises(ValueError, match="mode"):
        EmpiricalFisherEstimator(model, params=kw["params"], mode="per_sample").load_state_dict(a.state_dict())


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


@pytest.mark.parametrize("estimator", ["empirical", "variational"])
def test_peft_wrapped_model_keys_and_values(estimator):
    torch.manual_seed(0)
    base = TinySeg().eval()
    ref_params = {n: p for n, p in base.named_parameters() if n.endswith(("q_proj.weight", "v_proj.weight"))}
    g = torch.Generator().manual_seed(0)
    batches = [{"pixel_values": torch.randn(3, 3, 28, 28, generator=g),
                "labels": torch.randint(0, 3, (3, 28, 28), generator=g)} for _ in range(2)]
    cfg = FisherTuneConfig(target_modules=["q_proj", "v_proj"], fisher_estimator=estimator, seed=3,
                           accumulator_dtype="float32")  # compared at rtol 1e-4
    plain = estimate_dr_fim(base, batches, config=cfg, params=ref_params, progress=False)
    peft_model = get_peft_model(base, cfg)
    names = [n for n, _ in target_parameters(peft_model)]
    before = {n: p.detach().clone() for n, p in target_parameters(peft_model)}
    wrapped = estimate_dr_fim(peft_model, batches, config=cfg, progress=False)
    assert list(wrapped.scores) == names == list(ref_params)
    for n in names:  # same numbers through the PEFT wrapper
        torch.testing.assert_close(wrapped.scores[n], plain.scores[n], rtol=1e-4, atol=1e-7)
        assert not dict(target_parameters(peft_model))[n].requires_grad
        assert dict(target_parameters(peft_model))[n].grad is None
        assert torch.equal(dict(target_parameters(peft_model))[n], before[n])
    est = make_estimator(peft_model, cfg)
    assert isinstance(est, VariationalFisherEstimator if estimator == "variational" else EmpiricalFisherEstimator)
