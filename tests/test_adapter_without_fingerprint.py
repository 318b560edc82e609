"""Adapters saved before fingerprints existed (no `base_fingerprint` in adapter_config.json), loaded onto a model
with another decoder: PEFT raised a bare `KeyError: 'base_model.model.decode_head.bn.weight'` before any tuner hook
ran; now an AdapterFileError names the module, the missing and unexpected weights and the likely cause (issue 22)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_fishertune as pf
from peft_fishertune.models import build_segmentation_model, tiny_backbone_config, tiny_mask2former_config

TINY = dict(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, patch_size=8,
            image_size=32)


def _seg(decoder, num_labels=3):
    torch.manual_seed(0)
    config = tiny_mask2former_config(num_labels=num_labels) if decoder == "mask2former" else None
    return build_segmentation_model("dinov2", backbone_config=tiny_backbone_config("dinov2", **TINY),
                                    num_labels=num_labels, decoder=decoder, decoder_config=config,
                                    pyramid_channels=8).eval()


def _old_adapter(path, decoder, num_labels=3):
    cfg = pf.FisherTuneConfig(target_modules=["q_proj"], modules_to_save=["decode_head"], init_selection="random")
    get_peft_model(_seg(decoder, num_labels), cfg).save_pretrained(path)
    raw = json.loads((path / "adapter_config.json").read_text())
    del raw["base_fingerprint"], raw["on_base_mismatch"]  # as written before tuner/fingerprint.py
    (path / "adapter_config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("saved,other,missing,unexpected", [
    ("linear", "upernet", "decode_head.head.", "decode_head.bn."),
    ("linear", "mask2former", "decode_head.class_predictor.", "decode_head.bn."),
])
def test_old_adapter_on_another_decoder_names_the_weights_and_the_cause(tmp_path, saved, other, missing, unexpected):
    _old_adapter(tmp_path, saved)
    with pytest.raises(pf.AdapterFileError) as err:
        PeftModel.from_pretrained(_seg(other), tmp_path)
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / "adapter_model.safetensors"))
    assert "the FISHERTUNE adapter 'default' does not fit this model's modules_to_save weights (decode_head: missing" in msg
    assert f"'{missing}" in msg.split("unexpected")[0] and f"'{unexpected}" in msg.split("unexpected")[1]
    assert "another decoder" in msg and "no base_fingerprint" in msg and "model.decoder" in msg
    assert not isinstance(err.value, KeyError)
    # the same file on the decoder it was trained with loads, and so does load_adapter on a PeftModel
    model = PeftModel.from_pretrained(_seg(saved), tmp_path)
    model.load_adapter(tmp_path, adapter_name="again")
    pm = get_peft_model(_seg(other), pf.FisherTuneConfig(target_modules=["q_proj"], modules_to_save=["decode_head"]))
    with pytest.raises(pf.AdapterFileError, match=r"adapter 'second' does not fit[\s\S]*another decoder"):
        pm.load_adapter(tmp_path, adapter_name="second")


def test_old_adapter_with_other_class_count_names_the_tensors(tmp_path):
    """Same decoder kind, other num_labels: torch's size-mismatch error names the tensors (loud, not silent)."""
    _old_adapter(tmp_path, "linear", num_labels=3)
    with pytest.raises(RuntimeError, match=r"size mismatch for .*decode_head.*classifier.weight"):
        PeftModel.from_pretrained(_seg("linear", num_labels=5), tmp_path)
