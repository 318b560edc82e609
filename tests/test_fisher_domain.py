"""DR-FIM and the variational knobs as issue 12 asks: the DR term matters by construction, γ and τ act,
the estimate is a running mean over all steps."""

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch import nn

from peft_fishertune import FisherTuneConfig, select_parameters, set_active_fraction
from peft_fishertune.fisher import (
    EmpiricalFisherEstimator,
    VariationalFisherEstimator,
    estimate_fisher,
    prior_pull_loss,
)


class StyleContentNet(nn.Module):
    """Per-pixel logits from two branches.

    `content`: a 1x1 conv on the instance-normalized image (invariant to per-image channel mean/std: x' = x for it).
    `style`: a linear map of the per-image channel means and stds (exactly what the perturbation changes),
    broadcast to every pixel. Content features are O(1), style features are scaled down, so F ranks the
    content weights first while ΔF ranks the style weights first.
    """

    def __init__(self, k=4):
        super().__init__()
        self.content = nn.Conv2d(3, k, 1)
        self.style = nn.Linear(6, k)
        with torch.no_grad():
            self.style.weight.mul_(0.1)

    def forward(self, pixel_values, labels):
        mu = pixel_values.mean((2, 3), keepdim=True)
        sd = pixel_values.std((2, 3), keepdim=True) + 1e-5
        content = self.content((pixel_values - mu) / sd)
        style = self.style(0.2 * torch.cat([mu, sd], 1).flatten(1))[:, :, None, None]
        return {"loss": F.cross_entropy(content + style, labels)}


def _style_batches(n=6, b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(b, 3, 8, 8, generator=g)
        x = x * (0.5 + 2 * torch.rand(b, 3, 1, 1, generator=g)) + 2 * torch.randn(b, 3, 1, 1, generator=g)
        out.append({"pixel_values": x, "labels": torch.randint(0, 4, (b, 8, 8), generator=g)})
    return out


def _run(est, batches):
    for b in batches:
        est.step(b)
    return est.result()


def _top(scores, k):
    flat = torch.cat([scores["content.weight"].flatten(), scores["style.weight"].flatten()])
    return set(torch.topk(flat, k).indices.tolist())


def _mean_style_rank(scores):
    flat = torch.cat([scores["content.weight"].flatten(), scores["style.weight"].flatten()])
    ranks = torch.argsort(torch.argsort(flat, descending=True))
    return float(ranks[scores["content.weight"].numel():].float().mean())  # lower = higher up the ranking


@pytest.mark.parametrize("kind", ["empirical", "variational"])
def test_dr_term_moves_style_sensitive_weights_up(kind):
    torch.manual_seed(0)
    model = StyleContentNet()
    params = {"content.weight": model.content.weight, "style.weight": model.style.weight}
    batches = _style_batches()
    cls = EmpiricalFisherEstimator if kind == "empirical" else VariationalFisherEstimator
    results = {lam: _run(cls(model, params=params, mode="per_sample", lambda_dr=lam, seed=1), batches)
               for lam in (0.0, 0.5, 1.0)}
    # ΔF (the domain term) is larger on the style weights, F on the content weights
    d, f = results[1.0].delta_f, results[0.0].fisher_x
    assert d["style.weight"].mean() > 3 * d["content.weight"].mean()
    assert f["content.weight"].mean() > f["style.weight"].mean()
    k = 6  # of 36 elements (≈ 15 %)
    overlap = len(_top(results[0.0].scores, k) & _top(results[1.0].scores, k)) / k
    assert overlap < 0.5, overlap
    r0, r5, r1 = (_mean_style_rank(results[lam].scores) for lam in (0.0, 0.5, 1.0))
    assert r1 < r5 < r0, (r0, r5, r1)
    assert results[0.5].metadata["lambda_effective"] == pytest.approx(0.5)


def test_gamma_and_tau_act_on_the_variational_scores_as_documented():
    """τ sets the weight jitter σ ≈ τ (scores change); γ enters only through σ² = 1/(s·F/γ + τ⁻²): no visible effect
    while the prior dominates (s·F/γ ≪ τ⁻², the paper's scale), a clear one once the data term does."""
    torch.manual_seed(0)
    model = StyleContentNet()
    params = {"content.weight": model.content.weight, "style.weight": model.style.weight}
    batches = _style_batches(n=4)

    def scores(**kw):
        est = VariationalFisherEstimator(model, params=params, mode="batch", perturb=False, seed=2, **kw)
        return torch.cat([t.flatten() for t in _run(est, batches).fisher_x.values()])

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    base = scores(gamma=0.01, tau=0.01)
    assert rel(scores(gamma=0.01, tau=1.0), base) > 0.05  # τ: jitter
    assert rel(scores(gamma=1.0, tau=0.01), base) < 1e-3  # γ: cancels while the prior dominates
    strong = dict(tau=1.0, data_scale=1e4)  # s·F/γ ≫ τ⁻²: σ is set by the data and γ
    assert rel(scores(gamma=0.01, **strong), scores(gamma=100.0, **strong)) > 0.05


def test_natural_estimate_is_a_running_mean_over_all_steps():
    """Default: Λ − τ⁻² is the running mean of s·ĝ²/γ over every step (at small τ the empirical Fisher of all the
    data); the EMA option forgets early steps."""
    torch.manual_seed(0)
    model = StyleContentNet()
    params = {"content.weight": model.content.weight}
    batches = _style_batches(n=40, b=4, seed=3)
    emp = estimate_fisher(model, batches, params=params, mode="batch", progress=False)["content.weight"]
    kw = dict(params=params, mode="batch", perturb=False, tau=1e-4)
    mean = _run(VariationalFisherEstimator(model, average="mean", lr=0.05, **kw), batches).fisher_x["content.weight"]
    ema = _run(VariationalFisherEstimator(model, average="ema", lr=0.2, **kw), batches).fisher_x["content.weight"]
    torch.testing.assert_close(mean, emp, rtol=1e-3, atol=1e-9)
    assert float((ema - emp).abs().max() / emp.max()) > 0.05
    with pytest.raises(ValueError, match="average='last'"):
        VariationalFisherEstimator(model, average="last", **kw)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x, labels=None):
        out = self.b(torch.relu(self.a(x)))
        return {"loss": F.cross_entropy(out, labels), "logits": out}


