"""The examples run end to end as a user runs them (subprocesses, tiny sizes): all three stages with
FisherTuneTrainer, save_pretrained, reload with PeftModel.from_pretrained, same logits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, extra", [
    ("image_classification.py", ["--steps", "2", "2", "3", "--num_images", "8", "--batch_size", "4"]),
    ("causal_lm.py", ["--steps", "0", "2", "3", "--num_sequences", "8", "--batch_size", "4", "--block_size", "32"]),
], ids=["vit", "llama"])
def test_example_runs_end_to_end(script, extra, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--output_dir", str(tmp_path), *extra],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage 3: selected" in proc.stdout  # the selection happened between stage 2 and 3
    assert "max |logit difference| 0.00e+00" in proc.stdout, proc.stdout[-2000:]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
