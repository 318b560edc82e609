"""benchmarks/selection_update.py at a tiny size: both scans time real updates, agree on every layer's active
positions, and the library's scan is restored afterwards."""

import json

from script_modules import load_script, run_main

from peft_fishertune.tuner import layer


def test_both_scans_timed_and_equal_and_library_restored(tmp_path):
    mod = load_script("benchmarks/selection_update.py")
    before = layer._below
    out, md = tmp_path / "su.jsonl", tmp_path / "su.md"
    assert run_main(mod, ["--hidden", "32", "--layers", "2", "--heads", "2", "--image-size", "28", "--updates", "4",
                          "--threads", "1", "--out", str(out), "--md", str(md)]) == 0
    data = json.loads(out.read_text())
    assert data["mismatched_layers"] == 0 and data["layers"] == 12 and data["candidates"] > 0
    assert all(len(v) == 4 and min(v) > 0 for v in data["update_ms_all"].values())
    assert "numpy" in md.read_text()
    assert layer._below is before
