"""benchmarks/stage3_kernels_ab.py at a tiny size, with the compile threshold lowered so that the compiled settings
do take the compiled transposes (and `compiled` the step buffers): the five settings run interleaved in one process,
the ones with the library's arithmetic give the same gradients bit for bit, and the defaults are restored."""

import json

import pytest
from script_modules import load_script, run_main

from peft_fishertune.tuner import sparse_delta


def test_five_settings_interleaved_same_gradients_and_defaults_restored(tmp_path, monkeypatch):
    monkeypatch.setattr(sparse_delta, "TRANSPOSE_COMPILE_MIN_ELEMENTS", 1)  # tiny activations take the kernels too
    mod = load_script("benchmarks/stage3_kernels_ab.py")
    before = (sparse_delta.TRANSPOSE_COMPILE_MIN_ELEMENTS, dict(sparse_delta.SDDMM_MAX_DENSITY),
              sparse_delta.TRANSPOSE_BUFFERS_IN_STEP)
    out, md = tmp_path / "ab.jsonl", tmp_path / "ab.md"
    assert run_main(mod, ["--hidden", "32", "--layers", "2", "--heads", "2", "--image-size", "28", "--steps", "2",
                          "--fractions", "0.05,0.2", "--threads", "1", "--out", str(out), "--md", str(md)]) == 0
    data = json.loads(out.read_text())
    assert [r["fraction"] for r in data["rows"]] == [0.05, 0.2]
    for row in data["rows"]:
        assert set(row["step_s_all"]) == {"compiled", "new_tensors", "eager", "eager_thr10", "read_each_step"}
        assert all(len(v) == 2 and min(v) > 0 for v in row["step_s_all"].values())
        # read_each_step: the base values read from the weight at every step instead of kept from the step before
        assert row["mismatched_gradients"] == {"new_tensors": 0, "eager": 0, "read_each_step": 0}
    assert sparse_delta._TRANSPOSE_INTO.failed is None, sparse_delta._TRANSPOSE_INTO.failed
    assert (sparse_delta.TRANSPOSE_COMPILE_MIN_ELEMENTS, sparse_delta.SDDMM_MAX_DENSITY,
            sparse_delta.TRANSPOSE_BUFFERS_IN_STEP) == before
    assert sparse_delta.KEEP_BASE_VALUES is True
    assert "paired vs new tensors" in md.read_text() and "paired vs base read each step" in md.read_text()


def test_gathered_pull_setting_same_gradients_and_its_options(tmp_path, capsys):
    """`--candidates` trains part of the candidates (a growing stage 3), `--prior-pull` adds Eq. 7's pull, and the
    `gathered_pull` setting (the pull over the gathered active values) gives `compiled`'s gradients bit for bit;
    the pull over every value is what `compiled` takes, and the layers' flags are restored after."""
    mod = load_script("benchmarks/stage3_kernels_ab.py")
    out = tmp_path / "ab.jsonl"
    assert run_main(mod, ["--hidden", "32", "--layers", "2", "--heads", "2", "--image-size", "28", "--steps", "2",
                          "--fractions", "0.05", "--candidates", "0.3", "--prior-pull", "--settings",
                          "compiled,gathered_pull", "--threads", "1", "--out", str(out), "--md", str(tmp_path / "m.md"),
                          "--profile", "--profile-steps", "1"]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["candidates"] == 0.3 and row["mismatched_gradients"] == {"gathered_pull": 0}
    # the profiles: the gathered pull's backward scatters into a zero tensor (index_add_), the whole-tensor pull not
    prof = row["profile"]
    assert prof["gathered_pull"].get("aten::index_add_", [0, 0])[1] > prof["compiled"].get("aten::index_add_", [0, 0])[1]
    assert "the largest differences from `compiled`" in (tmp_path / "m.md").read_text()
    assert set(row["step_s_all"]) == {"compiled", "gathered_pull"}
    for bad, match in ((["--settings", "compiled,gathered_pull"], "add --prior-pull"),
                       (["--candidates", "0.01", "--fractions", "0.05"], "at or below it")):
        with pytest.raises(SystemExit) as exc:
            run_main(mod, bad + ["--steps", "1"])
        assert exc.value.code == 2 and match in capsys.readouterr().err
