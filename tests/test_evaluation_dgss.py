"""Evaluation as DGSS papers report it: metrics in percent against a hand-computed confusion matrix, per-class
table formats, ACDC aggregate from summed confusion matrices, multi-scale + flip TTA against an explicit loop,
protocol presets, pictures, and scripts/evaluate.py (names, percent JSON, clean errors)."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from script_modules import load_script

from peft_fishertune.inference.evaluation import DomainResult, EvaluationTable, evaluation_table
from peft_fishertune.inference.protocols import (
    PROTOCOLS,
    ProtocolTransform,
    describe_settings,
    get_protocol,
    protocol_table_markdown,
    resolve_domains,
    resolve_protocol,
)
from peft_fishertune.inference.sliding import inference
from peft_fishertune.inference.tta import MMSEG_RATIOS, TTA, tta_inference
from peft_fishertune.metrics import MeanIoU

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread (two threads on a busy 2-core machine made these tests 50x slower)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _metric(preds, labels, c=3) -> dict:
    m = MeanIoU(num_classes=c, class_names=[f"c{i}" for i in range(c)])
    m.update(torch.tensor(preds), torch.tensor(labels))
    out = m.compute()
    out["confusion"] = m.confusion.clone()
    return out


# label:  0 0 0 1 1 2 255 ; pred: 0 0 1 1 2 2 0
# confusion [label, pred]: (0,0)=2 (0,1)=1 (1,1)=1 (1,2)=1 (2,2)=1; the ignored pixel counts nowhere
HAND = _metric([[0, 0, 1, 1, 2, 2, 0]], [[0, 0, 0, 1, 1, 2, 255]])


def test_metrics_in_percent_against_a_hand_computed_confusion_matrix():
    conf = HAND["confusion"].numpy()
    assert conf[:3, :3].tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    table = evaluation_table({"d": HAND}, sizes={"d": 1}, protocol="custom: whole")
    d = table["d"]
    iou = [2 / 3, 1 / 3, 1 / 2]  # TP / (TP + FP + FN): class 0: 2 / (3 + 2 - 2), class 1: 1 / (2 + 2 - 1), ...
    acc = [2 / 3, 1 / 2, 1.0]  # TP / (TP + FN)
    np.testing.assert_allclose(d.per_class_iou, [100 * v for v in iou])
    np.testing.assert_allclose(d.per_class_acc, [100 * v for v in acc])
    assert d.miou == pytest.approx(100 * sum(iou) / 3) == pytest.approx(50.0)
    assert d.macc == pytest.approx(100 * sum(acc) / 3)
    assert d.aacc == pytest.approx(100 * 4 / 6)  # 4 right of 6 labelled pixels
    assert d.class_names == ("c0", "c1", "c2") and d.num_images == 1
    # a DomainResult from the confusion matrix alone gives the same numbers
    again = DomainResult.from_confusion("d", conf, class_names=d.class_names, num_images=1)
    assert again == d


def _table() -> EvaluationTable:
    a = _metric([[0, 0, 1, 1, 2, 2]], [[0, 0, 0, 1, 1, 2]])
    b = _metric([[0, 1, 1, 1]], [[0, 1, 1, 255]])  # class 2 absent from labels and predictions: NaN
    return evaluation_table({"city/val": a, "bdd/val": b}, sizes={"city/val": 1, "bdd/val": 1}, step=5,
                            protocol="rein: slide 512/341, test scale 1024x512, no TTA")


def test_table_formats_percent_everywhere(tmp_path):
    t = _table()
    assert math.isnan(t["bdd/val"].per_class_iou[2])
    assert t.mean == pytest.approx((t["city/val"].miou + t["bdd/val"].miou) / 2)
    md = t.to_markdown(title="final", per_class=True)
    assert "| metric | city/val | bdd/val | avg |" in md
    for row in ("| mIoU |", "| aAcc |", "| mAcc |", "| c0 |", "| c2 |"):
        assert row in md, row
    assert "protocol: rein: slide 512/341" in md and "mean of the per-domain mIoUs" in md
    assert "| c2 | 50.00 | - | 50.00 |" in md  # NaN shown as '-', avg over the domains that have the class
    rows = list(csv.reader(io.StringIO(t.to_class_csv())))
    assert rows[0] == ["metric", "class", "city/val", "bdd/val", "avg"]
    by = {(r[0], r[1]): r[2:] for r in rows[1:]}
    assert float(by[("IoU", "c0")][0]) == pytest.approx(t["city/val"].per_class_iou[0])
    assert float(by[("mIoU", "all")][2]) == pytest.approx(t.mean) and by[("IoU", "c2")][1] == ""
    assert float(by[("aAcc", "all")][0]) == pytest.approx(100.0 * 4 / 6) and float(by[("aAcc", "all")][1]) == 100.0
    data = json.loads(t.to_json())  # strict JSON: NaN written as null
    assert data["units"] == "percent" and data["domains"]["bdd/val"]["per_class_iou"]["c2"] is None
    assert data["domains"]["city/val"]["mIoU"] == pytest.approx(t["city/val"].miou) and data["step"] == 5
    assert data["mean_mIoU"] == pytest.approx(t.mean) and "per-domain mIoUs" in data["mean_definition"]
    paths = t.write(str(tmp_path), title="final", json_extra={"method": "fishertune", "table": t.miou})
    saved = json.loads(Path(paths["json"]).read_text())
    assert saved["method"] == "fishertune" and saved["evaluation"]["domains"].keys() == {"city/val", "bdd/val"}
    assert "| class (IoU %) |" in Path(paths["md"]).read_text() and "| class (Acc %) |" in Path(paths["md"]).read_text()
    assert Path(paths["csv"]).read_text() == t.to_class_csv()
    logs = t.log_metrics("eval")
    assert logs["eval_mIoU"] == pytest.approx(t.mean) and logs["eval_city/val_aAcc"] == pytest.approx(t["city/val"].aacc)
    assert "eval_aAcc" in logs and "eval_mAcc" in logs


def test_acdc_all_sums_confusion_matrices_and_stays_out_of_the_mean():
    rng = np.random.default_rng(0)
    results, sizes = {}, {}
    for k, cond in enumerate(("fog", "night", "rain", "snow")):
        n = 50 * (k + 1) ** 2  # very different sizes: the summed matrix differs from the mean of mIoUs
        lab = rng.integers(0, 3, (1, n))
        pred = np.where(rng.random((1, n)) < 0.2 + 0.2 * k, lab, rng.integers(0, 3, (1, n)))
        results[f"acdc/{cond}/val"] = _metric(pred, lab)
        sizes[f"acdc/{cond}/val"] = k + 1
    t = evaluation_table(results, sizes=sizes)
    assert t.names[-1] == "acdc-all" and t["acdc-all"].members == tuple(results)
    total = sum(r["confusion"] for r in results.values())
    ref = MeanIoU(num_classes=3)
    ref.confusion += total
    assert t["acdc-all"].miou == pytest.approx(100 * ref.compute()["mean_iou"])
    mean_of_mious = sum(t[n].miou for n in results) / 4
    assert abs(t["acdc-all"].miou - mean_of_mious) > 1.0  # an average of mIoUs would be wrong here
    assert t.mean == pytest.approx(mean_of_mious) and t["acdc-all"].num_images == 10
    assert "acdc-all (summed confusion matrices) left out" in t.to_markdown()
    # three conditions: no aggregate; a missing confusion matrix is refused by name
    three = evaluation_table({k: v for k, v in list(results.items())[:3]})
    assert "acdc-all" not in three.names
    bare = EvaluationTable(tuple(replace_conf(d) for d in three.domains))
    with pytest.raises(ValueError, match="no confusion matrix"):
        bare.with_aggregate("x", bare.names)


def replace_conf(d: DomainResult) -> DomainResult:
    from dataclasses import replace

    return replace(d, confusion=None)


# ------------------------------------------------------------------------------------------------ TTA
class TinySeg(torch.nn.Module):
    """Position-dependent (not flip-symmetric) logits at half resolution: flips and scales must be undone right."""

    def __init__(self, c=5):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(5, c, 3, stride=2, padding=1)

    def forward(self, x):
        b, _, h, w = x.shape
        xs = torch.linspace(-1, 1, w).view(1, 1, 1, w).expand(b, 1, h, w)
        ys = torch.linspace(-1, 1, h).view(1, 1, h, 1).expand(b, 1, h, w)
        return self.conv(torch.cat([x, xs, ys], 1))


def reference_tta(model, x, c, scales, flip, mode, out_size, **kw):
    """mmseg's recipe, written out: resize, (flip), infer, (flip back), resize to out_size, softmax, average."""
    probs = []
    h, w = x.shape[-2:]
    for r in scales:
        xr = F.interpolate(x, size=(int(h * r + 0.5), int(w * r + 0.5)), mode="bilinear", align_corners=False)
        for f in ([False, True] if flip else [False]):
            inp = torch.flip(xr, dims=[3]) if f else xr
            logits = inference(model, inp, c, mode=mode, **kw)
            if f:
                logits = torch.flip(logits, dims=[3])
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
            probs.append(torch.softmax(logits, dim=1))
    return torch.stack(probs).mean(0)


