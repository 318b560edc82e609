"""Adapters carry a fingerprint of their base (tuner/fingerprint.py): loading onto other weights warns (or refuses,
by option) naming the tensors; another decoder (kind, options such as Rein's replace_query_feat) is a clear error."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import peft_fishertune as pf
from peft_fishertune.models import build_segmentation_model, tiny_backbone_config, tiny_mask2former_config
from peft_fishertune.rein import get_rein_segmentation_model
from peft_fishertune.rein.segmentation import rein_decoder_config
from peft_fishertune.tuner import fingerprint
from peft_fishertune.tuner.layer import FisherTuneLayer


class MLP(nn.Module):
    def __init__(self, width=24):
        super().__init__()
        self.lin0 = nn.Linear(12, width)
        self.lin1 = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def _mlp(seed=0, **kw):
    torch.manual_seed(seed)
    return MLP(**kw)


def _saved_mlp(tmp_path):
    cfg = pf.FisherTuneConfig(target_modules=["lin0", "lin1"], init_selection="random", init_weights=False)
    model = get_peft_model(_mlp(0), cfg)
    model.save_pretrained(tmp_path)
    return model


def _load(base, path, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, path, **kw)
    return model, [str(w.message) for w in caught if "trained on another base" in str(w.message)]


def test_the_saved_config_holds_the_fingerprint(tmp_path):
    _saved_mlp(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    fp = saved["base_fingerprint"]
    assert saved["on_base_mismatch"] == "warn"
    assert set(fp["tensors"]) == {"lin0.weight", "lin1.weight"} and fp["decoder"] is None
    assert fp["tensors"]["lin1.weight"]["shape"] == [24, 24]
    assert len(fingerprint._decode_sample(fp["tensors"]["lin1.weight"])) == fingerprint.SAMPLES
    assert len(json.dumps(fp["tensors"]["lin1.weight"])) < 250  # cheap: ~170 characters per tensor


def test_same_base_loads_silently_also_in_another_dtype(tmp_path):
    model = _saved_mlp(tmp_path)
    loaded, msgs = _load(_mlp(0), tmp_path)
    assert not msgs
    x = torch.randn(4, 12)
    torch.testing.assert_close(loaded(x), model(x))
    for dtype in (torch.bfloat16, torch.float16):  # the same base in another dtype: within rounding, no warning
        _, msgs = _load(_mlp(0).to(dtype), tmp_path)
        assert not msgs, msgs


def test_other_base_weights_warn_naming_the_tensors_or_refuse_by_option(tmp_path, monkeypatch):
    _saved_mlp(tmp_path)
    _, msgs = _load(_mlp(1), tmp_path)
    assert len(msgs) == 1
    assert "2 of 2 fingerprinted weights differ" in msgs[0]
    assert "lin0.weight: " in msgs[0] and "lin1.weight: " in msgs[0] and "sampled values differ" in msgs[0]
    # refuse: by the environment variable ...
    monkeypatch.setenv(fingerprint.ENV, "error")
    base = _mlp(1)
    with pytest.raises(pf.AdapterFileError, match=r"trained on another base: 2 of 2 .*lin0\.weight: \d+ of 64"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, FisherTuneLayer) for m in base.modules())  # refused before anything was wrapped
    monkeypatch.setenv(fingerprint.ENV, "sometimes")
    with pytest.raises(ValueError, match=rf"\${fingerprint.ENV}='sometimes'; expected one of \['warn', 'error'\]"):
        PeftModel.from_pretrained(_mlp(1), tmp_path)
    monkeypatch.delenv(fingerprint.ENV)
    # ... or by the config's option (saved with the adapter)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["on_base_mismatch"] = "error"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(pf.AdapterFileError, match="trained on another base"):
        PeftModel.from_pretrained(_mlp(1), tmp_path)


def test_other_shapes_are_named(tmp_path):
    _saved_mlp(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(pf.AdapterFileError, match="ft_shape"):  # the storage check still refuses to load it
            PeftModel.from_pretrained(_mlp(0, width=16), tmp_path)
    msgs = [str(w.message) for w in caught if "another base" in str(w.message)]
    assert msgs and "lin1.weight: shape (24, 24) saved, (16, 16) here" in msgs[0]


def test_adapter_without_fingerprint_loads_unchecked(tmp_path):
    _saved_mlp(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    del cfg["base_fingerprint"], cfg["on_base_mismatch"]  # as saved before fingerprints existed
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    _, msgs = _load(_mlp(1), tmp_path)
    assert not msgs


# ------------------------------------------------------------------ segmentation decoders
def _seg(decoder, seed=0, **dc):
    torch.manual_seed(seed)
    config = tiny_mask2former_config(num_labels=3, **dc) if decoder == "mask2former" else None
    return build_segmentation_model("dinov2", backbone_config=tiny_backbone_config("dinov2"), num_labels=3,
                                    decoder=decoder, decoder_config=config, pyramid_channels=32).eval()


def test_decoder_kind_mismatch_is_a_clear_error(tmp_path):
    cfg = pf.FisherTuneConfig(target_modules=["q_proj"], modules_to_save=["decode_head"], init_selection="random")
    get_peft_model(_seg("linear"), cfg).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["base_fingerprint"]["decoder"]
    assert saved["kind"] == "linear" and saved["options"]["num_labels"] == 3
    base = _seg("mask2former")
    with pytest.raises(pf.AdapterFileError, match=r"trained with another decoder: decoder kind: the adapter was saved "
                                                  r"with decoder='linear', this model has decoder='mask2former'"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, FisherTuneLayer) for m in base.modules())
    PeftModel.from_pretrained(_seg("linear"), tmp_path)  # the right decoder loads


def test_rein_adapter_on_a_decoder_without_replace_query_feat_is_refused(tmp_path):
    tokens = 8
    seg = _seg("mask2former", **rein_decoder_config(tokens, True))
    pm = get_rein_segmentation_model(seg, {"token_length": tokens, "query_dims": 32})
    pm.save_pretrained(tmp_path)
    fp = json.loads((tmp_path / "adapter_config.json").read_text())["base_fingerprint"]
    assert fp["decoder"]["options"]["replace_query_feat"] is True and fp["tensors"]
    with pytest.raises(pf.AdapterFileError, match=r"decoder option replace_query_feat: saved True, this model False.*"
                                                  r"query_feat_proj"):
        PeftModel.from_pretrained(_seg("mask2former", **rein_decoder_config(tokens, False)), tmp_path)
    _, msgs = _load(_seg("mask2former", seed=5, **rein_decoder_config(tokens, True)), tmp_path)
    assert msgs and "this Rein adapter was trained on another base" in msgs[0]
    _, msgs = _load(_seg("mask2former", **rein_decoder_config(tokens, True)), tmp_path)
    assert not msgs


def test_a_config_reused_after_saving_is_not_checked_as_a_load(tmp_path):
    cfg = pf.FisherTuneConfig(target_modules=["lin0", "lin1"], init_selection="random")
    get_peft_model(_mlp(0), cfg).save_pretrained(tmp_path)
    assert cfg.base_fingerprint is not None  # stamped (PEFT saves this very object)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(_mlp(1), cfg)  # a new adapter on another base: nothing is loaded, nothing to warn about
    assert not [w for w in caught if "another base" in str(w.message)]
    assert "_fingerprint_stamped_here" not in json.loads((tmp_path / "adapter_config.json").read_text())


def test_on_base_mismatch_is_checked_when_the_config_is_built():
    with pytest.raises(ValueError, match=r"FisherTuneConfig.on_base_mismatch='eror' is not allowed; expected one of "
                                         r"\['warn', 'error'\]"):
        pf.FisherTuneConfig(target_modules=["lin0"], on_base_mismatch="eror")


def test_old_rein_adapter_without_fingerprint_on_a_decoder_without_replace_query_feat_is_refused(tmp_path):
    """No fingerprint (saved before them): the decoder weights the model lacks (query_feat_proj) are named."""
    tokens = 8
    pm = get_rein_segmentation_model(_seg("mask2former", **rein_decoder_config(tokens, True)),
                                     {"token_length": tokens, "query_dims": 32})
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    del cfg["base_fingerprint"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(pf.AdapterFileError, match=r"adapter_model.safetensors: Rein adapter 'default' holds weights "
                                                  r"\['decode_head.query_feat_proj.bias', 'decode_head.query_feat_proj"
                                                  r".weight'\] .*replace_query_feat"):
        PeftModel.from_pretrained(_seg("mask2former", **rein_decoder_config(tokens, False)), tmp_path)
    PeftModel.from_pretrained(_seg("mask2former", **rein_decoder_config(tokens, True)), tmp_path)  # right decoder
