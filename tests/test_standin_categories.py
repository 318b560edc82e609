"""The supervised `categories` stand-in: label mapping, labelled renders, a short run that learns, the checkpoint
loading into the segmentor, and the cache refusing to mix it with a SimMIM checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from peft_fishertune.data.synthetic import BUILDING, CAR, EGO, PERSON, ROAD, SKY, render_scene
from peft_fishertune.models import build_segmentation_model
from peft_fishertune.standin import STANDIN_PRESETS, PretrainConfig, SupervisedPretrainConfig, pretrain_standin
from peft_fishertune.standin.pretrain import INFO_NAME
from peft_fishertune.standin.supervised import CATEGORIES, category_lut, render_labeled_batch


def test_category_lut_maps_cityscapes_ids_to_the_7_categories():
    lut = category_lut()
    assert [CATEGORIES[lut[i]] for i in (ROAD, BUILDING, SKY, PERSON, CAR)] == [
        "flat", "construction", "sky", "human", "vehicle"]
    assert lut[EGO] == 255 and lut[0] == 255 and lut[200] == 255  # void and unknown ids are ignored


def test_labelled_renders_match_the_scene():
    cfg = SupervisedPretrainConfig.quick(image_size=32, render_size=[64, 32], min_crop_scale=1.0)
    x, y, styles = render_labeled_batch(cfg, (0, 0), 4, styles=["clean", "night"])
    assert x.shape == (4, 3, 32, 32) and y.shape == (4, 32, 32) and styles == ["clean", "night"] * 2
    # crop = a 32x32 window of the 64x32 scene at its own size: every pixel's label is the category of a scene pixel
    # (the scene is the first draw of the image's generator)
    _, label_ids, _ = render_scene(np.random.default_rng([cfg.seed, 0, 0, 0]), (64, 32))
    scene = category_lut()[label_ids]
    vals = set(torch.unique(y[0]).tolist())
    assert vals <= set(np.unique(scene).tolist()) and len(vals) >= 3
    windows = [scene[:, x0:x0 + 32] for x0 in range(33)]
    assert any(np.array_equal(y[0].numpy(), w) or np.array_equal(y[0].numpy(), w[:, ::-1]) for w in windows)


def test_short_categories_pretraining_learns_and_loads(tmp_path):
    cfg = SupervisedPretrainConfig.quick(steps=30, lr=3e-3, eval_every=0, eval_batch_size=12)
    out = pretrain_standin(cfg, tmp_path / "cat", progress=False)
    info = json.loads((out / INFO_NAME).read_text())
    assert info["settings"]["objective"] == "categories"
    first, last = info["held_out"][0], info["held_out"][-1]
    assert last["loss"] < first["loss"]  # it learns the categories
    assert set(last["miou_per_style"]) == set(cfg.styles)
    model = build_segmentation_model(backbone="dinov2", model_name_or_path=str(out), decoder="linear")
    assert model(torch.randn(1, 3, 64, 64)).logits.shape[1] == 19  # a new 19-class head on the pretrained encoder
    # the same directory with SimMIM settings is refused, naming the differing setting
    with pytest.raises(ValueError, match="objective"):
        pretrain_standin(PretrainConfig.quick(steps=30, lr=3e-3, eval_every=0, eval_batch_size=12),
                         tmp_path / "cat", progress=False)
    assert pretrain_standin(cfg, tmp_path / "cat", progress=False) == out  # same settings: reused


def test_presets_and_validation():
    assert isinstance(STANDIN_PRESETS["categories"](), SupervisedPretrainConfig)
    assert STANDIN_PRESETS["categories"]().hidden_size == STANDIN_PRESETS["demo"]().hidden_size
    with pytest.raises(ValueError, match="objective"):
        SupervisedPretrainConfig.quick(objective="depth")
