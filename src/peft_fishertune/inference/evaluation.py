"""Per-domain mIoU of a segmentation model (sliding window or whole image), across processes."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..metrics import MeanIoU
from .sliding import inference


@torch.no_grad()
def evaluate_domains(model, domains: dict, *, num_labels: int = 19, mode: str = "slide", window=(512, 512),
                     stride=(341, 341), accelerator=None, progress: bool = True) -> dict[str, dict]:
    """{name: dataset of EvalTransform samples} -> {name: metrics dict (mean_iou, per_class_iou, ...)}.

    Each process takes every world_size-th image; confusion matrices are summed over processes.
    Logits are upsampled to the label's size (the label keeps its original resolution).
    """
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1

    def logits_fn(x):
        return model(pixel_values=x).logits

    results = {}
    for name, ds in domains.items():
        metric = MeanIoU(num_classes=num_labels)
        indices = range(rank, len(ds), world)
        for i in tqdm(indices, desc=f"eval {name}", disable=not progress or rank != 0, leave=False):
            sample = ds[i]
            x = sample["pixel_values"].unsqueeze(0).to(device)
            label = sample["labels"]
            kw = {"window": tuple(window), "stride": tuple(stride)} if mode == "slide" else {}
            logits = inference(logits_fn, x, num_labels, mode=mode, out_size=tuple(label.shape[-2:]), **kw)
            metric.update(logits.argmax(1).cpu(), label.unsqueeze(0))
        if world > 1:
            metric.confusion = metric.confusion.to(device)
            metric.sync()
            metric.confusion = metric.confusion.cpu()
        results[name] = metric.compute(nan_to_num=None)
    if was_training:
        model.train()
    return results


@dataclass(frozen=True)
class DomainResult:
    """One evaluated domain: mIoU in percent, per-class IoU in percent (NaN for classes absent from the domain)."""

    name: str
    miou: float
    per_class_iou: tuple[float, ...] = ()
    num_images: int = 0


@dataclass(frozen=True)
class EvaluationTable:
    """Per-domain mIoU of one evaluation, in the order the domains were given.

    `mean` is the average over the domains; no domain name is reserved (a domain may be called "avg").
    """

    domains: tuple[DomainResult, ...]
    step: Optional[int] = None
    protocol: str = ""  # e.g. "slide 512x512/341, test scale 1024x512"
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        names = [d.name for d in self.domains]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"evaluation domains must have distinct names; repeated: {dup}")

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.domains]

    @property
    def miou(self) -> dict[str, float]:
        """{domain: mIoU %}, in order."""
        return {d.name: d.miou for d in self.domains}

    @property
    def mean(self) -> float:
        return sum(d.miou for d in self.domains) / len(self.domains) if self.domains else float("nan")

    def __getitem__(self, name: str) -> DomainResult:
        for d in self.domains:
            if d.name == name:
                return d
        raise KeyError(f"no domain {name!r} in this table; have {self.names}")

    def __len__(self) -> int:
        return len(self.domains)

    def to_markdown(self, title: Optional[str] = None) -> str:
        return format_table(self.miou, title=title)

    def to_csv(self) -> str:
        """domain,mIoU,images rows, then the mean as the last row (labelled `mean of N domains`)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["domain", "mIoU", "images"])
        for d in self.domains:
            w.writerow([d.name, f"{d.miou:.4f}", d.num_images])
        w.writerow([f"mean of {len(self.domains)} domains", f"{self.mean:.4f}", sum(d.num_images for d in self.domains)])
        return buf.getvalue()

    def log_metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Flat metrics for loggers: `{prefix}_{domain}_mIoU` per domain and `{prefix}_mIoU` for the mean (a
        domain key always has a name between the underscores, so no domain collides with the mean)."""
        out = {f"{prefix}_{d.name}_mIoU": d.miou for d in self.domains}
        out[f"{prefix}_mIoU"] = self.mean
        return out


def evaluation_table(results: dict[str, dict], *, sizes: Optional[dict[str, int]] = None, step: Optional[int] = None,
                     protocol: str = "") -> EvaluationTable:
    """`evaluate_domains`' {name: metrics} -> an `EvaluationTable` (mIoU and per-class IoU in percent)."""
    rows = []
    for name, r in results.items():
        values = r.get("per_category_iou")
        per_class = tuple(100 * float(v) for v in (values if values is not None else ()))
        rows.append(DomainResult(name, 100 * float(r["mean_iou"]), per_class, int((sizes or {}).get(name, 0))))
    return EvaluationTable(tuple(rows), step=step, protocol=protocol)


def format_table(rows: dict[str, float], title: Optional[str] = None) -> str:
    """{domain: mIoU %} -> a markdown table with the average as the last column."""
    names = list(rows)
    avg = sum(rows.values()) / max(len(rows), 1)
    head = "| " + " | ".join(names + ["avg"]) + " |"
    sep = "|" + "---:|" * (len(names) + 1)
    vals = "| " + " | ".join(f"{rows[n]:.2f}" for n in names) + f" | {avg:.2f} |"
    return "\n".join(([title] if title else []) + [head, sep, vals])
