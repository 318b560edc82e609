"""The fused CPU kernels of the variational estimator (issue 23): the same estimate as the eager code.

The kernels are the eager formulas compiled by inductor into one loop each; they may round differently in the last
float32 bit, so estimates agree to float32 rounding (and, with bfloat16 accumulators, to a bfloat16 step in a few
elements), not bit for bit. One compile per kernel and process (tens of seconds on 2 cores the first time; inductor's
on-disk cache makes later runs faster).
"""

import logging

import pytest
import torch
from test_fisher_streaming import MLPNet, _tokens, dinov2_seg  # the same tiny models and batches
from torch import nn

from peft_fishertune.fisher import FisherInputError, VariationalFisherEstimator
from peft_fishertune.fisher import fused as fused_mod
from peft_fishertune.fisher.fused import FUSED_MIN_ELEMENTS, FusedKernels

if not hasattr(torch, "compile"):
    pytest.skip("torch.compile is unavailable", allow_module_level=True)




def _run(fused, dtype, lambda_dr=0.5, steps=3):
    torch.manual_seed(0)
    model = MLPNet()
    params = {"fc1.weight": model.fc1.weight, "fc2.weight": model.fc2.weight}
    est = VariationalFisherEstimator(model, params=params, mode="batch", tau=0.05, data_scale=50.0, seed=1,
                                     accumulator_dtype=dtype, lambda_dr=lambda_dr, fused_kernels=fused)
    assert (est.kernels is not None) == fused
    for s in range(steps):
        est.step(_tokens(seed=s))
    prec = [t.float().clone() for t in est.buffers["x"]["prec"]]
    df = None if est.sums_df is None else [t.float().clone() for t in est.sums_df]
    return prec, df, est.result()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_kernels_give_the_eager_estimate(dtype, caplog):
    with caplog.at_level(logging.WARNING, logger="peft_fishertune.fisher"):
        prec_f, df_f, res_f = _run(True, dtype)
    assert fused_mod._KERNELS.failed is None, fused_mod._KERNELS.failed  # the kernels compiled (else the eager code ran)
    assert "failed" not in caplog.text
    prec_e, df_e, res_e = _run(False, dtype)
    for a, b in zip(prec_f, prec_e):
        assert a.abs().sum() > 0
        _agree(a, b)
    for a, b in zip(df_f, df_e):
        _agree(a, b)
    for n in res_e.scores:
        _agree(res_f.scores[n], res_e.scores[n])


def _agree(a, b):
    """Equal to float32 rounding, which may move a bfloat16-rounded value (the kept F(x), a bf16 accumulator) of a
    few elements by one step, and ΔF = |a − b| / min(a, b) amplifies that where a ≈ b: so nearly every element
    within 1e-3 and the whole within 1e-3 (L1)."""
    assert float((a - b).abs().sum() / b.abs().sum()) < 1e-3
    assert float(((a - b).abs() <= 1e-3 * b.abs() + 1e-12).float().mean()) > 0.99


def test_fused_kernels_without_the_dr_term():
    prec_f, df_f, _ = _run(True, "float32", lambda_dr=0.0)
    prec_e, df_e, _ = _run(False, "float32", lambda_dr=0.0)
    assert df_f is None and df_e is None
    for a, b in zip(prec_f, prec_e):  # no kept F(x) without the DR term: float32 rounding only
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


def test_auto_uses_them_only_for_large_cpu_models():
    small = {"w": nn.Parameter(torch.zeros(10, 10))}
    assert FusedKernels.for_params(small, None) is None
    assert FusedKernels.for_params(small, False) is None
    assert FusedKernels.for_params(small, True) is not None
    big = {"w": nn.Parameter(torch.empty(FUSED_MIN_ELEMENTS, device="meta"))}
    assert FusedKernels.for_params(big, None) is None  # not on the CPU
    model = MLPNet()
    with pytest.raises(FisherInputError, match="fused_kernels='yes'"):
        VariationalFisherEstimator(model, params={"fc1.weight": model.fc1.weight}, fused_kernels="yes")


