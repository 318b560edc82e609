"""2 gloo processes on halves of the data == 1 process on all of it (real `accelerate launch`)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "dist_fisher.py"
ACCELERATE = Path(sys.executable).parent / "accelerate"


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MASTER_ADDR="127.0.0.1")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_two_processes_equal_one(tmp_path):
    if not ACCELERATE.exists():
        pytest.skip(f"no accelerate launcher at {ACCELERATE}")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, str(SCRIPT), str(one)], check=True, env=_env(), timeout=200)
    proc = subprocess.run(
        [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", _free_port(),
         str(SCRIPT), str(two)],
        env=_env(), timeout=200, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = torch.load(one), torch.load(two)
    assert a["empirical/batch"]["world"] == 1 and b["empirical/batch"]["world"] == 2  # really 2 ranks
    assert set(a) == set(b)
    for key in a:
        assert a[key]["num_samples"] == b[key]["num_samples"] == 24, key
        assert a[key]["w"] == pytest.approx(b[key]["w"], rel=1e-12), key
        for part in ("scores", "fisher_x", "delta_f"):
            for name in a[key][part]:
                torch.testing.assert_close(b[key][part][name], a[key][part][name], rtol=1e-4, atol=1e-7,
                                           msg=f"{key} {part} {name}")
