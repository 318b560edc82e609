"""Fast mIoU: a bincount confusion matrix, accumulated over batches and processes.

Values are identical to the ``evaluate`` library's ``mean_iou`` (same keys, same
treatment of ignore_index, of out-of-range values, of classes absent from both
prediction and label -> NaN, ``nanmean``): the confusion matrix has one extra row and
column collecting label/prediction values outside ``[0, num_labels)``, which
``evaluate``'s ``np.histogram(range=(0, num_labels - 1))`` drops from the per-class
areas in exactly the same way.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .._checks import integer
from ..data.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES


def _as_array(x):
    """numpy view of CPU data; CUDA tensors stay tensors (computed on the device)."""
    if isinstance(x, torch.Tensor):
        return x.detach().numpy() if x.device.type == "cpu" else x.detach()
    if isinstance(x, (list, tuple)):
        if len({np.shape(v) for v in x}) != 1:
            raise ValueError("preds/labels given as lists must hold arrays of one shape; call update() per image")
        return np.stack([np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v) for v in x])
    return np.asarray(x)


_CHUNK = 1 << 18  # pixels per pass: int64 buffers of 2 MB stay in cache and are reused


def _label_lut(num_classes: int, ignore_index: int, trash: int) -> np.ndarray:
    """uint8 label -> bin offset: ``label * (C + 1)``; out-of-range -> row C; ignore -> ``trash``."""
    lut = np.minimum(np.arange(256, dtype=np.int64), num_classes) * (num_classes + 1)
    if 0 <= ignore_index < 256:
        lut[ignore_index] = trash
    return lut


def _bincount_numpy(p: np.ndarray, l: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    k = num_classes + 1
    nbins = k * k + k  # the last k bins collect ignored pixels (trash + pred column), dropped
    p = p.reshape(-1)
    l = l.reshape(-1)
    if p.dtype.kind == "i":  # one pass: negatives become huge in the unsigned view
        p_out_of_range = p.size > 0 and int(p.view(p.dtype.str.replace("i", "u")).max()) >= num_classes
    else:
        p_out_of_range = p.size > 0 and int(p.max()) >= num_classes
    lut = _label_lut(num_classes, ignore_index, k * k) if l.dtype == np.uint8 else None
    counts = np.zeros(nbins, dtype=np.int64)
    buf = np.empty(min(_CHUNK, max(p.size, 1)), dtype=np.int64)
    for s in range(0, p.size, _CHUNK):
        e = min(s + _CHUNK, p.size)
        b = buf[: e - s]
        if lut is not None:
            np.take(lut, l[s:e], out=b)
        else:
            lab = l[s:e].astype(np.int64)
            rows = np.where((lab < 0) | (lab >= num_classes), num_classes, lab) * k
            b[:] = np.where(lab == ignore_index, k * k, rows)
        pc = p[s:e]
        if p_out_of_range:
            pc = np.where((pc < 0) | (pc >= num_classes), num_classes, pc)
        np.add(b, pc, out=b, casting="unsafe")
        counts += np.bincount(b, minlength=nbins)
    return counts[: k * k].reshape(k, k)


def _bincount_torch(p: torch.Tensor, l: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    k = num_classes + 1
    lab = l.long()
    rows = torch.where((lab < 0) | (lab >= num_classes), num_classes, lab) * k
    rows = torch.where(lab == ignore_index, k * k, rows)
    pc = p.long()
    pc = torch.where((pc < 0) | (pc >= num_classes), num_classes, pc)
    return torch.bincount((rows + pc).reshape(-1), minlength=k * k + k)[: k * k].view(k, k)


def confusion_matrix(
    preds, labels, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX, per_sample: bool = False
) -> torch.Tensor:
    """(C+1, C+1) int64 counts ``[label, pred]``; row/column C collect out-of-range values.

    ``preds``/``labels``: integer arrays or tensors of the same shape (e.g. (B, H, W)); CPU data is
    counted with ``np.bincount``, CUDA tensors with ``torch.bincount`` on their device.
    With ``per_sample`` returns (B, C+1, C+1) (for ``gather_for_metrics``).
    """
    p, l = _as_array(preds), _as_array(labels)
    if tuple(p.shape) != tuple(l.shape):
        raise ValueError(f"preds shape {tuple(p.shape)} != labels shape {tuple(l.shape)}")
    is_float = (lambda a: a.is_floating_point()) if isinstance(p, torch.Tensor) else (lambda a: a.dtype.kind == "f")
    if is_float(p) or (isinstance(l, torch.Tensor) == isinstance(p, torch.Tensor) and is_float(l)):
        raise ValueError("preds and labels must be integer class maps (argmax the logits first)")
    if isinstance(p, torch.Tensor) != isinstance(l, torch.Tensor):  # one on CUDA, one not
        dev = p.device if isinstance(p, torch.Tensor) else l.device
        p, l = torch.as_tensor(p, device=dev), torch.as_tensor(l, device=dev)
    if per_sample:
        if p.ndim < 2:
            raise ValueError("per_sample=True needs a batch dimension")
        return torch.stack([confusion_matrix(p[i], l[i], num_classes, ignore_index) for i in range(p.shape[0])])
    if isinstance(p, torch.Tensor):
        return _bincount_torch(p, l, num_classes, ignore_index).cpu()
    return torch.from_numpy(_bincount_numpy(p, l, num_classes, ignore_index))


def metrics_from_confusion(conf, nan_to_num: float | None = None) -> dict:
    """evaluate's mean_iou outputs from a (C+1, C+1) confusion matrix."""
    conf = (conf.cpu().numpy() if isinstance(conf, torch.Tensor) else np.asarray(conf)).astype(np.float64)
    c = conf.shape[0] - 1
    intersect = np.diag(conf)[:c]
    area_label = conf[:c, :].sum(1)
    area_pred = conf[:, :c].sum(0)
    union = area_pred + area_label - intersect
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersect / union
        acc = intersect / area_label
        all_acc = intersect.sum() / area_label.sum()
        out = {
            "mean_iou": np.nanmean(iou) if not np.all(np.isnan(iou)) else np.nan,
            "mean_accuracy": np.nanmean(acc) if not np.all(np.isnan(acc)) else np.nan,
            "overall_accuracy": all_acc,
            "per_category_iou": iou,
            "per_category_accuracy": acc,
        }
    if nan_to_num is not None:
        out = {k: np.nan_to_num(v, nan=nan_to_num) for k, v in out.items()}
    return out