def test_fused_samples_are_regenerated_exactly_in_checkpointed_blocks():
    """Block checkpointing makes each sample twice (forward, recomputed forward): the fused sample is pointwise and
    deterministic, so checkpointed and non-checkpointed fused estimates agree as in the eager code, and both agree
    with the eager estimate."""
    model, params, batches = dinov2_seg()
    kw = dict(params=params, mode="batch", tau=0.05, seed=1, data_scale=100.0)
    ests = {"fused_ckpt": VariationalFisherEstimator(model, checkpointing=True, fused_kernels=True, **kw),
            "fused": VariationalFisherEstimator(model, checkpointing=False, fused_kernels=True, **kw),
            "eager_ckpt": VariationalFisherEstimator(model, checkpointing=True, fused_kernels=False, **kw)}
    assert len(ests["fused_ckpt"].blocks) == 2
    for b in batches:
        for e in ests.values():
            e.step(b)
    res = {k: e.result() for k, e in ests.items()}
    assert fused_mod._KERNELS.failed is None, fused_mod._KERNELS.failed
    for n in params:
        # checkpointed or not, the same samples: as close as the eager code's two ways (test_fisher_streaming)
        torch.testing.assert_close(res["fused_ckpt"].fisher_x[n], res["fused"].fisher_x[n], rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(res["fused_ckpt"].delta_f[n], res["fused"].delta_f[n], rtol=1e-3, atol=1e-6)
        _agree(res["fused_ckpt"].fisher_x[n], res["eager_ckpt"].fisher_x[n])  # fused against eager
        _agree(res["fused_ckpt"].delta_f[n], res["eager_ckpt"].delta_f[n])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_kernel_equals_its_eager_formula(dtype):
    """Kernel by kernel, on inputs where σ varies per element (P of the order of τ⁻²): compiled = eager formula."""
    g = torch.Generator().manual_seed(0)
    kernels = FusedKernels("test")
    p, xi = torch.randn(64, 48, generator=g), torch.randn(64, 48, generator=g)
    prec = (torch.rand(64, 48, generator=g) * 3e4).to(dtype)
    one = torch.tensor(1.0)
    theta = kernels.run("sample", p, prec, xi, torch.tensor(1e4), -one)
    sigma = (prec.float() + 1e4).rsqrt()
    torch.testing.assert_close(theta, torch.addcmul(p, sigma, xi, value=-1.0), rtol=1e-6, atol=1e-7)
    assert float(sigma.std() / sigma.mean()) > 0.1  # σ really varies: a kernel ignoring P would fail above
    grad, gp = torch.randn(64, 48, generator=g) * 1e-2, torch.randn(64, 48, generator=g) * 1e-2
    kept, total = kernels.run("square_keep", grad)
    assert kept.dtype == torch.bfloat16 and torch.equal(kept, grad.square().to(torch.bfloat16))
    torch.testing.assert_close(total, grad.square().sum(), rtol=1e-5, atol=0)
    torch.testing.assert_close(kernels.run("sum_sq", gp), gp.square().sum(), rtol=1e-5, atol=0)
    acc = (torch.rand(64, 48, generator=g) * 5).to(dtype)
    p2, a2 = prec.clone(), acc.clone()
    kb, sc, eps, w = (torch.tensor(v) for v in (0.75, 25.0, 1e-7, 0.3))
    kernels.run("update_dr", gp, kept, p2, a2, kb, sc, eps, w)
    fx, sqp = kept.float(), gp.square()
    want_p = (prec.float() * 0.75 + 25.0 * fx).to(dtype)
    want_a = (acc.float() + 0.3 * (fx - sqp).abs() / (torch.minimum(fx, sqp) + 1e-7)).to(dtype)
    tol = dict(rtol=1e-5, atol=0) if dtype == torch.float32 else dict(rtol=8e-3, atol=0)  # a bf16 step at most
    torch.testing.assert_close(p2, want_p, **tol)
    torch.testing.assert_close(a2, want_a, **tol)
    p3 = prec.clone()
    kernels.run("update", grad, p3, kb, sc)
    torch.testing.assert_close(p3, (prec.float() * 0.75 + 25.0 * grad.square()).to(dtype), **tol)
    assert fused_mod._KERNELS.failed is None, fused_mod._KERNELS.failed
