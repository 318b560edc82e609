"""benchmarks/sddmm_kernel_ab.py at a tiny size: the C kernel is built and run, every way's values match float64,
and the report carries all three ways per density."""

import json
import os
import shutil

import pytest
from script_modules import load_script, run_main

needs_cc = pytest.mark.skipif(not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")),
                              reason="no C compiler")


@needs_cc
def test_c_kernel_and_sampled_addmm_agree_and_are_timed(tmp_path):
    mod = load_script("benchmarks/sddmm_kernel_ab.py")
    out, md = tmp_path / "k.jsonl", tmp_path / "k.md"
    # tokens 37: not a multiple of the kernel's 16 lanes, so its scalar tail runs; densities give rows with fewer
    # than four and with more than four entries (the four-at-a-time block and its remainder)
    assert run_main(mod, ["--hidden", "24", "--tokens", "37", "--densities", "0.05,0.5", "--reps", "2",
                          "--threads", "1", "--out", str(out), "--md", str(md)]) == 0
    data = json.loads(out.read_text())
    assert data["values_ok"] and data["max_rel_error"] <= 1e-5
    assert [s["shape"] for s in data["shapes"]] == [[24, 24], [96, 24], [24, 96]]
    for s in data["shapes"]:
        assert all(len(v) == 2 and min(v) > 0 for v in s["ms_median"].values())
    assert "C / sampled_addmm" in md.read_text()


@needs_cc
def test_a_wrong_kernel_is_caught(tmp_path, monkeypatch):
    """The value check can fail: a kernel that drops the last token's product is reported as wrong (exit 1)."""
    mod = load_script("benchmarks/sddmm_kernel_ab.py")
    monkeypatch.setattr(mod, "C_SOURCE", mod.C_SOURCE.replace("for (int64_t k = 0; k < K; k++) s +=",
                                                              "for (int64_t k = 0; k < K - 1; k++) s +="))
    out = tmp_path / "k.jsonl"
    assert run_main(mod, ["--hidden", "8", "--tokens", "5", "--densities", "0.5", "--reps", "2", "--threads", "1",
                          "--out", str(out)]) == 1
    assert not json.loads(out.read_text())["values_ok"]


@needs_cc
def test_prices_a_saved_adapters_selection(tmp_path):
    """--adapter: the shapes measured are the adapter's own, every 2-D layer's active count is read back through the
    library's decoder, and the three policies are priced (the per-layer best can be no dearer than the library's)."""
    import torch
    from peft import get_peft_model
    from transformers import Dinov2Config, Dinov2Model

    from peft_fishertune import FisherTuneConfig

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=3,
                                     image_size=28, patch_size=14))
    peft_model = get_peft_model(model, FisherTuneConfig(target_modules=["fc1", "fc2"], init_selection="random",
                                                        delta_min=0.2, delta_max=0.2))
    peft_model.save_pretrained(tmp_path / "adapter")
    mod = load_script("benchmarks/sddmm_kernel_ab.py")
    out, md = tmp_path / "k.jsonl", tmp_path / "k.md"
    assert run_main(mod, ["--adapter", str(tmp_path / "adapter" / "adapter_model.safetensors"), "--tokens", "19",
                          "--densities", "0.1,0.3", "--reps", "2", "--threads", "1", "--out", str(out),
                          "--md", str(md)]) == 0
    data = json.loads(out.read_text())
    assert sorted(s["shape"] for s in data["shapes"]) == [[16, 48], [48, 16]]
    priced = data["adapter_backward_ms"]
    layers = [m for m in peft_model.modules() if hasattr(m, "num_active")]
    assert len(layers) == 4
    assert priced["layers"] == 4 and priced["elements"] == sum(m.weight_numel for m in layers)
    assert priced["active"] == sum(m.num_active("default") for m in layers) > 0
    assert 0 < priced["best_sampled_addmm"] <= priced["library"] + 1e-9
    assert "The selection of" in md.read_text()
