"""benchmarks/gpu_check.py (issue 15's one prepared GPU command), exercised on the CPU with --cpu-smoke."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]


def _load():
    return load_script("benchmarks/gpu_check.py")


def test_paper_targets_use_the_offloaded_row_and_lora():
    gc = _load()
    gb = 1e9
    row = lambda peak, s3: {"whole_run_cuda_peak_allocated_bytes": peak * gb, "step_s_median": {"stage3": s3}}  # noqa: E731
    res = {"lora": row(10.0, 1.0), "fishertune": row(13.0, 1.05), "fishertune_offload": row(11.0, 1.2)}
    t = gc.paper_targets(res, "cuda")
    assert t["fishertune_offload_peak_below_paper_12.5GB"] is True
    assert abs(t["fishertune_offload_peak_over_lora (<= 1.15)"] - 1.1) < 1e-9
    assert abs(t["fishertune_stage3_step_over_lora (<= 1.1)"] - 1.05) < 1e-9
    del res["fishertune_offload"]
    t = gc.paper_targets(res, "cuda")
    assert t["fishertune_peak_below_paper_12.5GB"] is False


def test_cuda_request_without_cuda_is_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "cpu-smoke" in proc.stderr


def test_cpu_smoke_training_step_part(tmp_path):
    """The EVA02 part's build / wrap / one-step code (on a tiny DINOv2 where timm is missing) writes its report."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(out), "--cpu-smoke",
                           "--parts", "eva02", "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["cpu_smoke"] is True and report["tests"] == {"skipped": "not in --parts"}
    eva = report["eva02"]
    assert eva["ok"] is True and eva["ft_values_with_grad"] == eva["ft_values"] > 0
    assert 0 < eva["num_active"] < eva["num_targeted"]
    md = (out / "gpu_check.md").read_text()
    assert "CPU smoke run" in md and "## (c) EVA02 through timm" in md


def test_paper_targets_include_the_checkpointed_row():
    """The cost part's targets: the plain and the activation-checkpointed FisherTune peaks against the paper's 12.5 GB,
    the checkpointed row's stage-3 step against the plain one's, the whole-run time against full fine-tuning's."""
    gc = _load()

    def row(gb, s3, total):
        return {"whole_run_cuda_peak_allocated_bytes": gb * 1e9, "step_s_median": {"stage3": s3},
                "whole_run_time": {"total_s": total}}

    results = {"lora": row(14.0, 0.30, 90.0), "full": row(17.0, 0.32, 100.0), "fishertune": row(14.8, 0.60, 190.0),
               "fishertune_gc": row(10.5, 0.78, 230.0)}
    out = gc.paper_targets(results, "cuda")
    assert out["fishertune_peak_below_paper_12.5GB"] is False and out["fishertune_gc_peak_below_paper_12.5GB"] is True
    assert out["fishertune_gc_stage3_step_over_fishertune"] == pytest.approx(1.3)
    assert out["fishertune_whole_run_time_over_full (<= 0.92)"] == pytest.approx(1.9)
