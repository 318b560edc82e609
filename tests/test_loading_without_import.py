"""Loading a FisherTune adapter in a fresh process that only imports peft (issue 21, deliverable 7).

The package installs `peft_fishertune_autoload.pth` (setup.py), which registers FisherTune with PEFT when `peft` is
imported (src/_peft_fishertune_hook.py). These tests run a serving script in a subprocess: `PeftModel.from_pretrained`
and `AutoPeftModel.from_pretrained` with no `import peft_fishertune`, and the off switch.
"""

from __future__ import annotations

import glob
import json
import os
import site
import subprocess
import sys
import sysconfig
import zipfile

import pytest
import torch
import transformers as T
from peft import get_peft_model

import peft_fishertune as pf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTH = "peft_fishertune_autoload.pth"

SERVE = """
import sys, torch
from peft import AutoPeftModel, PeftModel
import transformers as T
d = sys.argv[1]
x, y = torch.load(d + "/x.pt"), torch.load(d + "/y.pt")
base = T.ViTForImageClassification.from_pretrained(d + "/base")
pm = PeftModel.from_pretrained(base, d + "/adapter").eval()
am = AutoPeftModel.from_pretrained(d + "/adapter").eval()
with torch.no_grad():
    print("RESULT", torch.allclose(pm(pixel_values=x).logits, y, atol=1e-6),
          torch.allclose(am(pixel_values=x).logits, y, atol=1e-6), type(am).__name__)
"""


def _site_dirs() -> list[str]:
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    return dirs + [sysconfig.get_paths()["purelib"]]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    vit = T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                  intermediate_size=64, image_size=32, patch_size=8, num_labels=3))
    vit.save_pretrained(d / "base")
    model = get_peft_model(vit, pf.FisherTuneConfig(init_selection="random", init_weights=False,
                                                    modules_to_save=["classifier"]))
    model.save_pretrained(d / "adapter")
    cfg_path = d / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(d / "base")  # AutoPeftModel builds the base from here
    cfg_path.write_text(json.dumps(cfg))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        torch.save(model(pixel_values=x).logits, d / "y.pt")
    torch.save(x, d / "x.pt")
    return d


def _serve(d, **env):
    return subprocess.run([sys.executable, "-c", SERVE, str(d)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env}, cwd=str(d))


def test_the_autoload_hook_is_installed():
    found = [p for p in _site_dirs() if os.path.exists(os.path.join(p, PTH))]
    assert found, (f"{PTH} is not in site-packages ({_site_dirs()}): reinstall the package "
                   "(pip install -e . from the repository) so loading works without `import peft_fishertune`")


def test_peft_only_serving_script_loads_the_adapter(saved):
    out = _serve(saved)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RESULT True True PeftModel" in out.stdout, out.stdout[-2000:]


def test_autoload_off_switch_gives_pefts_key_error(saved):
    out = _serve(saved, PEFT_FISHERTUNE_NO_AUTOLOAD="1")
    assert out.returncode != 0 and "KeyError: 'FISHERTUNE'" in out.stderr


def test_card_says_how_to_load(saved):
    card = (saved / "adapter" / "README.md").read_text()
    assert "pip install peft-fishertune" in card and "import peft_fishertune" in card


def test_a_built_wheel_ships_the_hook_at_the_site_packages_root(tmp_path):
    """A normal `pip install` (not -e) gets the .pth and the hook module at the root of purelib."""
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), ROOT], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = glob.glob(str(tmp_path / "*.whl"))
    with zipfile.ZipFile(wheel) as z:
        root = {n for n in z.namelist() if "/" not in n}
        line = z.read(PTH).decode()
    assert root == {PTH, "_peft_fishertune_hook.py"}
    assert line.startswith("import ") and "_peft_fishertune_hook" in line and ".install()" in line


def test_a_spec_lookup_before_the_import_still_registers():
    """transformers checks `importlib.util.find_spec("peft")` before importing it: the hook must wait for the real
    import (it used to fire on the lookup, so nothing was registered after `from transformers import Trainer`)."""
    code = ("import importlib.util, sys; importlib.util.find_spec('peft'); import peft.mapping as m; "
            "print('RESULT', 'FISHERTUNE' in m.PEFT_TYPE_TO_CONFIG_MAPPING, 'REIN' in m.PEFT_TYPE_TO_CONFIG_MAPPING)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RESULT True True" in out.stdout