@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_tta_equals_the_reference_loop(mode):
    model = TinySeg().eval()
    x = torch.randn(2, 3, 16, 24)
    kw = {"window": (12, 12), "stride": (8, 8)} if mode == "slide" else {}
    out = tta_inference(model, x, 5, TTA(MMSEG_RATIOS, flip=True), mode=mode, out_size=(30, 50), **kw)
    ref = reference_tta(model, x, 5, MMSEG_RATIOS, True, mode, (30, 50), **kw)
    assert out.shape == (2, 5, 30, 50)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.sum(1), torch.ones(2, 30, 50))  # probabilities
    # the flip is undone: without it the result differs (the model is not flip-symmetric)
    no_flip = tta_inference(model, x, 5, TTA(MMSEG_RATIOS, flip=False), mode=mode, out_size=(30, 50), **kw)
    assert not torch.allclose(no_flip, out, atol=1e-4)
    # TTA() is one plain pass (logits at the input size, then resized to the output size: mmseg's two steps)
    plain = F.interpolate(inference(model, x, 5, mode=mode, **kw), size=(30, 50), mode="bilinear").softmax(1)
    torch.testing.assert_close(tta_inference(model, x, 5, TTA(), mode=mode, out_size=(30, 50), **kw), plain)


def test_tta_config_checks():
    assert TTA(MMSEG_RATIOS, flip=True).passes == 12 and not TTA().enabled
    with pytest.raises(ValueError, match=r"TTA.scales\[1\]"):
        TTA((1.0, 0.0))
    with pytest.raises(ValueError, match="empty"):
        TTA(())


