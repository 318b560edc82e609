"""The saved index encodings are checked on load: one changed byte that still decodes to a valid selection (same
count, in range, unique) is refused naming the tensor, for every encoding; and old files without checksums load."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import peft_fishertune as pf
from peft_fishertune.tuner import storage


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(12, 24)
        self.lin1 = nn.Linear(24, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def _base():
    torch.manual_seed(0)  # the base the adapters are saved on (another one would also warn: tuner/fingerprint.py)
    return MLP()


def _saved(tmp_path, encoding, delta_max=0.05, grow=True):
    torch.manual_seed(0)
    cfg = pf.FisherTuneConfig(target_modules=["lin0", "lin1"], delta_min=0.03, delta_max=delta_max, encoding=encoding,
                              init_selection="random", init_weights=False)
    model = get_peft_model(MLP(), cfg)
    if grow:
        pf.set_active_fraction(model, delta_max)  # fully grown: the file holds the active elements only
    model.save_pretrained(tmp_path)
    return model


def _edit(tmp_path, suffix, fn):
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(path)
    key = next(k for k in sd if k.endswith(suffix))
    before = sd[key].clone()
    sd[key] = fn(sd[key].clone())
    assert sd[key].dtype == before.dtype and not torch.equal(sd[key], before)
    save_file(sd, path)


def _flip_gap_byte(t):
    """One byte of the gap codes changed, still a valid code (not 0 = escape), so the same count of indices
    decodes, all in range: every later element moves."""
    i = next(i for i in range(t.numel() // 2, t.numel() - 1) if 2 <= int(t[i]) <= 254)
    t[i] = t[i] + 1 if int(t[i + 1]) > 1 else t[i] - 1
    return t


def _move_mask_bit(t):
    """One byte of the bitmask changed so that one element moves by one position (the count stays)."""
    bits = storage.unpack_mask(t, t.numel() * 8)
    on = torch.nonzero(bits).view(-1)
    i = next(int(j) for j in on if j + 1 < bits.numel() and not bits[j + 1] and (j // 8) == ((j + 1) // 8))
    t[i // 8] = int(t[i // 8]) ^ (1 << (i % 8)) ^ (1 << ((i + 1) % 8))
    return t


def _move_index_byte(t):
    """The low byte of one index changed to a free position between its neighbours (sorted, unique, in range)."""
    for i in range(1, t.numel() - 1):
        if int(t[i]) + 1 < int(t[i + 1]):
            t[i] = t[i] + 1
            return t
    raise AssertionError("no free position")


@pytest.mark.parametrize("encoding,suffix,fn", [
    ("gaps", "lin1.ft_gaps", _flip_gap_byte),
    ("bitmask", "lin1.ft_mask", _move_mask_bit),
    ("index", "lin1.ft_index", _move_index_byte),
])
def test_one_changed_byte_in_the_index_encoding_is_refused(tmp_path, encoding, suffix, fn):
    _saved(tmp_path, encoding, delta_max=0.05 if encoding != "bitmask" else 0.3)
    _edit(tmp_path, suffix, fn)
    with pytest.raises(pf.AdapterFileError, match=rf"lin1\.{suffix.split('.')[-1]} decodes to \d+ indices that do not "
                                                  r"match .*lin1\.ft_check"):
        PeftModel.from_pretrained(_base(), tmp_path)


def test_auto_picks_gaps_at_usual_density_and_its_tamper_is_refused(tmp_path):
    _saved(tmp_path, "auto", delta_max=0.05)
    assert any(k.endswith("lin1.ft_gaps") for k in load_file(tmp_path / "adapter_model.safetensors"))
    _edit(tmp_path, "lin1.ft_gaps", _flip_gap_byte)
    with pytest.raises(pf.AdapterFileError, match=r"adapter_model.safetensors: .*lin1\.ft_gaps decodes to"):
        PeftModel.from_pretrained(_base(), tmp_path)


def test_changed_value_and_ranking_are_refused(tmp_path):
    _saved(tmp_path, "auto")
    _edit(tmp_path, "lin0.ft_values", lambda t: torch.cat([t[:1] * 1.5 + 0.01, t[1:]]))
    with pytest.raises(pf.AdapterFileError, match=r"lin0\.ft_values does not match .*lin0\.ft_check"):
        PeftModel.from_pretrained(_base(), tmp_path)
    _saved(tmp_path, "auto", delta_max=0.2, grow=False)  # partly grown: the ranked candidate list is saved
    _edit(tmp_path, "lin1.ft_rank", lambda t: torch.cat([t[:-2], t[-1:], t[-2:-1]]) if int(t[-1]) != int(t[-2])
          else t.flip(0))
    with pytest.raises(pf.AdapterFileError, match=r"lin1\.ft_pending / ft_rank / ft_threshold|lin1\.ft_rank / "
                                                  r"ft_threshold do not agree"):
        PeftModel.from_pretrained(_base(), tmp_path)


def test_file_without_checksums_loads_with_one_warning(tmp_path, monkeypatch):
    model = _saved(tmp_path, "auto", delta_max=0.2, grow=False)
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(path)
    save_file({k: v for k, v in sd.items() if not k.endswith(("ft_check", "ft_rank_check"))}, path)
    monkeypatch.setattr(storage, "_warned_unchecked", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        loaded = PeftModel.from_pretrained(_base(), tmp_path)
    msgs = [str(w.message) for w in caught if "no checksums" in str(w.message)]
    assert len(msgs) == 1 and "ft_check is absent" in msgs[0]
    x = torch.randn(4, 12)
    torch.testing.assert_close(loaded(x), model(x))
