"""Synthetic domains: deterministic, valid labels, styles change appearance only, readable as Cityscapes, fast."""

from __future__ import annotations

import numpy as np
import pytest

from peft_fishertune.data import STYLES, apply_style, generate_synthetic_domains, load_dgss_dataset, render_scene
from peft_fishertune.data.labels import ID_TO_TRAINID
from peft_fishertune.data.synthetic import main, synthetic_stream


def test_render_is_deterministic_and_seed_dependent():
    a = render_scene(np.random.default_rng(3), (256, 128))
    b = render_scene(np.random.default_rng(3), (256, 128))
    c = render_scene(np.random.default_rng(4), (256, 128))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[1], c[1])
    image, lab, depth = a
    assert image.shape == (128, 256, 3) and image.dtype == np.uint8
    assert lab.shape == (128, 256) and depth.shape == (128, 256)


def test_labels_are_cityscapes_ids_with_many_classes():
    seen = set()
    for s in range(10):
        _, lab, depth = render_scene(np.random.default_rng(s), (512, 256))
        vals = set(np.unique(lab).tolist())
        assert vals <= set(ID_TO_TRAINID), vals
        seen |= vals
        assert depth.min() > 0
        # the road is nearer at the bottom of the image than at the horizon
        road = lab == 7
        rows = np.nonzero(road.any(1))[0]
        assert depth[rows[-1]][road[rows[-1]]].mean() < depth[rows[0]][road[rows[0]]].mean()
    # road, sidewalk, building, pole, sign, vegetation, sky, person, car at least
    assert {7, 8, 11, 17, 20, 21, 23, 24, 26} <= seen


def test_styles_change_appearance_not_geometry():
    rng = np.random.default_rng(0)
    image, lab, depth = render_scene(rng, (256, 128))
    outs = {s: apply_style(image, s, np.random.default_rng(1), depth, lab) for s in STYLES}
    np.testing.assert_array_equal(outs["clean"], image)
    for s in STYLES[1:]:
        assert outs[s].shape == image.shape and not np.array_equal(outs[s], image), s
    gray = lambda x: x.astype(np.float32).mean(2)  # noqa: E731
    assert gray(outs["night"]).mean() < 0.6 * gray(image).mean()
    # fog: the far sky/horizon becomes the airlight (low contrast), near road keeps more contrast
    far = depth > 200
    assert gray(outs["fog"])[far].std() < gray(image)[far].std()
    # snow whitens the ground
    ground = np.isin(lab, (7, 8))
    assert gray(outs["snow"])[ground].mean() > gray(image)[ground].mean() + 20
    with pytest.raises(ValueError, match="style='sunny'"):
        apply_style(image, "sunny", rng)
    # works without depth / labels (in-memory use)
    assert apply_style(image, "fog", np.random.default_rng(2)).shape == image.shape
    assert apply_style(image, "night", np.random.default_rng(2)).shape == image.shape


def test_stream_cycles_styles():
    it = synthetic_stream(seed=1, styles=("fog", "night"), size=(128, 64))
    items = [next(it) for _ in range(4)]
    assert [x["style"] for x in items] == ["fog", "night", "fog", "night"]
    again = next(synthetic_stream(seed=1, styles=("fog", "night"), size=(128, 64)))
    np.testing.assert_array_equal(again["image"], items[0]["image"])


def test_generated_domains_load_as_cityscapes(tmp_path):
    roots = generate_synthetic_domains(tmp_path, styles=("clean", "fog"), num_images={"train": 3, "val": 2},
                                       size=(128, 64), seed=5, progress=False)
    assert set(roots) == {"clean", "fog"}
    ds_clean = load_dgss_dataset("cityscapes", roots["clean"], split="train")
    ds_fog = load_dgss_dataset("cityscapes", roots["fog"], split="train")
    assert len(ds_clean) == len(ds_fog) == 3
    assert len(load_dgss_dataset("cityscapes", roots["fog"], split="val")) == 2
    s_clean, s_fog = ds_clean[1], ds_fog[1]
    # paired scenes: same labels, different appearance
    np.testing.assert_array_equal(np.asarray(s_clean["label"]), np.asarray(s_fog["label"]))
    assert not np.array_equal(np.asarray(s_clean["image"]), np.asarray(s_fog["image"]))
    _, lab, _ = render_scene(np.random.default_rng([5, 0, 1]), (128, 64))
    lut = np.full(256, 255, np.uint8)
    for k, v in ID_TO_TRAINID.items():
        lut[k % 256] = v
    np.testing.assert_array_equal(np.asarray(s_clean["label"]), lut[lab])
    # deterministic: regenerate and compare bytes
    generate_synthetic_domains(tmp_path / "again", styles=("fog",), num_images={"train": 3}, size=(128, 64), seed=5,
                               progress=False)
    a = sorted((tmp_path / "fog/leftImg8bit/train").rglob("*.png"))[2].read_bytes()
    b = sorted((tmp_path / "again/fog/leftImg8bit/train").rglob("*.png"))[2].read_bytes()
    assert a == b


def test_generator_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="style='haze'"):
        generate_synthetic_domains(tmp_path, styles=("haze",), progress=False)
    with pytest.raises(ValueError, match="split 'holdout'"):
        generate_synthetic_domains(tmp_path, num_images={"holdout": 1}, progress=False)
    with pytest.raises(ValueError, match="too small"):
        generate_synthetic_domains(tmp_path, size=(16, 8), progress=False)


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path), "--styles", "night", "--train", "1", "--val", "1", "--size", "96x48"])
    assert "load_dgss_dataset('cityscapes'" in capsys.readouterr().out
    assert len(load_dgss_dataset("cityscapes", tmp_path / "night", split="val")) == 1


def test_every_style_renders_at_512x256():
    # the speed of this loop is a benchmark figure (benchmarks/data_pipeline.py), not a timed test
    for i in range(len(STYLES)):
        rng = np.random.default_rng(i)
        image, lab, depth = render_scene(rng, (512, 256))
        styled = apply_style(image, STYLES[i], rng, depth, lab)
        assert styled.shape == (256, 512, 3) and styled.dtype == np.uint8, STYLES[i]
        assert lab.shape == (256, 512) and depth.shape == (256, 512)