# ------------------------------------------------------------------------------------------ protocols
def test_protocol_table_resolves_the_papers_numbers():
    rein = resolve_protocol("rein", "cityscapes")
    assert (rein.test_scale, rein.mode, rein.window, rein.stride, rein.tta.enabled, rein.half) == \
        ((1024, 512), "slide", (512, 512), (341, 341), False, False)
    assert resolve_protocol("rein", "mapillary").half and resolve_protocol("rein", "acdc").test_scale == (960, 540)
    assert resolve_protocol("rein", "bdd100k").test_scale == (1280, 720)
    soma = resolve_protocol("soma", "cityscapes")
    assert soma.test_scale == (2048, 1024) and not soma.tta.enabled and resolve_protocol("soma", "mapillary").half
    tta = resolve_protocol("soma-tta", "cityscapes")
    assert tta.test_scale is None and tta.tta.scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) and tta.tta.flip
    assert not resolve_protocol("tqdm", "mapillary").half and resolve_protocol("tqdm", "mapillary").test_scale == \
        (2048, 1024)
    assert resolve_protocol("rein-1024", "cityscapes").window == (1024, 1024)
    assert resolve_protocol("whole", "cityscapes").mode == "whole"
    assert resolve_protocol("rein", "foggy_driving").test_scale == (1024, 512)  # default row
    assert "rein: slide 512/341, test scale 1024x512" in rein.describe()
    for p in PROTOCOLS.values():
        assert p.description and (p.name == "whole" or p.sources), p.name
    assert protocol_table_markdown().count("\n| `") == len(PROTOCOLS)
    assert protocol_table_markdown() in (ROOT / "docs" / "evaluation.md").read_text()  # the docs show this table
    with pytest.raises(ValueError, match="eval_protocol='reins'.*rein"):
        get_protocol("reins")
    # one string per table: the scale of each domain when they differ
    both = describe_settings({"cityscapes/val": rein, "mapillary/val": resolve_protocol("rein", "mapillary")})
    assert both == ("rein: slide 512/341, test scale cityscapes/val 1024x512, mapillary/val 1024x512, "
                    "half-size mapillary/val, no TTA")
    assert describe_settings({"a": rein, "b": rein}) == rein.describe()
    assert describe_settings(resolve_domains("rein", {"cityscapes/val": "cityscapes", "mapillary/val": "mapillary"})) \
        == both
    with pytest.raises(ValueError, match="one mode / window / stride / TTA"):
        describe_settings({"a": rein, "b": soma})


