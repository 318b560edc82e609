"""Fast mIoU equals evaluate's mean_iou formula, streams, syncs across processes, loads as an evaluate module."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_mean_iou import reference_mean_iou

import peft_fishertune
from peft_fishertune.metrics import MeanIoU, confusion_matrix, mean_iou

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

MODULE_FILE = Path(peft_fishertune.__file__).parent / "metrics" / "hf_evaluate" / "mean_iou_fast.py"


def random_maps(n=4, h=37, w=53, c=19, seed=0, absent=(), out_of_range=True):
    rng = np.random.default_rng(seed)
    preds, labels = [], []
    for _ in range(n):
        lab = rng.integers(0, c, (h, w)).astype(np.int64)
        pred = np.where(rng.random((h, w)) < 0.6, lab, rng.integers(0, c, (h, w)))
        lab[rng.random((h, w)) < 0.15] = 255
        for a in absent:
            lab[lab == a] = 255
            pred[pred == a] = (a + 1) % c
        if out_of_range:
            pred[rng.random((h, w)) < 0.02] = c + 3  # never a valid class
            lab[rng.random((h, w)) < 0.01] = c + 1  # not ignored, outside the classes
        preds.append(pred)
        labels.append(lab)
    return preds, labels


def assert_same(ours, ref):
    for k in ("mean_iou", "mean_accuracy", "overall_accuracy"):
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-12, equal_nan=True, err_msg=k)
    for k in ("per_category_iou", "per_category_accuracy"):
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-12, equal_nan=True, err_msg=k)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("absent", [(), (3, 11)])
def test_identical_to_evaluate_formula(seed, absent):
    preds, labels = random_maps(seed=seed, absent=absent)
    ref = reference_mean_iou([p.copy() for p in preds], [l.copy() for l in labels], 19, 255)
    assert_same(mean_iou(preds, labels, 19, 255), ref)
    if absent:
        assert np.isnan(ref["per_category_iou"][3])
    ref0 = reference_mean_iou([p.copy() for p in preds], [l.copy() for l in labels], 19, 255, nan_to_num=0)
    assert_same(mean_iou(preds, labels, 19, 255, nan_to_num=0), ref0)


def test_identical_with_label_map_and_reduce_labels():
    preds, labels = random_maps(n=2, c=10, seed=5, out_of_range=False)
    labels = [np.where(l == 255, 0, l).astype(np.uint8) for l in labels]
    lm = {1: 2, 7: 0}
    ref = reference_mean_iou([p.copy() for p in preds], [l.copy() for l in labels], 10, 255, label_map=lm,
                             reduce_labels=True)
    assert_same(mean_iou(preds, labels, 10, 255, label_map=lm, reduce_labels=True), ref)


def test_streaming_equals_one_shot_and_per_sample():
    preds, labels = random_maps(n=6, seed=2)
    m = MeanIoU()
    for i in range(0, 6, 2):
        m.update(torch.from_numpy(np.stack(preds[i:i + 2])), torch.from_numpy(np.stack(labels[i:i + 2])))
    res = m.compute()
    assert_same(res, reference_mean_iou(preds, labels, 19, 255))
    per = confusion_matrix(np.stack(preds), np.stack(labels), per_sample=True)
    assert per.shape == (6, 20, 20)
    torch.testing.assert_close(per.sum(0), m.confusion)
    assert set(res["per_class_iou"]) == set(m.class_names) and "road" in res["per_class_iou"]
    assert res["num_labeled_pixels"] == sum(int(((l != 255) & (l < 19)).sum()) for l in labels)
    text = m.table()
    assert "mIoU / mAcc" in text and f"{100 * res['mean_accuracy']:.2f}" in text.splitlines()[-2]
    assert text.splitlines()[-1].split()[-1] == f"{100 * res['overall_accuracy']:.2f}"  # aAcc, in percent
    m.reset()
    assert int(m.confusion.sum()) == 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match="argmax the logits"):
        confusion_matrix(np.zeros((2, 3), np.float32), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="class_names has 2 names"):
        MeanIoU(num_classes=3, class_names=["a", "b"])


def test_evaluate_module_loads_offline_from_local_file():
    import evaluate

    metric = evaluate.load(str(MODULE_FILE))
    preds, labels = random_maps(n=2, h=12, w=9, seed=7, out_of_range=False)
    out = metric.compute(predictions=preds, references=labels, num_labels=19, ignore_index=255)
    assert_same(out, reference_mean_iou(preds, labels, 19, 255))


def speed_data(n, h=512, w=1024):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 19, (n, h, w)).astype(np.uint8)
    labels[:, :50] = 255
    preds = np.where(rng.random(labels.shape) < 0.7, labels, rng.integers(0, 19, labels.shape)).astype(np.int64)
    preds[preds == 255] = 0  # argmax output: always a valid class
    return preds, labels


def fast_miou(preds, labels):
    m = MeanIoU()
    m.update(torch.from_numpy(preds), torch.from_numpy(labels))
    return m.compute()


def test_at_least_30x_faster_than_evaluate_library_path():
    import evaluate

    preds, labels = speed_data(8)
    metric = evaluate.load(str(Path(__file__).with_name("reference_mean_iou.py")))
    t0 = time.process_time()
    ref = metric.compute(predictions=list(preds), references=list(labels), num_labels=19, ignore_index=255)
    t_lib = time.process_time() - t0
    t_fast = float("inf")
    for _ in range(3):  # best of 3, as benchmarks/miou_speed.py
        t0 = time.process_time()
        res = fast_miou(preds, labels)
        t_fast = min(t_fast, time.process_time() - t0)
    assert_same(res, ref)
    assert t_lib / t_fast >= 30, f"speed-up only {t_lib / t_fast:.1f}x ({t_lib:.3f}s vs {t_fast:.4f}s)"


def test_faster_than_the_bare_formula():
    preds, labels = speed_data(4)
    t0 = time.process_time()
    ref = reference_mean_iou(list(preds), list(labels.copy()), 19, 255)
    t_ref = time.process_time() - t0
    t0 = time.process_time()
    res = fast_miou(preds, labels)
    t_fast = time.process_time() - t0
    assert_same(res, ref)
    assert t_ref / t_fast >= 4, f"speed-up only {t_ref / t_fast:.1f}x"


def _dist_worker(rank, world, init_file, preds, labels, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    m = MeanIoU()
    m.update(torch.from_numpy(preds[rank::world]), torch.from_numpy(labels[rank::world]))
    m.sync()
    torch.save(m.confusion, os.path.join(out_dir, f"conf{rank}.pt"))
    dist.destroy_process_group()


def test_sync_sums_over_processes(tmp_path):
    preds, labels = random_maps(n=4, seed=9)
    preds, labels = np.stack(preds), np.stack(labels)
    # fork: the children reuse the parent's imports (spawn would re-import torch/transformers: ~30 s)
    torch.multiprocessing.start_processes(
        _dist_worker, args=(2, str(tmp_path / "init"), preds, labels, str(tmp_path)), nprocs=2, join=True,
        start_method="fork",
    )
    whole = confusion_matrix(preds, labels)
    for r in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"conf{r}.pt"), whole)
