"""Stand-in VFM pretraining (SimMIM on a small DINOv2): quick mode, learning, checkpoint round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from script_modules import load_script

from peft_fishertune.models import build_segmentation_model
from peft_fishertune.standin.pretrain import (
    INFO_NAME,
    PretrainConfig,
    build_mim_model,
    patchify,
    pretrain_standin,
    random_block_mask,
    render_batch,
    unpatchify,
)


def test_block_mask_and_patchify():
    g = torch.Generator().manual_seed(0)
    mask = random_block_mask(3, (32, 64), patch_size=8, mask_patch_size=16, mask_ratio=0.6, generator=g)
    assert mask.shape == (3, 4 * 8) and mask.dtype == torch.bool
    grid = mask.view(3, 4, 8)
    # exactly round(0.6 * 8) of the 8 blocks of 2x2 patches, constant inside each block
    blocks = grid.view(3, 2, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(3, 8, 4)
    assert bool((blocks.all(-1) | ~blocks.any(-1)).all())
    assert blocks.all(-1).sum(1).tolist() == [5, 5, 5]
    x = torch.randn(2, 3, 32, 64)
    p = patchify(x, 8)
    assert p.shape == (2, 32, 192)
    assert torch.equal(unpatchify(p, 8, (4, 8)), x)
    assert torch.equal(p[0, 9].view(8, 8, 3).permute(2, 0, 1), x[0, :, 8:16, 8:16])  # row-major: patch 9 = (1, 1)
    with pytest.raises(ValueError, match="mask_ratio"):
        random_block_mask(1, (32, 32), 8, 16, 0.1)


def test_config_validation():
    with pytest.raises(ValueError, match="num_hidden_layers"):
        PretrainConfig.quick(num_hidden_layers=2)
    with pytest.raises(ValueError, match="styles"):
        PretrainConfig.quick(styles=["sepia"])
    with pytest.raises(ValueError, match="mask_patch_size"):
        PretrainConfig.quick(mask_patch_size=12)


def test_weight_decay_follows_the_segmentation_models_rule():
    """The stand-in pretraining uses models/weight_decay.py: on the MIM model (DINOv2 + linear pixel decoder) that
    is exactly the >= 2-D weights of Linear / Conv2d, as its own rule said before the two were made one."""
    from torch import nn

    from peft_fishertune.standin.pretrain import _param_groups

    model = build_mim_model(PretrainConfig.quick())
    decay, no_decay = _param_groups(model, 0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    expected = {id(p) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                for p in m.parameters(recurse=False) if p.ndim >= 2}
    assert {id(p) for p in decay["params"]} == expected
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {n for n in skipped if "embeddings" in n} >= {
        "encoder.embeddings.cls_token", "encoder.embeddings.mask_token", "encoder.embeddings.position_embeddings"}
    assert any(n.endswith("layer_scale1.lambda1") for n in skipped) and any(n.endswith("norm1.weight") for n in skipped)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_loss_decreases_on_a_fixed_batch():
    cfg = PretrainConfig.quick()
    model = build_mim_model(cfg)
    x = render_batch(cfg, (0, 0), 4)
    mask = random_block_mask(4, (cfg.image_size,) * 2, cfg.patch_size, cfg.mask_patch_size, cfg.mask_ratio,
                             torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = model(x, mask)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    # the loss covers only masked patches: changing a visible patch's target leaves it unchanged
    model.eval()
    with torch.no_grad():
        base = model(x, mask)["loss"]
        target = model.target(x)
        pred = model(x, mask)["pred"]
        manual = ((pred - target).abs() * mask[..., None]).sum() / (mask.sum() * target.shape[-1])
    assert base == pytest.approx(manual.item(), rel=1e-5)


def test_quick_pretraining_checkpoint_loads_into_the_segmentation_model(tmp_path, capsys):
    out = tmp_path / "standin"
    cfg = PretrainConfig.quick()
    path = pretrain_standin(cfg, out, progress=False)
    assert path == out
    info = json.loads((out / INFO_NAME).read_text())
    assert info["settings"] == cfg.to_dict()
    assert len(info["loss_curve"]) == cfg.steps and info["wall_time_s"] > 0
    assert [e["step"] for e in info["held_out_loss"]] == [0, cfg.steps]

    saved = load_file(str(out / "model.safetensors"))
    model = build_segmentation_model(backbone="dinov2", model_name_or_path=str(out), decoder="linear", num_labels=19)
    state = model.backbone.model.state_dict()
    # transformers writes DINOv2's hub names; map the in-memory names to them by hand
    hub = {".attention.q_proj.": ".attention.attention.query.", ".attention.k_proj.": ".attention.attention.key.",
           ".attention.v_proj.": ".attention.attention.value.", ".attention.o_proj.": ".attention.output.dense."}
    seen = set()
    for k, v in state.items():
        key = k
        for a, b in hub.items():
            key = key.replace(a, b)
        assert torch.equal(v, saved[key]), k
        seen.add(key)
    # what the segmentation backbone drops is exactly the pretraining-only head
    assert set(saved) - seen == {"embeddings.mask_token", "layernorm.weight", "layernorm.bias"}
    assert model(torch.randn(1, 3, 32, 64)).logits.shape == (1, 19, 32, 64)

    # same settings: reused, not retrained; other settings: a clear error unless overwrite
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert pretrain_standin(cfg, out, progress=True) == out
    assert "reusing" in capsys.readouterr().out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match=r"steps=6 there vs 7 here"):
        pretrain_standin(PretrainConfig.quick(steps=7), out, progress=False)
    pretrain_standin(PretrainConfig.quick(steps=7), out, progress=False, overwrite=True)
    assert json.loads((out / INFO_NAME).read_text())["settings"]["steps"] == 7


def test_cli_quick(tmp_path):
    cli = load_script("scripts/pretrain_standin.py", "pretrain_standin_cli")
    cli.main(["--quick", "--steps", "3", "--styles", "fog", "night", "--output_dir", str(tmp_path / "q"),
              "--no_progress"])
    info = json.loads((tmp_path / "q" / INFO_NAME).read_text())
    assert info["settings"]["steps"] == 3 and info["settings"]["styles"] == ["fog", "night"]
    assert info["settings"]["hidden_size"] == PretrainConfig.quick().hidden_size
    with pytest.raises(SystemExit):
        cli.main(["--quick", "--mask_ratio", "1.5", "--output_dir", str(tmp_path / "bad")])


def test_cli_preset_builds_the_cache_the_resolver_reads(tmp_path, monkeypatch):
    from peft_fishertune.standin import resolve_standin, standin_cache_dir

    monkeypatch.setenv("PEFT_FISHERTUNE_CACHE", str(tmp_path / "cache"))
    cli = load_script("scripts/pretrain_standin.py", "pretrain_standin_cli")
    with pytest.raises(SystemExit):  # changed settings cannot go into the preset's cache
        cli.main(["--preset", "quick", "--steps", "3", "--no_progress"])
    cli.main(["--preset", "quick", "--no_progress"])
    assert resolve_standin("standin:quick", build=False, progress=False) == str(standin_cache_dir("quick"))