def test_protocol_transform_half_size_mapillary_and_test_scale():
    img = np.random.default_rng(0).integers(0, 256, (40, 64, 3), np.uint8)
    lab = np.tile(np.arange(64, dtype=np.uint8) % 19, (40, 1))
    with pytest.warns(UserWarning, match="halved twice"):  # far under Mapillary's 1920x1080
        out = ProtocolTransform(resolve_protocol("rein", "mapillary"))(img, lab)
    assert tuple(out["labels"].shape) == (20, 32)  # the metric is computed on the half-size label
    # PIL nearest on the half copy, as Rein's mapillary_resize.py
    assert out["labels"].numpy().tolist() == np.asarray(Image.fromarray(lab).resize((32, 20), Image.NEAREST)).tolist()
    assert tuple(out["pixel_values"].shape) == (3, 512, 819)  # the 32x20 copy resized to fit 1024x512
    city = ProtocolTransform(resolve_protocol("soma", "cityscapes"))(img, lab)
    assert tuple(city["labels"].shape) == (40, 64) and tuple(city["pixel_values"].shape) == (3, 1024, 1638)
    loaded = ProtocolTransform(resolve_protocol("soma-tta", "cityscapes"))(img, lab)
    assert tuple(loaded["pixel_values"].shape) == (3, 40, 64)  # TTA scales apply to the image as loaded


# --------------------------------------------------------------------------------- model-level checks
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from peft_fishertune.models import build_segmentation_model, tiny_backbone_config

    torch.manual_seed(0)
    cfg = tiny_backbone_config("dinov2", hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                               intermediate_size=64, patch_size=8, image_size=64)
    model = build_segmentation_model("dinov2", backbone_config=cfg, decoder="linear", pyramid_channels=16).eval()
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(str(path))
    return model, path


def _script(name: str):
    return load_script(f"scripts/{name}.py", f"{name}_script_h5")


def test_pictures_png_and_tensorboard(tiny_model, synth, tmp_path):
    from peft_fishertune.data import load_dgss_dataset
    from peft_fishertune.inference.pictures import log_pictures, write_domain_pictures
    from peft_fishertune.inference.protocols import EvalDataset, custom_setting

    model, _ = tiny_model
    ds = EvalDataset(load_dgss_dataset("cityscapes", str(synth / "fog"), split="val"),
                     ProtocolTransform(custom_setting((128, 64))))
    paths = write_domain_pictures(model, {"cityscapes/val": ds, "cityscapes_val": ds}, str(tmp_path / "pics"),
                                  num_images=2, window=(64, 64), stride=(48, 48), tile_width=160, protocol="custom")
    assert [Path(p).name for p in paths.values()] == ["cityscapes_val.png", "cityscapes_val-2.png"]  # no overwrite
    im = Image.open(paths["cityscapes/val"])
    assert im.mode == "RGB" and im.size[0] == 6 + 4 * (160 + 6)  # four 160-px columns
    arr = np.asarray(im)
    # two rows of 80-px tiles (128x64 labels at 160 px wide) + title, headers, captions and the legend
    assert 2 * 80 < arr.shape[0] < 2 * 80 + 320
    from peft_fishertune.data import PALETTE

    colours = {tuple(c) for c in arr.reshape(-1, 3)[::7]}
    assert tuple(PALETTE[0]) in colours  # road, in the ground truth and the legend
    assert (230, 30, 30) in colours or (110, 110, 110) in colours  # error map
    pytest.importorskip("tensorboard")
    assert log_pictures(str(tmp_path / "tb"), {"cityscapes/val": arr}, step=3) == 1
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    # a writer the caller keeps open (the trainer's): every picture is on disk without closing it
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "open"))
    assert log_pictures(writer, {"a": arr, "b": arr}, step=1) == 2
    (events,) = (tmp_path / "open").glob("events.out.tfevents.*")
    tags = [v.tag for e in EventFileLoader(str(events)).Load() for v in e.summary.value]
    assert tags == ["pictures/a", "pictures/b"]
    writer.close()


