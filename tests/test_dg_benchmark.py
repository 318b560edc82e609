"""The benchmark command runs end to end (quick mode) and writes its table, JSON and plot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dg_benchmark_quick(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dg_benchmark.py"), "--quick",
                           "--workdir", str(tmp_path / "work"), "--out", str(out), "--jobs", "1", "--threads", "2"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "dg_benchmark_quick.md").read_text()
    assert "| freeze (decoder only) |" in md and "| FisherTune (variational DR-FIM, exp) |" in md
    assert "sliding window 64" in md and "Wall time" in md
    data = json.loads((out / "dg_benchmark_quick.json").read_text())
    assert {r["method"] for r in data["records"]} == {"freeze", "fishertune"}
    for r in data["records"]:
        assert 0.0 <= r["table"]["fog"] <= 100.0
    fishertune = next(r for r in data["records"] if r["method"] == "fishertune")
    assert fishertune["selection"]["num_active"] > 0
    assert (out / "dg_benchmark_quick.png").stat().st_size > 1000
