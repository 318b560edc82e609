"""The evaluation side of a run's data: the test protocol of every domain, the target datasets, and the source-side
model-selection set.

    settings = eval_settings(cfg.data)            # {domain: ProtocolSetting}, targets first, selection last
    evals = eval_datasets(cfg.data, load, holdout) # {domain: dataset of {"pixel_values", "labels"}}

*Protocol.* With `data.eval_protocol: NAME` every domain gets that preset's setting for its dataset
(`inference.protocols.resolve_domains`: test scale per dataset, half-size Mapillary, mode, window, stride, TTA);
without it, the config's `test_scale` / `eval_mode` / `window` / `stride` (the `custom` protocol, no TTA).

*Model selection.* `data.selection_holdout: f` takes a fraction f of the source training images (drawn with
`data.selection_seed`, never trained on) as the set that `metric_for_best_model: selection_mIoU` ranks on;
`data.selection_set: {name, root, split}` names a dataset instead (e.g. the source's val split). It is evaluated
with the targets, under the same protocol, as the domain `selection/<source>-holdout` or `selection/<name>`, and is
kept out of the target mean (docs/training.md says why ranking on the targets is test-set selection).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..inference.protocols import EvalDataset, ProtocolSetting, ProtocolTransform, resolve_domains
from ..inference.tta import TTA

SELECTION_PREFIX = "selection/"


def selection_domain(d) -> Optional[str]:
    """The model-selection domain's name (`selection/<source>-holdout`, `selection/<name>`), or None."""
    if d.selection_holdout is not None:
        return f"{SELECTION_PREFIX}{d.train.display}-holdout"
    if d.selection_set is not None:
        return f"{SELECTION_PREFIX}{d.selection_set.display}"
    return None


def _datasets(d) -> dict[str, str]:
    """{domain: registered dataset name}: the targets in config order, then the selection domain."""
    names = {e.display: e.name for e in d.eval}
    sel = selection_domain(d)
    if sel is not None:
        names[sel] = d.train.name if d.selection_holdout is not None else d.selection_set.name
    return names


def eval_settings(d) -> dict[str, ProtocolSetting]:
    """{domain: ProtocolSetting} of every evaluated domain (targets, then the selection domain)."""
    names = _datasets(d)
    if d.eval_protocol is not None:
        return resolve_domains(d.eval_protocol, names)
    return {n: ProtocolSetting("custom", ds, tuple(d.test_scale), d.eval_mode, tuple(d.window), tuple(d.stride),
                               TTA(), False) for n, ds in names.items()}


def split_holdout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) of n images: round(fraction * n) held out, drawn by `seed`, each list
    sorted. Both parts must keep at least one image."""
    k = int(round(fraction * n))
    if not 1 <= k < n:
        raise ValueError(f"data.selection_holdout={fraction}: holding out {fraction} of the {n} source training "
                         f"images leaves {k} for model selection and {n - k} for training; both need at least one")
    perm = np.random.default_rng(int(seed)).permutation(n)
    return sorted(int(i) for i in perm[k:]), sorted(int(i) for i in perm[:k])


class Subset:
    """`base[indices[i]]` (the training images without the held-out ones, or the held-out ones)."""

    def __init__(self, base, indices):
        self.base, self.indices = base, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]


def hold_out(d, train_base):
    """(training base, held-out base or None) of the source set under `data.selection_holdout`."""
    if d.selection_holdout is None:
        return train_base, None
    keep, held = split_holdout(len(train_base), d.selection_holdout, d.selection_seed)
    return Subset(train_base, keep), Subset(train_base, held)


def eval_datasets(d, load: Callable, held_out=None) -> dict[str, EvalDataset]:
    """{domain: EvalDataset} through each domain's protocol transform. `load(entry)` reads a `DatasetEntry`;
    `held_out` is `hold_out`'s second part. `data.eval_max_images` caps the selection set as it caps the targets
    (an entry's own `max_images` already holds the cap, `load_config` applied it)."""
    settings = eval_settings(d)
    out = {}
    for e in d.eval:
        out[e.display] = EvalDataset(load(e), ProtocolTransform(settings[e.display]), e.max_images)
    sel = selection_domain(d)
    if sel is not None:
        if d.selection_holdout is not None:
            base, cap = held_out, d.eval_max_images
        else:
            base, cap = load(d.selection_set), d.selection_set.max_images
            if d.eval_max_images is not None:
                cap = d.eval_max_images if cap is None else min(cap, d.eval_max_images)
        out[sel] = EvalDataset(base, ProtocolTransform(settings[sel]), cap)
    return out
