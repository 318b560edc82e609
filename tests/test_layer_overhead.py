"""benchmarks/layer_overhead.py runs end to end on a small stack and measures the rows it names."""

import json

import pytest
import torch
from script_modules import load_script, run_main


def _load():
    return load_script("benchmarks/layer_overhead.py")


def test_layer_overhead_rows_and_states(capsys):
    mod = _load()
    threads = str(torch.get_num_threads())
    assert run_main(mod, ["--layers", "6", "--width", "40", "--reps", "4", "--threads", threads]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    assert set(out["step_s"]) == {"plain", "fishertune", "fishertune_per_call", "fishertune_partial"}
    assert all(s > 0 for s in out["step_s"].values())
    # the rows are in the states they name: 15 % of 6 x 1600 weights all active, and 5 % active of those
    assert out["num_active"]["fishertune"] == 6 * 240
    assert out["num_active"]["fishertune_partial"] == pytest.approx(6 * 80, abs=6)


def test_layer_overhead_refuses_an_active_fraction_above_the_candidates():
    mod = _load()
    with pytest.raises(SystemExit):
        mod.main(["--active", "0.2", "--delta", "0.15"])
