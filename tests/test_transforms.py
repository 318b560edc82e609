"""Transforms keep image/label alignment exactly; crop, resize, pad, collate and inference behave."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from peft_fishertune.data import EvalTransform, SegmentationCollator, TrainTransform, collate_fn, denormalize
from peft_fishertune.data.transforms import cat_max_ratio_crop_box, photometric_distortion, rescale_size
from peft_fishertune.inference import inference, slide_inference, whole_inference, window_grid


def coded_pair(h=120, w=200, seed=0):
    """Per-pixel random labels 0..18 and an image whose red channel = 10 * label: any
    misalignment between image and label by even one pixel breaks ``R == 10 * label``."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 19, (h, w), dtype=np.uint8)
    image = np.stack([label * 10, rng.integers(0, 256, (h, w)), rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
    return image, label


@pytest.mark.parametrize("seed", range(6))
def test_train_transform_alignment_is_pixel_exact(seed):
    image, label = coded_pair(seed=seed)
    tf = TrainTransform(base_scale=(200, 120), ratio_range=(0.6, 1.7), crop_size=(64, 96), photometric=False,
                        image_interpolation="nearest", seed=seed, cat_max_ratio=1.0)
    for _ in range(5):
        out = tf(Image.fromarray(image), label)
        img = denormalize(out["pixel_values"])
        lab = out["labels"].numpy()
        assert out["pixel_values"].shape == (3, 64, 96) and out["labels"].dtype == torch.int64
        valid = lab != 255
        assert valid.mean() > 0.3
        np.testing.assert_array_equal(img[..., 0][valid].astype(int), 10 * lab[valid])


def test_alignment_test_detects_a_one_pixel_shift():
    image, label = coded_pair()
    shifted = np.roll(label, 1, axis=1)
    tf = TrainTransform(base_scale=(200, 120), ratio_range=(1.0, 1.0), crop_size=(64, 96), photometric=False,
                        image_interpolation="nearest", seed=0, cat_max_ratio=1.0)
    out = tf(image, shifted)
    img, lab = denormalize(out["pixel_values"]), out["labels"].numpy()
    assert (img[..., 0].astype(int) != 10 * lab).mean() > 0.5


def test_flip_happens_and_stays_aligned():
    image, label = coded_pair(h=64, w=96)
    tf = TrainTransform(base_scale=(96, 64), ratio_range=(1.0, 1.0), crop_size=(64, 96), photometric=False,
                        flip_prob=1.0, seed=0)
    out = tf(image, label)
    np.testing.assert_array_equal(out["labels"].numpy(), label[:, ::-1])
    np.testing.assert_array_equal(denormalize(out["pixel_values"])[..., 0], image[:, ::-1, 0])


def test_bilinear_image_nearest_label_blocks_stay_aligned():
    # 8x8 blocks: after a bilinear 1.5x resize the block interiors must still match
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 19, (8, 12), dtype=np.uint8)
    label = np.kron(blocks, np.ones((8, 8), np.uint8))
    image = np.repeat((label * 10)[..., None], 3, -1).astype(np.uint8)
    tf = TrainTransform(base_scale=(96, 64), ratio_range=(1.5, 1.5), crop_size=(96, 144), photometric=False,
                        flip_prob=0.0, seed=0, cat_max_ratio=1.0)
    out = tf(image, label)
    img, lab = denormalize(out["pixel_values"])[..., 0].astype(int), out["labels"].numpy()
    # interior = pixels whose 3x3 neighbourhood has a single label
    pad = np.pad(lab, 1, mode="edge")
    same = np.ones_like(lab, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same &= pad[1 + dy : 1 + dy + lab.shape[0], 1 + dx : 1 + dx + lab.shape[1]] == lab
    assert same.mean() > 0.5
    np.testing.assert_array_equal(img[same], 10 * lab[same])
    # labels were resized with nearest: no new values appear
    assert set(np.unique(lab)) <= set(np.unique(label))


def test_random_resize_range_and_padding():
    image, label = coded_pair(h=40, w=60)
    tf = TrainTransform(base_scale=(60, 40), ratio_range=(0.5, 0.5), crop_size=(64, 64), photometric=False, seed=1)
    out = tf(image, label)  # resized to 30x20, padded to 64x64
    lab = out["labels"].numpy()
    assert (lab[:20, :30] != 255).all() and (lab[20:] == 255).all() and (lab[:, 30:] == 255).all()
    assert torch.all(out["pixel_values"][:, 20:, :] == 0)


def test_rescale_size_matches_mmcv_rule():
    assert rescale_size(2048, 1024, (1024, 512)) == (1024, 512)
    assert rescale_size(1914, 1052, (1024, 512)) == (int(1914 * 512 / 1052 + 0.5), 512)
    assert rescale_size(1280, 720, (2048, 1024)) == (1820, 1024)


def test_cat_max_ratio_retry_avoids_single_class_crops():
    label = np.zeros((512, 2048), np.uint8)
    label[:, 1000:1300] = 1
    rng = np.random.default_rng(0)
    ok = lambda box: (label[box[0]:box[1], box[2]:box[3]] == 0).mean() < 0.75  # noqa: E731
    with_retry = np.mean([ok(cat_max_ratio_crop_box(label, (512, 512), rng, 0.75)) for _ in range(200)])
    without = np.mean([ok(cat_max_ratio_crop_box(label, (512, 512), rng, 1.0)) for _ in range(200)])
    assert with_retry > 0.9 and without < 0.5


def test_photometric_distortion_changes_colors_only():
    image, _ = coded_pair(h=32, w=48)
    outs = [photometric_distortion(image, np.random.default_rng(s)) for s in range(8)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
    assert sum(not np.array_equal(o, image) for o in outs) >= 5
    np.testing.assert_array_equal(photometric_distortion(image, np.random.default_rng(5)), outs[5])


def test_eval_transform_resizes_image_only_by_default():
    image, label = coded_pair(h=100, w=200)
    out = EvalTransform(test_scale=(100, 50))(image, label)
    assert out["pixel_values"].shape == (3, 50, 100)
    np.testing.assert_array_equal(out["labels"].numpy(), label)
    out = EvalTransform(test_scale=(100, 50), resize_label=True)(image, label)
    # PIL samples pixel centres: output pixel i <- input pixel 2i + 1
    np.testing.assert_array_equal(out["labels"].numpy(), label[1::2, 1::2])


def test_collate_stacks_and_pads():
    a = {"pixel_values": torch.ones(3, 4, 6), "labels": torch.zeros(4, 6, dtype=torch.long)}
    b = {"pixel_values": torch.ones(3, 5, 5), "labels": torch.ones(5, 5, dtype=torch.long)}
    batch = collate_fn([a, a])
    assert batch["pixel_values"].shape == (2, 3, 4, 6) and batch["labels"].dtype == torch.long
    with pytest.raises(ValueError, match="different shapes"):
        collate_fn([a, b])
    padded = SegmentationCollator(pad=True)([a, b])
    assert padded["labels"].shape == (2, 5, 6)
    assert padded["labels"][0, 4].eq(255).all() and padded["labels"][1, :, 5].eq(255).all()
    with pytest.raises(ValueError, match="expected 'pixel_values' and 'labels'"):
        collate_fn([{"image": 1, "label": 2}])


class _Repeat(torch.utils.data.Dataset):
    def __init__(self, tf):
        self.tf = tf
        self.image, self.label = coded_pair(h=64, w=96)

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.tf(self.image, self.label)


def test_dataloader_workers_draw_different_augmentations():
    torch.manual_seed(0)
    tf = TrainTransform(base_scale=(96, 64), crop_size=(32, 32), photometric=True)
    loader = torch.utils.data.DataLoader(_Repeat(tf), batch_size=1, num_workers=2, collate_fn=collate_fn)
    outs = [b["pixel_values"] for b in loader]
    assert not torch.equal(outs[0], outs[1])  # first sample of worker 0 vs worker 1


# ------------------------------------------------------------------ inference


def pointwise_model(num_classes=5, down=1):
    """A fixed 1x1 conv (optionally followed by average pooling): slide == whole for down=1."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, num_classes, 1)

    def fn(x):
        y = conv(x)
        return torch.nn.functional.avg_pool2d(y, down) if down > 1 else y

    return fn


def test_slide_equals_whole_for_pointwise_model():
    x = torch.randn(2, 3, 70, 150)
    fn = pointwise_model()
    whole = whole_inference(fn, x, 5)
    slide = slide_inference(fn, x, 5, window=32, stride=21)
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inference(fn, x, 5, mode="slide", window=32, stride=21, windows_per_call=4), whole,
                               rtol=1e-5, atol=1e-5)


def test_slide_averages_overlaps_and_upsamples():
    calls = []

    def fn(x):
        calls.append(tuple(x.shape))
        return torch.ones(x.shape[0], 2, x.shape[2] // 4, x.shape[3] // 4)  # stride-4 head

    out = slide_inference(fn, torch.zeros(1, 3, 512, 1024), 2, window=512, stride=341)
    assert out.shape == (1, 2, 512, 1024)
    torch.testing.assert_close(out, torch.ones_like(out))  # averaging ones gives ones everywhere
    assert len(calls) == len(window_grid(512, 1024, (512, 512), (341, 341))) == 3
    boxes = window_grid(512, 1024, (512, 512), (341, 341))
    assert boxes == [(0, 512, 0, 512), (0, 512, 341, 853), (0, 512, 512, 1024)]


def test_slide_window_larger_than_image_and_out_size():
    x = torch.randn(1, 3, 40, 50)
    fn = pointwise_model()
    out = slide_inference(fn, x, 5, window=64, stride=32, out_size=(80, 100))
    assert out.shape == (1, 5, 80, 100)
    torch.testing.assert_close(out, whole_inference(fn, x, 5, out_size=(80, 100)), rtol=1e-5, atol=1e-5)


def test_inference_errors_are_clear():
    fn = pointwise_model(num_classes=4)
    with pytest.raises(ValueError, match="4 channels, num_classes=5"):
        slide_inference(fn, torch.randn(1, 3, 32, 32), 5, window=16, stride=8)
    with pytest.raises(ValueError, match="stride"):
        slide_inference(fn, torch.randn(1, 3, 32, 32), 4, window=16, stride=20)
    with pytest.raises(ValueError, match="mode="):
        inference(fn, torch.randn(1, 3, 32, 32), 4, mode="tile")
    with pytest.raises(TypeError, match="expected a logits tensor"):
        whole_inference(lambda x: [x], torch.randn(1, 3, 8, 8))


def test_model_output_with_logits_attribute():
    class Out:
        def __init__(self, logits):
            self.logits = logits

    fn = pointwise_model()
    x = torch.randn(1, 3, 20, 20)
    torch.testing.assert_close(whole_inference(lambda t: Out(fn(t)), x, 5), whole_inference(fn, x, 5))
