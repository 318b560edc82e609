"""`train.log` in the output folder (issue 24 point 6) and the warning for a launch that asked for N processes and
got one (issue 22: `accelerate launch --cpu --num_processes 2` starts a single process)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fixtures_data as fx
import pytest
import yaml
from script_modules import load_script

from peft_fishertune.training.run_log import RunLog

ROOT = Path(__file__).resolve().parents[1]


def _train_script():
    return load_script("scripts/train.py", "train_script")


def test_run_log_copies_prints_warnings_and_logging(tmp_path, capsys):
    path = tmp_path / "train.log"
    lib = logging.getLogger("h1b_test_library")
    handler = logging.StreamHandler(sys.stderr)  # made before the log: holds the stream object itself
    lib.addHandler(handler)
    lib.propagate = False
    try:
        with RunLog(str(path), header="run 1"):
            print("stage 1  steps [0, 4)")
            sys.stderr.write(" 50%|#####     | 1/2\r100%|##########| 2/2\n")  # a progress bar: its last state
            lib.warning("a logging record")
        print("after the log")
        with pytest.raises(RuntimeError), RunLog(str(path), header="run 2"):
            raise RuntimeError("the run failed")
    finally:
        lib.removeHandler(handler)
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0].endswith("run 1") and lines[0].startswith("==== ")
    assert "stage 1  steps [0, 4)" in lines and "100%|##########| 2/2" in lines
    assert "a logging record" in lines  # (a Python warning: the subprocess run below; pytest captures them here)
    assert "after the log" not in text  # the streams are restored
    assert any(line.endswith("run 2") for line in lines) and "RuntimeError: the run failed" in text  # appended
    out, err = capsys.readouterr()
    assert "stage 1  steps [0, 4)" in out and "after the log" in out  # the terminal output is unchanged
    assert "a logging record" in err
    assert handler.stream is sys.stderr


@pytest.mark.parametrize("env,launcher,world,expected", [
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"},
     ["python", "accelerate", "launch", "--cpu", "--num_processes", "2", "scripts/train.py", "--config", "c.yaml"], 1,
     "asked for 2 processes but this run has world size 1"),
    ({"ACCELERATE_USE_CPU": "True"}, ["accelerate", "launch", "--num_processes=4", "train.py"], 2, "asked for 4"),
    ({"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "127.0.0.1"}, ["accelerate", "launch", "train.py"], 1,
     "asked for more than 1 processes"),  # num_processes from accelerate's config file
    ({"ACCELERATE_MIXED_PRECISION": "no", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"},  # as --multi_gpu sets
     ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "train.py"], 2, None),
    ({"ACCELERATE_USE_CPU": "True"}, ["accelerate", "launch", "--num_processes", "1", "--cpu", "train.py",
                                      "--num_processes", "8"], 1, None),  # the script's own arguments
    ({}, ["bash"], 1, None),  # not launched by accelerate
])
def test_launch_warning(env, launcher, world, expected):
    got = _train_script().launch_warning(env, launcher, world)
    if expected is None:
        assert got is None
    else:
        assert expected in got and "accelerate launch --multi_gpu --num_processes N scripts/train.py" in got


def test_train_log_of_a_run_launched_for_two_processes_on_cpu(tmp_path):
    """A real `accelerate launch --cpu --num_processes 2` (one process starts): the run says so loudly, and
    train.log holds the stage plan, the selection line, the warnings and the final table."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed beside this python")
    cs = tmp_path / "cityscapes"
    labels = fx.make_cityscapes(cs, split="train")
    fx.make_cityscapes(cs, split="val")
    labels[1].unlink()  # an image without its label: skipped with a UserWarning when the data is built
    out = tmp_path / "run"
    config = {
        "model": {"backbone": "dinov2", "decoder": "linear", "pyramid_channels": 8,
                  "tiny_backbone": {"hidden_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2,
                                    "intermediate_size": 32, "patch_size": 8, "image_size": 32}},
        "data": {"train": {"name": "cityscapes", "root": str(cs), "split": "train", "on_fault": "skip"},
                 "eval": [{"name": "cityscapes", "root": str(cs), "split": "val", "label": "source"}],
                 "crop_size": [16, 16], "base_scale": [80, 16], "test_scale": [80, 16], "window": [16, 16],
                 "stride": [16, 16]},
        "method": {"name": "fishertune", "fishertune": {"fisher_mode": "batch"}},
        "training": {"output_dir": str(out), "stage1_steps": 1, "stage2_steps": 1, "stage3_steps": 1,
                     "per_device_train_batch_size": 2, "use_cpu": True, "report_to": [], "logging_steps": 1,
                     "dataloader_num_workers": 0},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([accelerate, "launch", "--cpu", "--num_processes", "2", str(ROOT / "scripts" / "train.py"),
                           "--config", str(path)], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING: accelerate launch was asked for 2 processes but this run has world size 1" in done.stderr
    assert "The fix: `accelerate launch --multi_gpu --num_processes N scripts/train.py ... --training.use_cpu true`" \
        in done.stderr
    log = (out / "train.log").read_text()
    for needle in ("WARNING: accelerate launch was asked for 2 processes",  # the launch warning
                   "1 of 4 images have no label file",  # a UserWarning from building the data
                   "stage 1  steps [0, 1): decoder warm-up",  # the stage plan
                   "stage 3: selected",  # the selection line
                   "final evaluation, mIoU / aAcc / mAcc (%)", "| source |",  # the final table
                   "| class (IoU %) |"):  # and its per-class table
        assert needle in log, needle
