"""benchmarks/per_sample_passes.py: the batched per-sample statistic equals the single-image loop's, and the
batch-mean loss does not give it."""

import json

import pytest
import torch
from script_modules import load_script, run_main


def _load():
    return load_script("benchmarks/per_sample_passes.py")


def test_batched_per_sample_statistic_matches_the_loop_and_the_batch_mean_loss_does_not(capsys):
    mod = _load()
    threads = str(torch.get_num_threads())
    assert run_main(mod, ["--quick", "--reps", "1", "--batches", "2,3", "--threads", threads]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    assert set(out["results"]) == {"2", "3"}
    for row in out["results"].values():
        assert set(row["step_s"]) == {"loop", "batched_per_sample", "batch_mode"}
        assert all(s > 0 for s in row["step_s"].values())
        assert row["rel_err"] < 1e-5
        # each image's gradient scaled by n_i / N: the statistic is off by far more than rounding
        assert row["rel_err_batch_mean_loss"] > 0.5


def test_batched_hooks_cover_every_targeted_linear():
    """A Linear whose output gradient never arrives would leave its statistic at zero: refused."""
    mod = _load()
    args = type("A", (), dict(hidden=32, layers=2, heads=2, patch=8, crop=32, classes=5))()
    model = mod.build(args)
    stat = mod.Stat(model[2])
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    mod.batched_per_sample(model, stat, x, y, 8)
    assert all(float(a.abs().sum()) > 0 for a in stat.acc)
    extra = torch.nn.Linear(4, 4)  # a targeted Linear the forward never calls
    with pytest.raises(RuntimeError, match="no output gradient"):
        stat2 = mod.Stat(model[2] + [extra])
        mod.batched_per_sample(model, stat2, x, y, 8)


def test_refuses_a_batch_of_one():
    with pytest.raises(SystemExit, match="sizes >= 2"):
        _load().main(["--quick", "--batches", "1"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_refuses_cuda_where_torch_sees_none():
    with pytest.raises(SystemExit, match="no CUDA device"):
        _load().main(["--quick", "--device", "cuda"])
