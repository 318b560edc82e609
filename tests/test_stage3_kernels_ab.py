"""benchmarks/stage3_kernels_ab.py at a tiny size: the three settings run interleaved in one process, and the
library's defaults are restored afterwards."""

import json

from script_modules import load_script, run_main

from peft_fishertune.tuner import sparse_delta


def test_three_settings_interleaved_and_defaults_restored(tmp_path, capsys):
    mod = load_script("benchmarks/stage3_kernels_ab.py")
    before = (sparse_delta.TRANSPOSE_COMPILE_MIN_ELEMENTS, dict(sparse_delta.SDDMM_MAX_DENSITY))
    out = tmp_path / "ab.jsonl"
    assert run_main(mod, ["--hidden", "32", "--layers", "2", "--heads", "2", "--image-size", "28", "--steps", "2",
                          "--fractions", "0.05,0.2", "--threads", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["fraction"] for r in data["rows"]] == [0.05, 0.2]
    for row in data["rows"]:
        assert set(row["step_s_all"]) == {"compiled", "eager", "eager_thr10"}
        assert all(len(v) == 2 and min(v) > 0 for v in row["step_s_all"].values())
    assert (sparse_delta.TRANSPOSE_COMPILE_MIN_ELEMENTS, sparse_delta.SDDMM_MAX_DENSITY) == before