def test_evaluate_script_protocol_names_percent_json_outputs(tiny_model, synth, tmp_path, capsys):
    _, path = tiny_model
    evaluate = _script("evaluate").main
    out = tmp_path / "eval"
    args = ["--model", str(path), "--dataset", f"cityscapes:{synth / 'fog'}:val",
            "--dataset", f"cityscapes:{synth / 'clean'}:val", "--window", "64", "--stride", "48",
            "--test-scale", "128", "64", "--json", str(tmp_path / "e.json"), "--output-dir", str(out),
            "--pictures", str(out / "pictures"), "--num-pictures", "1"]
    assert evaluate(args) == 0
    text = capsys.readouterr().out
    assert "custom: slide 64/48, test scale 128x64, no TTA" in text and "| class (IoU %) |" in text
    rows = json.loads((tmp_path / "e.json").read_text())
    assert list(rows) == ["cityscapes@fog/val", "cityscapes@clean/val"]  # dataset and split, not name:/abs/path
    for r in rows.values():
        assert 0 <= r["mIoU"] <= 100 and 0 <= r["aAcc"] <= 100
        finite = [v for v in r["per_class_iou"].values() if v is not None]
        # percent: the per-class values average to the mIoU (a fraction list would average to mIoU / 100)
        assert sum(finite) / len(finite) == pytest.approx(r["mIoU"])
    assert {p.name for p in out.iterdir()} >= {"results.md", "results.csv", "results.json", "pictures"}
    assert len(list((out / "pictures").glob("*.png"))) == 2
    # a preset and an explicit setting together are refused (which one would the table name?)
    assert evaluate(["--model", str(path), "--dataset", f"cityscapes:{synth / 'fog'}:val", "--protocol", "rein",
                     "--window", "64"]) == 2
    assert "drop --window" in capsys.readouterr().err


def test_evaluate_script_clean_errors(tiny_model, synth, capsys):
    _, path = tiny_model
    evaluate = _script("evaluate").main
    assert evaluate(["--model", str(path), "--dataset", f"cityscapes:{synth / 'fog'}:val", "--num-labels", "7",
                     "--window", "64", "--stride", "48", "--test-scale", "128", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--num-labels=7" in err and "19 classes" in err
    assert evaluate(["--model", str(path), "--dataset", f"cityscapes:{synth / 'nope'}:val"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:")
    assert evaluate(["--model", str(path), "--dataset", f"cityscapes:{synth / 'fog'}:val", "--window", "32",
                     "--stride", "48"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:")
    # a misspelt dataset, as a user runs it: exit 2, one line, no traceback, before any model is loaded
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", "unused",
                           "--dataset", "cityscape:/data/cityscapes:val"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "unknown dataset 'cityscape'" in proc.stderr


def test_evaluate_script_acdc_per_condition_and_all_four(tiny_model, tmp_path, capsys):
    import fixtures_data as fx

    _, path = tiny_model
    fx.make_acdc(tmp_path / "acdc", per=2)
    args = ["--model", str(path), "--window", "64", "--stride", "48", "--test-scale", "128", "64",
            "--json", str(tmp_path / "e.json")]
    for cond in ("fog", "night", "rain", "snow"):
        args += ["--dataset", f"acdc:{tmp_path / 'acdc'}:val:{cond}"]
    assert _script("evaluate").main(args) == 0
    rows = json.loads((tmp_path / "e.json").read_text())
    assert list(rows) == ["acdc/fog/val", "acdc/night/val", "acdc/rain/val", "acdc/snow/val", "acdc-all"]
    assert rows["acdc-all"]["aggregate_of"] == list(rows)[:4] and rows["acdc-all"]["images"] == 8
    assert "| metric | acdc/fog/val | acdc/night/val | acdc/rain/val | acdc/snow/val | acdc-all | avg |" in \
        capsys.readouterr().out
