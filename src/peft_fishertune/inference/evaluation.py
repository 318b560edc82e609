"""Per-domain evaluation of a segmentation model (sliding window or whole image, optional test-time augmentation),
across processes, and the table DGSS papers print: mIoU, aAcc, mAcc and per-class IoU / Acc, in percent.

    results = evaluate_domains(model, {"cityscapes": ds}, mode="slide", window=(512, 512), stride=(341, 341))
    table = evaluation_table(results, sizes={"cityscapes": len(ds)}, protocol="rein: slide 512/341, ...")
    print(table.to_markdown(title="final", per_class=True))
    table.write(output_dir)          # results.md / results.csv / results.json

Definitions (mmseg's `IoUMetric`, evaluate's `mean_iou`): from the confusion matrix summed over every image of a
domain, IoU_c = TP / (TP + FP + FN), Acc_c = TP / (TP + FN); mIoU and mAcc are their means over the classes present
in the labels or predictions (NaN classes skipped), aAcc = all correct labelled pixels / all labelled pixels.
The mean over domains (`EvaluationTable.mean`) is the mean of the per-domain mIoUs, as the papers average; an
aggregate domain (e.g. `acdc-all`, built from the summed confusion matrices of its members) and a model-selection
domain (role "selection": a held-out part of the source set, `selection/...`) are left out of it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..metrics import MeanIoU, metrics_from_confusion
from .sliding import inference
from .tta import TTA, tta_inference

MEAN_DEFINITION = "mean of the per-domain mIoUs (as the papers average)"
ROLES = ("target", "selection")  # a domain is a test (target) domain or the source-side model-selection set
ACDC_CONDITIONS = ("fog", "night", "rain", "snow")


@torch.no_grad()
def evaluate_domains(model, domains: dict, *, num_labels: int = 19, mode: str = "slide", window=(512, 512),
                     stride=(341, 341), accelerator=None, progress: bool = True,
                     tta: Optional[TTA] = None) -> dict[str, dict]:
    """{name: dataset of {"pixel_values", "labels"} samples} -> {name: metrics dict}.

    The metrics dict is `MeanIoU.compute()`'s (fractions: mean_iou, mean_accuracy, overall_accuracy,
    per_category_iou, per_category_accuracy, per_class_iou) plus `confusion`, the (C+1, C+1) int64 confusion
    matrix summed over images and processes (for aggregates such as ACDC's four conditions together).
    Each process takes every world_size-th image. Logits are upsampled to the label's size (the label keeps its
    resolution). With `tta` (scales / flip), softmax probabilities are averaged over the passes (see tta.py).
    """
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    augment = tta is not None and tta.enabled

    def logits_fn(x):
        return model(pixel_values=x).logits

    kw = {"window": tuple(window), "stride": tuple(stride)} if mode == "slide" else {}
    results = {}
    for name, ds in domains.items():
        metric = MeanIoU(num_classes=num_labels)
        indices = range(rank, len(ds), world)
        for i in tqdm(indices, desc=f"eval {name}", disable=not progress or rank != 0, leave=False):
            sample = ds[i]
            x = sample["pixel_values"].unsqueeze(0).to(device)
            label = sample["labels"]
            size = tuple(label.shape[-2:])
            if augment:
                scores = tta_inference(logits_fn, x, num_labels, tta, mode=mode, out_size=size, **kw)
            else:
                scores = inference(logits_fn, x, num_labels, mode=mode, out_size=size, **kw)
            metric.update(scores.argmax(1).cpu(), label.unsqueeze(0))
        if world > 1:
            metric.confusion = metric.confusion.to(device)
            metric.sync()
            metric.confusion = metric.confusion.cpu()
        results[name] = metric.compute(nan_to_num=None)
        results[name]["confusion"] = metric.confusion.clone()
    if was_training:
        model.train()
    return results


def _pct(values) -> tuple[float, ...]:
    return tuple(100 * float(v) for v in (values if values is not None else ()))


def _fmt(v: float, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _nanmean(values) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


@dataclass(frozen=True)
class DomainResult:
    """One evaluated domain, every value in percent.

    per_class_iou / per_class_acc: in class order (NaN where the class is absent from labels and predictions /
    from labels); aacc: all-pixel accuracy; macc: mean class accuracy; members: the domains an aggregate row was
    summed from (empty for an evaluated domain); confusion: the (C+1, C+1) confusion matrix, when known;
    role: "target" (a test domain) or "selection" (the source-side set that model selection ranks on: reported,
    never part of the target mean)."""

    name: str
    miou: float
    per_class_iou: tuple[float, ...] = ()
    num_images: int = 0
    aacc: float = float("nan")
    macc: float = float("nan")
    per_class_acc: tuple[float, ...] = ()
    class_names: tuple[str, ...] = ()
    members: tuple[str, ...] = ()
    confusion: Optional[np.ndarray] = field(default=None, compare=False, repr=False)
    role: str = "target"

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"DomainResult {self.name!r}: role={self.role!r}; expected one of {list(ROLES)}")

    @property
    def is_aggregate(self) -> bool:
        return bool(self.members)

    @property
    def in_mean(self) -> bool:
        """Whether the row enters the target mean: an evaluated target domain (not an aggregate, not selection)."""
        return not self.members and self.role == "target"

    @classmethod
    def from_confusion(cls, name: str, confusion, *, class_names: Sequence[str] = (), num_images: int = 0,
                       members: Sequence[str] = (), role: str = "target") -> "DomainResult":
        conf = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion, dtype=np.int64)
        m = metrics_from_confusion(conf)
        return cls(name, 100 * float(m["mean_iou"]), _pct(m["per_category_iou"]), int(num_images),
                   100 * float(m["overall_accuracy"]), 100 * float(m["mean_accuracy"]),
                   _pct(m["per_category_accuracy"]), tuple(class_names), tuple(members), conf, role)

    def to_dict(self) -> dict:
        names = self.class_names or tuple(str(i) for i in range(len(self.per_class_iou)))
        out = {"mIoU": self.miou, "aAcc": self.aacc, "mAcc": self.macc, "images": self.num_images,
               "per_class_iou": dict(zip(names, self.per_class_iou)),
               "per_class_acc": dict(zip(names, self.per_class_acc))}
        if self.members:
            out["aggregate_of"] = list(self.members)
        if self.role != "target":
            out["role"] = self.role
        return _json_safe(out)


@dataclass(frozen=True)
class EvaluationTable:
    """One evaluation: a `DomainResult` per domain, in the order the domains were given, and the protocol used.

    `mean` is the mean of the per-domain mIoUs over the evaluated target domains (aggregate rows such as `acdc-all`
    and model-selection rows are left out); no domain name is reserved (a domain may be called "avg")."""

    domains: tuple[DomainResult, ...]
    step: Optional[int] = None
    protocol: str = ""  # e.g. "rein: slide 512/341, test scale 1024x512, no TTA"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        names = [d.name for d in self.domains]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"evaluation domains must have distinct names; repeated: {dup}")

    # ----------------------------------------------------------------- access
    @property
    def names(self) -> list[str]:
        return [d.name for d in self.domains]

    @property
    def evaluated(self) -> list[DomainResult]:
        """The domains that enter the mean: evaluated target domains (not the aggregates, not model selection)."""
        return [d for d in self.domains if d.in_mean]

    @property
    def selection(self) -> list[DomainResult]:
        """The model-selection rows (role "selection")."""
        return [d for d in self.domains if d.role == "selection"]

    @property
    def miou(self) -> dict[str, float]:
        """{domain: mIoU %}, in order."""
        return {d.name: d.miou for d in self.domains}

    @property
    def mean(self) -> float:
        """Mean of the per-domain mIoUs (%), aggregates left out: the number the papers' `avg` column holds."""
        rows = self.evaluated
        return sum(d.miou for d in rows) / len(rows) if rows else float("nan")

    @property
    def mean_aacc(self) -> float:
        return _nanmean([d.aacc for d in self.evaluated])

    @property
    def mean_macc(self) -> float:
        return _nanmean([d.macc for d in self.evaluated])

    @property
    def class_names(self) -> tuple[str, ...]:
        for d in self.domains:
            if d.class_names:
                return d.class_names
        n = max((len(d.per_class_iou) for d in self.domains), default=0)
        return tuple(str(i) for i in range(n))

    @property
    def mean_definition(self) -> str:
        agg = [d.name for d in self.domains if d.is_aggregate]
        left_out = f"; {', '.join(agg)} (summed confusion matrices) left out" if agg else ""
        sel = [d.name for d in self.selection]
        if sel:
            left_out += f"; {', '.join(sel)} (model selection, source side) left out"
        return f"avg = {MEAN_DEFINITION} over {len(self.evaluated)} target domains{left_out}"

    def __getitem__(self, name: str) -> DomainResult:
        for d in self.domains:
            if d.name == name:
                return d
        raise KeyError(f"no domain {name!r} in this table; have {self.names}")

    def __len__(self) -> int:
        return len(self.domains)

    # ------------------------------------------------------------- aggregates
    def with_aggregate(self, name: str, members: Sequence[str]) -> "EvaluationTable":
        """A copy with one more row, `name`, computed from the SUM of the members' confusion matrices (not the
        mean of their mIoUs: pixels of every member count equally). The row stays out of `mean`."""
        members = list(members)
        if not members:
            raise ValueError(f"aggregate {name!r}: no member domains given")
        rows = [self[m] for m in members]
        missing = [r.name for r in rows if r.confusion is None]
        if missing:
            raise ValueError(f"aggregate {name!r}: no confusion matrix for {missing} (evaluate with "
                             "evaluate_domains, whose results carry `confusion`)")
        shapes = {r.confusion.shape for r in rows}
        if len(shapes) != 1:
            raise ValueError(f"aggregate {name!r}: members have confusion matrices of shapes {sorted(shapes)}")
        total = sum(r.confusion for r in rows)
        row = DomainResult.from_confusion(name, total, class_names=rows[0].class_names,
                                          num_images=sum(r.num_images for r in rows), members=members)
        return replace(self, domains=self.domains + (row,))

    def with_acdc_all(self, name: str = "acdc-all") -> "EvaluationTable":
        """Add `acdc-all` (all four ACDC conditions together, from summed confusion matrices) when the table holds
        one domain per condition (names `acdc/<condition>...`, as the trainer and evaluate.py name them);
        unchanged otherwise."""
        found = {}
        for d in self.evaluated:
            parts = d.name.split("/")
            if len(parts) >= 2 and parts[0] == "acdc" and parts[1] in ACDC_CONDITIONS:
                found.setdefault(parts[1], d.name)
        if len(found) < len(ACDC_CONDITIONS) or name in self.names:
            return self
        return self.with_aggregate(name, [found[c] for c in ACDC_CONDITIONS])

    # ---------------------------------------------------------------- formats
    def to_markdown(self, title: Optional[str] = None, per_class: bool = False) -> str:
        """A summary table (rows mIoU / aAcc / mAcc, a column per domain and `avg`), the protocol and the
        definition of `avg`; with `per_class`, the class x domain IoU table below it."""
        names = self.names
        lines = ([title] if title else [])
        lines += ["| metric | " + " | ".join(names + ["avg"]) + " |", "|---|" + "---:|" * (len(names) + 1)]
        for label, attr, mean in (("mIoU", "miou", self.mean), ("aAcc", "aacc", self.mean_aacc),
                                  ("mAcc", "macc", self.mean_macc)):
            lines.append(f"| {label} | " + " | ".join(_fmt(getattr(d, attr)) for d in self.domains)
                         + f" | {_fmt(mean)} |")
        notes = [self.mean_definition + "; values in %"]
        if self.protocol:
            notes.insert(0, f"protocol: {self.protocol}")
        lines += ["", "; ".join(notes) + "."]
        if per_class:
            lines += ["", self.class_table_markdown("IoU")]
        return "\n".join(lines)

    def class_table_markdown(self, metric: str = "IoU") -> str:
        """Class x domain table of per-class IoU (or Acc) in %, `avg` = mean over the evaluated domains; `-` where
        the class is absent from a domain's labels and predictions."""
        attr = {"IoU": "per_class_iou", "Acc": "per_class_acc"}[metric]
        names = self.names
        lines = [f"| class ({metric} %) | " + " | ".join(names + ["avg"]) + " |", "|---|" + "---:|" * (len(names) + 1)]
        for c, cls in enumerate(self.class_names):
            vals = [getattr(d, attr)[c] if c < len(getattr(d, attr)) else float("nan") for d in self.domains]
            mean = _nanmean([v for d, v in zip(self.domains, vals) if d.in_mean])
            lines.append(f"| {cls} | " + " | ".join(_fmt(v) for v in vals) + f" | {_fmt(mean)} |")
        return "\n".join(lines)

    def to_csv(self) -> str:
        """domain,mIoU,images rows, then the mean as the last row (labelled `mean of N domains`).
        (`to_class_csv` has aAcc, mAcc and the per-class values.)"""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["domain", "mIoU", "images"])
        for d in self.domains:
            w.writerow([d.name, f"{d.miou:.4f}", d.num_images])
        rows = self.evaluated
        w.writerow([f"mean of {len(rows)} domains", f"{self.mean:.4f}", sum(d.num_images for d in rows)])
        return buf.getvalue()

    def to_class_csv(self) -> str:
        """Long-and-wide CSV, all in %: `metric,class,<domain>...,avg` with rows IoU per class, Acc per class,
        then mIoU / aAcc / mAcc / images (class `all`). `avg` = mean over the evaluated domains."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["metric", "class"] + self.names + ["avg"])

        def row(metric, cls, vals, mean):
            w.writerow([metric, cls] + ["" if math.isnan(v) else f"{v:.4f}" for v in vals]
                       + ["" if math.isnan(mean) else f"{mean:.4f}"])

        for metric, attr in (("IoU", "per_class_iou"), ("Acc", "per_class_acc")):
            for c, cls in enumerate(self.class_names):
                vals = [getattr(d, attr)[c] if c < len(getattr(d, attr)) else float("nan") for d in self.domains]
                row(metric, cls, vals, _nanmean([v for d, v in zip(self.domains, vals) if d.in_mean]))
        row("mIoU", "all", [d.miou for d in self.domains], self.mean)
        row("aAcc", "all", [d.aacc for d in self.domains], self.mean_aacc)
        row("mAcc", "all", [d.macc for d in self.domains], self.mean_macc)
        w.writerow(["images", "all"] + [d.num_images for d in self.domains]
                   + [sum(d.num_images for d in self.evaluated)])
        return buf.getvalue()

    def to_dict(self) -> dict:
        """JSON-ready, every value in % (NaN -> null)."""
        out = {"protocol": self.protocol, "step": self.step, "units": "percent",
               "mean_mIoU": self.mean, "mean_aAcc": self.mean_aacc, "mean_mAcc": self.mean_macc,
               "mean_definition": self.mean_definition, "class_names": list(self.class_names),
               "domains": {d.name: d.to_dict() for d in self.domains}}
        if self.extra:
            out["extra"] = dict(self.extra)
        return _json_safe(out)

    def to_json(self, **extra) -> str:
        return json.dumps({**_json_safe(extra), **self.to_dict()} if extra else self.to_dict(), indent=2)

    def log_metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Flat metrics for loggers: `{prefix}_{domain}_mIoU` (and `_aAcc`, `_mAcc` when known) per domain,
        `{prefix}_mIoU` for the target mean (a domain key always has a name between the underscores, so no domain
        collides with the mean), and with model-selection rows `{prefix}_selection_mIoU` / `_aAcc` / `_mAcc` (their
        mean when several: what `metric_for_best_model: selection_mIoU` ranks on). NaN values are left out."""
        out = {}
        sel = self.selection
        if sel and "selection" in self.names:
            raise ValueError("a domain called 'selection' would share its log keys with the model-selection metrics "
                             f"({prefix}_selection_mIoU); rename it")
        for d in self.domains:
            out[f"{prefix}_{d.name}_mIoU"] = d.miou
            for key, v in (("aAcc", d.aacc), ("mAcc", d.macc)):
                if not math.isnan(v):
                    out[f"{prefix}_{d.name}_{key}"] = v
        out[f"{prefix}_mIoU"] = self.mean
        for key, v in (("aAcc", self.mean_aacc), ("mAcc", self.mean_macc)):
            if not math.isnan(v):
                out[f"{prefix}_{key}"] = v
        if sel:
            for key, attr in (("mIoU", "miou"), ("aAcc", "aacc"), ("mAcc", "macc")):
                v = _nanmean([getattr(d, attr) for d in sel])
                if not math.isnan(v):
                    out[f"{prefix}_selection_{key}"] = v
        return out

    def write(self, output_dir: str, *, title: Optional[str] = None, json_extra: Optional[dict] = None,
              prefix: str = "results") -> dict[str, str]:
        """Write `{prefix}.md` (summary + per-class IoU and Acc tables), `{prefix}.csv` (`to_class_csv`) and
        `{prefix}.json` (`json_extra`'s keys, then `evaluation`: `to_dict()`), each atomically.
        Returns {"md": path, "csv": path, "json": path}."""
        os.makedirs(output_dir, exist_ok=True)
        md = "\n\n".join([self.to_markdown(title=title), self.class_table_markdown("IoU"),
                          self.class_table_markdown("Acc")]) + "\n"
        payload = {**_json_safe(dict(json_extra or {})), "evaluation": self.to_dict()}
        paths = {k: os.path.join(output_dir, f"{prefix}.{k}") for k in ("md", "csv", "json")}
        _atomic_write(paths["md"], md)
        _atomic_write(paths["csv"], self.to_class_csv())
        _atomic_write(paths["json"], json.dumps(payload, indent=2) + "\n")
        return paths