def _peft_model(**cfg):
    torch.manual_seed(0)
    config = FisherTuneConfig(target_modules=["a", "b"], delta_min=0.5, delta_max=0.5, **cfg)
    model = get_peft_model(Tiny(), config)
    select_parameters(model, {"a.weight": torch.rand(4, 4), "b.weight": torch.rand(2, 4)})
    set_active_fraction(model, 0.5)
    from peft_fishertune.tuner.layer import FisherTuneLayer

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking deltas
        for m in model.modules():
            if isinstance(m, FisherTuneLayer):
                v = m.ft_values["default"]
                v.copy_(0.1 * torch.randn(v.shape, generator=g))
    return model, config


def _active_deltas(model):
    from peft_fishertune.tuner.layer import FisherTuneLayer

    return [m.active_values("default") for m in model.modules() if isinstance(m, FisherTuneLayer)]


def test_prior_pull_is_eq7_on_the_deltas_and_gamma_tau_scale_it():
    model, cfg = _peft_model(gamma=0.01, tau=0.01)
    deltas = _active_deltas(model)
    sq = sum(float(d.detach().double().square().sum()) for d in deltas)
    assert sq > 0  # non-zero deltas, so the test can fail
    pull = prior_pull_loss(model)
    assert float(pull.detach()) == pytest.approx(0.5 * 0.01 / 0.01**2 * sq, rel=1e-5)
    for kw, factor in ((dict(gamma=0.02, tau=0.01), 2.0), (dict(gamma=0.01, tau=0.005), 4.0),
                       (dict(gamma=0.01, tau=0.01, data_scale=10.0), 0.1)):
        other = FisherTuneConfig(target_modules=["a", "b"], **kw)
        assert float(prior_pull_loss(model, other).detach()) == pytest.approx(factor * float(pull.detach()), rel=1e-5)
    off = FisherTuneConfig(target_modules=["a", "b"], prior_pull=False)
    assert float(prior_pull_loss(model, off)) == 0.0
    # the training set's size N (what the trainer passes): the loss is a mean over N samples, so γ/N
    assert float(prior_pull_loss(model, num_samples=1000).detach()) == pytest.approx(float(pull.detach()) / 1000,
                                                                                     rel=1e-5)
    scaled = FisherTuneConfig(target_modules=["a", "b"], data_scale=10.0)  # an explicit data_scale wins over N
    assert float(prior_pull_loss(model, scaled, num_samples=1000).detach()) == pytest.approx(
        0.1 * float(pull.detach()), rel=1e-5)
    # its gradient is κ·δ on the tuned values: the pull toward the pretrained weight
    pull.backward()
    from peft_fishertune.tuner.layer import FisherTuneLayer

    layer = next(m for m in model.modules() if isinstance(m, FisherTuneLayer))
    vals = layer.ft_values["default"]
    active = layer.active_values("default")
    assert vals.grad is not None and float(vals.grad.abs().sum()) > 0
    torch.testing.assert_close(vals.grad.abs().sum(), (100.0 * active.detach()).abs().sum(), rtol=1e-5, atol=1e-7)


def test_prior_pull_changes_the_training_loss_and_shrinks_deltas():
    """One SGD step on loss + pull vs loss alone: γ, τ change the step as the pull κδ predicts."""
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    ends = {}
    for name, kw in (("off", dict(prior_pull=False)), ("paper", dict(gamma=0.01, tau=0.01)),
                     ("weak", dict(gamma=0.01, tau=1.0))):
        model, cfg = _peft_model(**kw)
        before = torch.cat([d.detach().clone() for d in _active_deltas(model)])
        loss = model(x=x, labels=y)["loss"] + prior_pull_loss(model)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 1e-3 * p.grad
        ends[name] = (before, torch.cat([d.detach() for d in _active_deltas(model)]))
    norm = {k: float(after.norm() / before.norm()) for k, (before, after) in ends.items()}
    assert norm["paper"] < norm["weak"] - 0.05  # κ = 100: 1e-3·100 = 10 % shrink per step
    assert abs(norm["weak"] - norm["off"]) < 1e-3  # κ = 1e-2: negligible