def mean_iou(
    predictions,
    references,
    num_labels: int,
    ignore_index: int,
    nan_to_num: float | None = None,
    label_map: dict[int, int] | None = None,
    reduce_labels: bool = False,
) -> dict:
    """Drop-in for ``evaluate.load("mean_iou").compute(...)`` (same arguments and outputs)."""
    conf = None
    for pred, ref in zip(predictions, references):
        ref = np.array(ref)
        if label_map:
            orig = ref.copy()
            for old, new in label_map.items():
                ref[orig == old] = new
        if reduce_labels:
            ref[ref == 0] = 255
            ref = ref - 1
            ref[ref == 254] = 255
        m = confusion_matrix(np.asarray(pred), ref, num_labels, ignore_index)
        conf = m if conf is None else conf + m
    if conf is None:
        raise ValueError("mean_iou got no predictions")
    return metrics_from_confusion(conf, nan_to_num)


class MeanIoU:
    """Streaming mIoU.

    >>> metric = MeanIoU()                      # 19 Cityscapes classes, ignore 255
    >>> metric.update(logits.argmax(1), labels)  # per batch, any device
    >>> metric.sync()                           # sum over torch.distributed ranks (if any)
    >>> metric.compute()["mean_iou"]

    Under ``accelerate`` with uneven datasets, pass ``accelerator=`` to ``update``: it gathers
    per-sample confusion matrices with ``gather_for_metrics`` (which drops the duplicated
    samples that even batches add), so call ``sync`` only when not doing that.
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        ignore_index: int = IGNORE_INDEX,
        class_names: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
    ):
        num_classes = integer("MeanIoU.num_classes", num_classes, low=1)
        ignore_index = integer("MeanIoU.ignore_index", ignore_index)
        if class_names is None:
            class_names = CLASS_NAMES if num_classes == NUM_CLASSES else [str(i) for i in range(num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names, num_classes={num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names)
        self.confusion = torch.zeros(num_classes + 1, num_classes + 1, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.confusion.zero_()

    def update(self, preds, labels, accelerator=None) -> None:
        if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
            per = confusion_matrix(preds, labels, self.num_classes, self.ignore_index, per_sample=True)
            per = accelerator.gather_for_metrics(per.to(accelerator.device))
            self.confusion += per.sum(0).to(self.confusion.device)
        else:
            self.confusion += confusion_matrix(preds, labels, self.num_classes, self.ignore_index).to(
                self.confusion.device
            )

    def sync(self) -> None:
        """All-reduce (sum) the confusion matrix over ``torch.distributed`` ranks; no-op without them."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.confusion, op=dist.ReduceOp.SUM)

    def compute(self, nan_to_num: float | None = None) -> dict:
        out = metrics_from_confusion(self.confusion, nan_to_num)
        out["per_class_iou"] = {n: float(v) for n, v in zip(self.class_names, out["per_category_iou"])}
        out["num_labeled_pixels"] = int(self.confusion[: self.num_classes].sum())
        return out

    def table(self) -> str:
        """A readable per-class IoU / Acc table, then mIoU, mAcc and aAcc (all percent)."""
        res = self.compute()
        lines = [f"{'class':<15}{'IoU':>8}{'Acc':>8}"]
        for n, i, a in zip(self.class_names, res["per_category_iou"], res["per_category_accuracy"]):
            lines.append(f"{n:<15}{100 * i:>8.2f}{100 * a:>8.2f}")
        lines.append(f"{'mIoU / mAcc':<15}{100 * res['mean_iou']:>8.2f}{100 * res['mean_accuracy']:>8.2f}")
        lines.append(f"{'aAcc':<15}{100 * res['overall_accuracy']:>8.2f}")
        return "\n".join(lines)
