"""Per-domain mIoU of a segmentation model (sliding window or whole image), across processes."""

from __future__ import annotations

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


def format_table(rows: dict[str, float], title: Optional[str] = None) -> str:
    """{domain: mIoU %} -> a markdown table with the average as the last column."""
    names = list(rows)
    avg = sum(rows.values()) / max(len(rows), 1)
    head = "| " + " | ".join(names + ["avg"]) + " |"
    sep = "|" + "---:|" * (len(names) + 1)
    vals = "| " + " | ".join(f"{rows[n]:.2f}" for n in names) + f" | {avg:.2f} |"
    return "\n".join(([title] if title else []) + [head, sep, vals])