def _json_safe(obj):
    """NaN / inf -> None, tuples -> lists, numpy scalars -> Python (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _atomic_write(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def evaluation_table(results: dict[str, dict], *, sizes: Optional[dict[str, int]] = None, step: Optional[int] = None,
                     protocol: str = "", acdc_all: bool = True, selection: Sequence[str] = ()) -> EvaluationTable:
    """`evaluate_domains`' {name: metrics (fractions)} -> an `EvaluationTable` (all in percent).

    With `acdc_all` (default), a table holding the four ACDC conditions gets an `acdc-all` row from their summed
    confusion matrices (outside the mean). `selection`: the names of model-selection domains (role "selection",
    outside the mean)."""
    unknown = sorted(set(selection) - set(results))
    if unknown:
        raise ValueError(f"selection domains {unknown} are not among the evaluated domains {list(results)}")
    rows = []
    for name, r in results.items():
        n = int((sizes or {}).get(name, 0))
        role = "selection" if name in selection else "target"
        names = tuple(r["per_class_iou"]) if isinstance(r.get("per_class_iou"), dict) else ()
        if r.get("confusion") is not None:
            rows.append(DomainResult.from_confusion(name, r["confusion"], class_names=names, num_images=n, role=role))
            continue
        rows.append(DomainResult(name, 100 * float(r["mean_iou"]), _pct(r.get("per_category_iou")), n,
                                 100 * float(r.get("overall_accuracy", float("nan"))),
                                 100 * float(r.get("mean_accuracy", float("nan"))),
                                 _pct(r.get("per_category_accuracy")), names, role=role))
    table = EvaluationTable(tuple(rows), step=step, protocol=protocol)
    return table.with_acdc_all() if acdc_all else table


def format_table(rows: dict[str, float], title: Optional[str] = None) -> str:
    """{domain: mIoU %} -> a markdown table with the average as the last column."""
    names = list(rows)
    avg = sum(rows.values()) / max(len(rows), 1)
    head = "| " + " | ".join(names + ["avg"]) + " |"
    sep = "|" + "---:|" * (len(names) + 1)
    vals = "| " + " | ".join(f"{rows[n]:.2f}" for n in names) + f" | {avg:.2f} |"
    return "\n".join(([title] if title else []) + [head, sep, vals])
