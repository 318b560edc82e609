"""benchmarks/transpose_buffers_ab.py at a tiny size, with the compile threshold lowered so that its transposes do
go through the step buffers: both settings run, their gradients are equal bit for bit, and the report says so."""

import json

from script_modules import load_script, run_main

from peft_fishertune.tuner import sparse_delta


def test_both_transpose_settings_timed_with_equal_gradients(tmp_path, monkeypatch):
    monkeypatch.setattr(sparse_delta, "TRANSPOSE_COMPILE_MIN_ELEMENTS", 1)  # tiny activations take the kernels too
    mod = load_script("benchmarks/transpose_buffers_ab.py")
    out, md = tmp_path / "tb.jsonl", tmp_path / "tb.md"
    assert run_main(mod, ["--hidden", "32", "--layers", "1", "--heads", "2", "--image-size", "28", "--batch", "1",
                          "--fractions", "0.1", "--rounds", "2", "--threads", "1", "--out", str(out),
                          "--md", str(md)]) == 0
    data = json.loads(out.read_text())
    assert data["mismatched_gradients"] == 0 and len(data["rows"]) == 1
    row = data["rows"][0]
    assert row["fraction"] == 0.1 and len(row["paired_ms_all"]) == 2
    assert min(row["step_s_median"].values()) > 0
    assert "failed_into" not in sparse_delta._TRANSPOSE, sparse_delta._TRANSPOSE.get("failed_into")
    assert sparse_delta.TRANSPOSE_BUFFERS_IN_STEP is True  # restored by the benchmark
    assert "step buffers" in md.read_text()
