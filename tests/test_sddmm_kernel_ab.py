"""benchmarks/sddmm_kernel_ab.py at a tiny size: the C kernel is built and run, every way's values match float64,
and the report carries all three ways per density."""

import json
import os
import shutil

import pytest
from script_modules import load_script, run_main

needs_cc = pytest.mark.skipif(not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")),
                              reason="no C compiler")


@needs_cc
def test_c_kernel_and_sampled_addmm_agree_and_are_timed(tmp_path):
    mod = load_script("benchmarks/sddmm_kernel_ab.py")
    out, md = tmp_path / "k.jsonl", tmp_path / "k.md"
    # tokens 37: not a multiple of the kernel's 16 lanes, so its scalar tail runs; densities give rows with fewer
    # than four and with more than four entries (the four-at-a-time block and its remainder)
    assert run_main(mod, ["--hidden", "24", "--tokens", "37", "--densities", "0.05,0.5", "--reps", "2",
                          "--threads", "1", "--out", str(out), "--md", str(md)]) == 0
    data = json.loads(out.read_text())
    assert data["values_ok"] and data["max_rel_error"] <= 1e-5
    assert [s["shape"] for s in data["shapes"]] == [[24, 24], [96, 24], [24, 96]]
    for s in data["shapes"]:
        assert all(len(v) == 2 and min(v) > 0 for v in s["ms_median"].values())
    assert "C / sampled_addmm" in md.read_text()


@needs_cc
def test_a_wrong_kernel_is_caught(tmp_path, monkeypatch):
    """The value check can fail: a kernel that drops the last token's product is reported as wrong (exit 1)."""
    mod = load_script("benchmarks/sddmm_kernel_ab.py")
    monkeypatch.setattr(mod, "C_SOURCE", mod.C_SOURCE.replace("for (int64_t k = 0; k < K; k++) s +=",
                                                              "for (int64_t k = 0; k < K - 1; k++) s +="))
    out = tmp_path / "k.jsonl"
    assert run_main(mod, ["--hidden", "8", "--tokens", "5", "--densities", "0.5", "--reps", "2", "--threads", "1",
                          "--out", str(out)]) == 1
    assert not json.loads(out.read_text())["values_ok"]
