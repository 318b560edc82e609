"""benchmarks/noise_words_ab.py at a tiny size: both kernels run, their samples and fills are equal bit for bit, and
the report says so."""

import json

from script_modules import load_script, run_main


def test_both_noise_kernels_timed_and_equal(tmp_path):
    mod = load_script("benchmarks/noise_words_ab.py")
    out, md = tmp_path / "nw.jsonl", tmp_path / "nw.md"
    assert run_main(mod, ["--hidden", "16", "--blocks", "1", "--rounds", "2", "--threads", "1", "--out", str(out),
                          "--md", str(md)]) == 0
    data = json.loads(out.read_text())
    assert data["mismatched_weights"] == 0 and data["fill_mismatch"] is False and data["weights"] == 6
    assert all(len(v) == 2 and min(v) > 0 for v in data["sample_pass_ms_all"].values())
    assert "int32 words" in md.read_text()
