"""The estimators' per-step work buffers (issue 23: a cheaper stage 2) change no number.

Weight samples and the folds of the streamed step write into a few reused layer-sized buffers instead of fresh
tensors. Checked here: the buffers themselves, the helpers against the plain expressions they replace (bit for bit),
a weight sample against θ̂ + σ⊙ξ, and one streamed natural DR-FIM step against the update written out by hand from
the same gradients. Nothing weight-sized stays between steps.
"""

import math

import pytest
import torch
from test_fisher_streaming import MLPNet, _tokens  # the same tiny token model and batches

from peft_fishertune.fisher import EmpiricalFisherEstimator, VariationalFisherEstimator
from peft_fishertune.fisher.buffers import WorkBuffers, acc_add, as_fp32, square_into
from peft_fishertune.fisher.scores import delta_fisher_, relative_eps
from peft_fishertune.fisher.seeds import COMPILE_MIN_ELEMENTS, derived_normal
from peft_fishertune.fisher.weight_sampling import stream_sampled_grads


def _params(model):
    return {"fc1.weight": model.fc1.weight, "fc2.weight": model.fc2.weight}


def test_work_buffers_hand_out_views_and_free_them():
    w = WorkBuffers(capacity=12, slots=2)
    a = w.get(0, (3, 4), "cpu")
    b = w.get(0, (2, 5), "cpu")
    assert a.shape == (3, 4) and b.shape == (2, 5) and a.dtype == torch.float32
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # one buffer per slot, reused
    assert w.get(1, (12,), "cpu").untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
    assert w.nbytes() == 2 * 12 * 4
    with pytest.raises(ValueError, match="capacity is 12"):
        w.get(0, (13,), "cpu")
    with pytest.raises(IndexError, match="slot 2"):
        w.get(2, (1,), "cpu")
    w.clear()
    assert w.nbytes() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_helpers_equal_the_plain_expressions_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    acc = (torch.rand(7, 9, generator=g) * 1e-3).to(dtype)
    value = torch.rand(7, 9, generator=g) * 1e-4
    grad = torch.randn(7, 9, generator=g).to(dtype)
    work = torch.empty(7, 9)
    expected = acc.float().clone().add_(value, alpha=0.3).to(dtype)  # in float32, rounded once into acc's dtype
    got = acc.clone()
    acc_add(got, value, 0.3, work)
    assert torch.equal(got, expected)
    assert torch.equal(square_into(grad, torch.empty(7, 9)), grad.float().square())
    assert torch.equal(as_fp32(acc, torch.empty(7, 9)), acc.float())
    fx, fxp = torch.rand(7, 9, generator=g), torch.rand(7, 9, generator=g)
    plain = (fx - fxp).abs_().div_(torch.minimum(fx, fxp).add_(1e-3))
    assert torch.equal(delta_fisher_(fx.clone(), fxp, 1e-3, work=torch.empty(7, 9)), plain)


@pytest.mark.parametrize("n", [1000, COMPILE_MIN_ELEMENTS + 3])
def test_noise_written_into_a_buffer_is_the_same_noise(n):
    out = torch.empty(n)
    assert torch.equal(derived_normal((n,), 5, 6, out=out), derived_normal((n,), 5, 6))
    with pytest.raises(ValueError, match="contiguous float32"):
        derived_normal((n,), 5, 6, out=torch.empty(n, dtype=torch.float64))


@pytest.mark.parametrize("method", ["natural", "reparam"])
def test_a_weight_sample_is_theta_hat_plus_sigma_xi(method):
    torch.manual_seed(0)
    model = MLPNet()
    est = VariationalFisherEstimator(model, params=_params(model), mode="batch", method=method, tau=0.05,
                                     accumulator_dtype="bfloat16")
    for s in range(2):
        est.step(_tokens(seed=s))
    for i, (name, p) in enumerate(_params(model).items()):
        if method == "natural":
            sigma = (est.buffers["x"]["prec"][i].float() + est.tau**-2).rsqrt()
        else:
            sigma = est.buffers["x"]["u"][i].float().exp() * est.tau
        xi = derived_normal(p.shape, 0xE1, est.seed, est.steps, i)
        theta = est._maker("x", i, 1.0)()
        assert torch.equal(theta, torch.addcmul(p.detach(), sigma, xi))
        assert not torch.equal(theta, p.detach())
    assert est.work.nbytes() > 0  # the sample above ran outside a step
    est.step(_tokens(seed=3))
    assert est.work.nbytes() == 0  # a step frees its work buffers


def test_streamed_natural_step_equals_the_update_written_out():
    """Λ and the ΔF accumulator after a streamed DR step (bfloat16 accumulators) = the documented update computed
    with plain tensors from the same two passes' gradients, bit for bit."""
    torch.manual_seed(0)
    model = MLPNet()
    params = _params(model)
    est = VariationalFisherEstimator(model, params=params, mode="batch", tau=0.05, accumulator_dtype="bfloat16",
                                     seed=3)
    est.step(_tokens(seed=0))  # a nonzero precision, so the samples below use σ < τ
    batch = _tokens(seed=1)
    names = list(params)
    makers = [est._maker("x", i, 1.0) for i in range(len(names))]

    def squares(b):
        out, order = {}, []

        def on_grad(i, g):
            out[i] = g.float().square()
            order.append(i)

        stream_sampled_grads(model, b, est.paths, makers, None, on_grad)
        return out, order

    sq_x, order = squares(batch)
    total = 0.0
    for i in order:
        total += float(sq_x[i].sum())
    eps = relative_eps(total / est.numel, est.dr_eps)
    with est.perturbation.applied(model, batch, est._micro_index(0, 1)) as (batch_p, d):
        sq_xp, _ = squares(batch_p)
        w = d.weight
    beta = 1.0 / (est.steps + 1)
    scale = beta * est.data_scale / est.gamma
    prec0 = [t.clone() for t in est.buffers["x"]["prec"]]
    df0 = [t.clone() for t in est.sums_df]
    w_sum0 = est.w_sum
    est.step(batch)
    for i in range(len(names)):
        fx = sq_x[i].to(torch.bfloat16).float()
        prec = (prec0[i].float() * (1.0 - beta)).add_(fx, alpha=scale).to(torch.bfloat16)
        delta = (fx - sq_xp[i]).abs_().div_(torch.minimum(fx, sq_xp[i]).add_(eps))
        df = df0[i].float().add_(delta, alpha=w).to(torch.bfloat16)
        assert torch.equal(est.buffers["x"]["prec"][i], prec), names[i]
        assert torch.equal(est.sums_df[i], df), names[i]
    assert math.isclose(est.w_sum - w_sum0, w)


@pytest.mark.parametrize("kind", ["empirical", "variational"])
def test_work_buffers_stay_within_three_layers_and_are_freed(kind):
    torch.manual_seed(0)
    model = MLPNet()
    cls = EmpiricalFisherEstimator if kind == "empirical" else VariationalFisherEstimator
    est = cls(model, params=_params(model), mode="batch", accumulator_dtype="bfloat16")
    seen = []
    get = est.work.get

    def probe(slot, shape, device):
        out = get(slot, shape, device)
        seen.append(est.work.nbytes())
        return out

    est.work.get = probe
    est.step(_tokens())
    largest = max(p.numel() for p in _params(model).values())
    assert seen and max(seen) <= 3 * largest * 4
    assert est.work.nbytes() == 0
