"""PEFT mends applied on `import peft_fishertune` (src/peft_fishertune/_peft_patches.py), checked in a fresh process
that never imports the training package: Super-Tuning / SHiRA `merge_and_unload()` of our segmentation models with
the decoder in modules_to_save (peft 0.21.2 raised AttributeError: 'LinearHead' object has no attribute 'weight')."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_CHILD = r"""
import json, sys
import torch
torch.set_num_threads(1)
import peft_fishertune  # noqa: F401  (the import applies the mends)
from peft import ShiraConfig, SupertuningConfig, get_peft_model
from peft_fishertune.models import build_segmentation_model, tiny_backbone_config

kind = sys.argv[1]
torch.manual_seed(0)
cfg = tiny_backbone_config("dinov2", hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                           intermediate_size=32, patch_size=8, image_size=32)
seg = build_segmentation_model("dinov2", backbone_config=cfg, decoder="linear", pyramid_channels=8).eval()
targets = ["q_proj", "v_proj", "fc1"]
if kind == "supertuning":
    config = SupertuningConfig(target_modules=targets, sparsity=0.8, modules_to_save=seg.decoder_module_names())
else:
    config = ShiraConfig(r=1, target_modules=targets, modules_to_save=seg.decoder_module_names())
model = get_peft_model(seg, config)
with torch.no_grad():  # "trained": every trainable tensor (sparse deltas, the decoder's copy) moved
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.3 * torch.randn_like(p))
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    before = model(pixel_values=x).logits
    merged = model.merge_and_unload()
    after = merged(pixel_values=x).logits
print(json.dumps({"type": type(merged).__name__, "diff": (before - after).abs().max().item(),
                  "scale": before.abs().max().item(),
                  "training_imported": any(m.startswith("peft_fishertune.training") for m in sys.modules),
                  "head_has_copy": any("modules_to_save" in n for n, _ in merged.named_modules())}))
"""


@pytest.mark.parametrize("kind", ["supertuning", "shira"])
def test_merge_and_unload_with_our_decoder_in_modules_to_save(kind):
    proc = subprocess.run([sys.executable, "-c", _CHILD, kind], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["type"] == "SegmentationModel" and not out["head_has_copy"]
    assert not out["training_imported"]  # the mend does not need (nor import) the training package
    assert out["scale"] > 0 and out["diff"] <= 1e-5 * max(1.0, out["scale"]), out  # merged = the adapted model


def test_the_mend_is_applied_once_and_reexported_by_baselines():
    from peft.tuners.tuners_utils import BaseTuner

    import peft_fishertune  # noqa: F401
    from peft_fishertune import _peft_patches
    from peft_fishertune.training import baselines

    patched = BaseTuner._replace_module
    assert getattr(patched, "_fishertune_patched", False)
    _peft_patches.apply()
    baselines.patch_peft_unload()
    assert BaseTuner._replace_module is patched  # idempotent: not wrapped twice
