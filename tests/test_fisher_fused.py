"""The fused CPU kernels of the variational estimator (issue 23): the same estimate as the eager code.

The kernels are the eager formulas compiled by inductor into one loop each; they may round differently in the last
float32 bit, so estimates agree to float32 rounding (and, with bfloat16 accumulators, to a bfloat16 step in a few
elements), not bit for bit. One compile per kernel and process (tens of seconds on 2 cores the first time; inductor's
on-disk cache makes later runs faster).
"""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_fishertune.fisher import FisherInputError, VariationalFisherEstimator
from peft_fishertune.fisher import fused as fused_mod
from peft_fishertune.fisher.fused import FUSED_MIN_ELEMENTS, FusedKernels

if not hasattr(torch, "compile"):
    pytest.skip("torch.compile is unavailable", allow_module_level=True)


class MLPNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, pixel_values, labels):
        h = self.fc2(F.gelu(self.fc1(pixel_values)))
        return {"loss": F.cross_entropy(self.head(h).flatten(0, 1), labels.flatten())}


def _tokens(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 5, 6, generator=g) * (1 + torch.rand(b, 1, 6, generator=g)) + torch.randn(b, 1, 6, generator=g)
    return {"pixel_values": x, "labels": torch.randint(0, 3, (b, 5), generator=g)}


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
    assert not fused_mod._FAILED, fused_mod._FAILED  # the kernels compiled (else the eager code ran)
    assert "failed" not in caplog.text
    prec_e, df_e, res_e = _run(False, dtype)
    tol = dict(rtol=1e-5, atol=0) if dtype == "float32" else dict(rtol=1.6e-2, atol=0)  # one bf16 step
    for a, b in zip(prec_f, prec_e):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(df_f, df_e):
        torch.testing.assert_close(a, b, **tol)
    for n in res_e.scores:
        torch.testing.assert_close(res_f.scores[n], res_e.scores[n], **tol)


def test_fused_kernels_without_the_dr_term():
    prec_f, df_f, _ = _run(True, "float32", lambda_dr=0.0)
    prec_e, df_e, _ = _run(False, "float32", lambda_dr=0.0)
    assert df_f is None and df_e is None
    for a, b in zip(prec_f, prec_e):
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
