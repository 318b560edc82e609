"""Where the selected elements sit, and benchmark bar plots (matplotlib: `pip install 'peft-fishertune[plot]'`).

    from peft_fishertune.plotting import plot_selection, selection_table
    fig = plot_selection(peft_model, path="selection.png")          # the adapter's active elements
    fig = plot_selection(result.scores, fraction=0.05)              # where the top 5 % of a score dict fall
    table = selection_table(peft_model)                             # the same numbers, no matplotlib

The picture follows the paper's sensitivity maps: a heatmap block index x module type
(fraction of that cell's elements that are selected), and bar charts of the fraction
selected per block and per module type. Block indices and module types are read from
the weight names (`encoder.layer.7.attention.q_proj.weight` -> block 7, type "q");
this labels a plot and decides nothing about training.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ._checks import finite_number

#: column order of the module-type axis (only the types present are drawn)
MODULE_TYPES = ("patch-embed", "q", "k", "v", "qkv", "o", "fc1", "fc2", "norm", "other")
#: row label of weights outside the transformer blocks (patch embedding, ...)
EMBED_ROW = "embed"
DEFAULT_SCORE_FRACTION = 0.15  # δ_max of the paper / FisherTuneConfig

_BLOCK_RE = re.compile(r"(?:^|\.)(?:layer|layers|blocks|block|h|resblocks)\.(\d+)(?:\.|$)")
_TYPE_RULES: tuple[tuple[str, re.Pattern], ...] = (
    ("patch-embed", re.compile(r"(patch_embed|patch_embedding|patch_embeddings)(\.|$)")),
    ("qkv", re.compile(r"(^|\.)(qkv|in_proj)$")),
    ("q", re.compile(r"(^|\.)(q_proj|query|q)$")),
    ("k", re.compile(r"(^|\.)(k_proj|key|k)$")),
    ("v", re.compile(r"(^|\.)(v_proj|value|v)$")),
    ("o", re.compile(r"(^|\.)(o_proj|out_proj|attention\.output\.dense|attn\.proj|attention\.proj)$")),
    ("fc1", re.compile(r"(^|\.)(fc1|fc1_g|fc1_x|lin1|up_proj|gate_proj|intermediate\.dense)$")),
    ("fc2", re.compile(r"(^|\.)(fc2|lin2|down_proj|output\.dense)$")),
    ("norm", re.compile(r"(^|\.)(norm\d*|layer_?norm\d*|ln_?\d*|norm_pre|norm_post)$")),
)


def block_index(name: str) -> Optional[int]:
    """Transformer block index in a weight name (`...encoder.layer.7.attention...` -> 7), None outside blocks."""
    m = _BLOCK_RE.search(name)
    return int(m.group(1)) if m else None


def module_type(name: str) -> str:
    """Module type of a weight name: one of `MODULE_TYPES` ("other" when no rule matches)."""
    base = re.sub(r"\.(weight|bias|base_layer\.weight)$", "", name)
    base = re.sub(r"\.base_layer$", "", base)
    for kind, pattern in _TYPE_RULES:
        if pattern.search(base):
            return kind
    return "other"


@dataclass
class SelectionTable:
    """Counts of selected elements per weight, and the aggregates the plot draws.

    per_tensor: {name: (selected, numel)}; rows: block labels ("embed", "0", "1", ...);
    columns: module types present; cells: {(row, col): (selected, numel)}.
    """

    per_tensor: dict[str, tuple[int, int]]
    description: str
    rows: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    cells: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self):
        cells: dict[tuple[str, str], list[int]] = {}
        blocks, has_embed, types = set(), False, set()
        for name, (sel, numel) in self.per_tensor.items():
            b = block_index(name)
            row = EMBED_ROW if b is None else str(b)
            if b is None:
                has_embed = True
            else:
                blocks.add(b)
            t = module_type(name)
            types.add(t)
            c = cells.setdefault((row, t), [0, 0])
            c[0] += int(sel)
            c[1] += int(numel)
        self.rows = ([EMBED_ROW] if has_embed else []) + [str(b) for b in sorted(blocks)]
        self.columns = [t for t in MODULE_TYPES if t in types]
        self.cells = {k: (v[0], v[1]) for k, v in cells.items()}

    @property
    def num_selected(self) -> int:
        return sum(s for s, _ in self.per_tensor.values())

    @property
    def num_elements(self) -> int:
        return sum(n for _, n in self.per_tensor.values())

    def _fraction(self, keep) -> float:
        sel = sum(s for k, (s, _) in self.cells.items() if keep(k))
        tot = sum(n for k, (_, n) in self.cells.items() if keep(k))
        return sel / tot if tot else float("nan")

    def per_row(self) -> dict[str, float]:
        """Fraction of each block's targeted elements that are selected."""
        return {r: self._fraction(lambda k, r=r: k[0] == r) for r in self.rows}

    def per_column(self) -> dict[str, float]:
        """Fraction of each module type's targeted elements that are selected."""
        return {c: self._fraction(lambda k, c=c: k[1] == c) for c in self.columns}

    def matrix(self) -> list[list[float]]:
        """rows x columns fractions (NaN where a block has no weight of that type)."""
        return [[(self.cells[(r, c)][0] / self.cells[(r, c)][1]) if (r, c) in self.cells and self.cells[(r, c)][1]
                 else float("nan") for c in self.columns] for r in self.rows]


def _from_model(model: nn.Module, adapter_name: Optional[str], fraction: Optional[float]) -> SelectionTable:
    from .tuner.selection import _config, _layers

    adapter_name, layers = _layers(model, adapter_name)
    per: dict[str, tuple[int, int]] = {}
    if fraction is None:
        for m in layers:
            per[f"{m.ft_key}.weight"] = (m.num_active(adapter_name), m.weight_numel)
        return SelectionTable(per, f"adapter {adapter_name!r}: active elements")
    config = _config(model, adapter_name)
    _check_fraction(fraction)
    if any(m.num_candidates(adapter_name) and bool((m.ft_rank[adapter_name] < 0).any()) for m in layers):
        raise ValueError(
            f"fraction={fraction!r} needs the ranked candidate list, but adapter {adapter_name!r} was loaded from a "
            "saved file (fixed selection); call plot_selection without fraction to show its active elements"
        )
    ncand = sum(m.num_candidates(adapter_name) for m in layers)
    total = sum(m.weight_numel for m in layers)
    if ncand == 0:
        raise ValueError(f"adapter {adapter_name!r} has no candidates yet: call select_parameters(model, scores) first")
    scope = config.scope if config is not None else "global"
    if round(fraction * total) > ncand + (len(layers) if scope == "per_tensor" else 0):
        raise ValueError(
            f"fraction={fraction!r} is more than the adapter keeps as candidates ({ncand / total:.4g} of its "
            f"{total} elements, delta_max); pass fraction <= delta_max"
        )
    for m in layers:
        ranks = m.ft_rank[adapter_name].long()
        if scope == "per_tensor":
            k = min(round(fraction * m.weight_numel), ranks.numel())
        else:
            k = int((ranks < round(fraction * total)).sum())
        per[f"{m.ft_key}.weight"] = (k, m.weight_numel)
    return SelectionTable(per, f"adapter {adapter_name!r}: top {fraction:.3g} of candidates ({scope})")


def _check_fraction(fraction) -> None:
    finite_number("fraction", fraction, low=0.0, low_open=True, high=1.0)


def _from_scores(scores: Mapping[str, torch.Tensor], fraction: float, scope: str) -> SelectionTable:
    _check_fraction(fraction)
    if scope not in ("global", "per_tensor"):
        raise ValueError(f"scope={scope!r}; expected 'global' or 'per_tensor'")
    if not scores:
        raise ValueError("scores is empty; expected {weight name: score tensor}")
    for name, s in scores.items():
        if not isinstance(s, torch.Tensor):
            raise ValueError(f"scores[{name!r}] is a {type(s).__name__}; expected a tensor")
        if s.is_floating_point() and not bool(torch.isfinite(s).all()):
            raise ValueError(f"scores[{name!r}] holds NaN or inf; scores must be finite")
    names = list(scores)
    numels = [scores[n].numel() for n in names]
    per: dict[str, tuple[int, int]] = {}
    if scope == "per_tensor":
        for n, numel in zip(names, numels):
            per[n] = (round(fraction * numel), numel)
    else:
        # the same ranking as select_parameters(scope="global"): topk over all elements together
        flat = torch.cat([scores[n].detach().reshape(-1).float().cpu() for n in names])
        k = round(fraction * flat.numel())
        idx = torch.topk(flat, k, sorted=False).indices
        del flat
        ends = torch.tensor(numels).cumsum(0)
        owner = torch.searchsorted(ends, idx, right=True)
        counts = torch.bincount(owner, minlength=len(names)).tolist()
        for n, numel, c in zip(names, numels, counts):
            per[n] = (int(c), numel)
    return SelectionTable(per, f"scores: top {fraction:.3g} ({scope})")


def selection_table(
    model_or_scores: Any,
    *,
    adapter_name: Optional[str] = None,
    fraction: Optional[float] = None,
    scope: str = "global",
) -> SelectionTable:
    """Counts behind `plot_selection` (no matplotlib needed).

    model_or_scores: a PEFT model with a FisherTune adapter (its active elements, or with `fraction` the
    top `fraction` of its ranked candidates), a score dict {weight name: tensor}, or an object with a
    `.scores` dict (a `DRFIMResult`); for scores, `fraction` (default 0.15 = δ_max) of the elements with
    the highest scores are counted, ranked as `select_parameters` ranks them (`scope`).
    """
    if isinstance(model_or_scores, nn.Module):
        if adapter_name is not None and not isinstance(adapter_name, str):
            raise ValueError(f"adapter_name={adapter_name!r}; expected a string or None")
        return _from_model(model_or_scores, adapter_name, fraction)
    scores = getattr(model_or_scores, "scores", model_or_scores)
    if not isinstance(scores, Mapping):
        raise ValueError(
            f"model_or_scores is a {type(model_or_scores).__name__}; expected a PEFT model with a FisherTune adapter, "
            "a {name: score tensor} dict or a DRFIMResult"
        )
    if adapter_name is not None:
        raise ValueError("adapter_name applies to a model, not to a score dict")
    return _from_scores(scores, DEFAULT_SCORE_FRACTION if fraction is None else fraction, scope)


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plotting needs matplotlib, which is not installed: pip install 'peft-fishertune[plot]' "
            "(or pip install matplotlib)"
        ) from exc
    return Figure


def plot_selection(
    model_or_scores: Any,
    *,
    adapter_name: Optional[str] = None,
    fraction: Optional[float] = None,
    path: Optional[str] = None,
    scope: str = "global",
    title: Optional[str] = None,
):
    """Heatmap (block x module type) of the fraction of elements selected, plus per-block and
    per-module-type bars. Arguments as in `selection_table`. Returns the matplotlib `Figure`
    (its `selection_table` attribute holds the numbers drawn); writes a PNG to `path` if given.
    """
    import numpy as np

    Figure = _matplotlib()
    table = selection_table(model_or_scores, adapter_name=adapter_name, fraction=fraction, scope=scope)
    rows, cols = table.rows, table.columns
    mat = np.array(table.matrix(), dtype=float)
    per_row, per_col = table.per_row(), table.per_column()

    fig = Figure(figsize=(2.2 + 0.75 * len(cols) + 2.6, 2.4 + 0.32 * len(rows)), layout="constrained")
    gs = fig.add_gridspec(2, 2, width_ratios=[max(len(cols), 1), 2.4], height_ratios=[max(len(rows), 1), 2.6])
    ax_heat = fig.add_subplot(gs[0, 0])
    ax_row = fig.add_subplot(gs[0, 1], sharey=ax_heat)
    ax_col = fig.add_subplot(gs[1, 0], sharex=ax_heat)
    ax_info = fig.add_subplot(gs[1, 1])
    ax_info.axis("off")

    im = ax_heat.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap="viridis", vmin=0.0,
                        vmax=max(float(np.nanmax(mat)) if np.isfinite(mat).any() else 1.0, 1e-12))
    ax_heat.set_gid("heatmap")
    ax_heat.set_xticks(range(len(cols)), cols)
    ax_heat.set_yticks(range(len(rows)), rows)
    ax_heat.set_ylabel("block")
    ax_heat.set_title("fraction selected (block x module)")
    ax_heat.tick_params(labelbottom=False)
    if mat.size <= 400:
        hi = np.nanmax(mat) if np.isfinite(mat).any() else 0.0
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                if np.isfinite(mat[i, j]):
                    ax_heat.text(j, i, f"{100 * mat[i, j]:.1f}", ha="center", va="center", fontsize=7,
                                 color="black" if mat[i, j] > 0.6 * hi else "white")
    fig.colorbar(im, ax=ax_row, fraction=0.08, label="fraction")

    ax_row.barh(range(len(rows)), [per_row[r] for r in rows], color="tab:blue")
    ax_row.set_gid("per_layer")
    ax_row.set_title("per block")
    ax_row.set_xlabel("fraction")
    ax_row.tick_params(labelleft=False)

    ax_col.bar(range(len(cols)), [per_col[c] for c in cols], color="tab:orange")
    ax_col.set_gid("per_module_type")
    ax_col.set_xticks(range(len(cols)), cols, rotation=30)
    ax_col.set_ylabel("fraction")
    ax_col.set_title("per module type")

    ax_info.text(0.0, 0.95, f"{table.description}\n{table.num_selected:,} of {table.num_elements:,} elements\n"
                 f"({100 * table.num_selected / max(table.num_elements, 1):.2f} %)\n{len(table.per_tensor)} weights",
                 va="top", fontsize=8, transform=ax_info.transAxes)
    fig.suptitle(title if title is not None else "Where the selected elements sit")
    fig.selection_table = table
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


# ----------------------------------------------------------------------------- benchmark results


def results_summary(table: Any) -> dict[str, dict[str, tuple[float, float, int]]]:
    """{method: {target: (mean, std, n)}} from benchmark results.

    table: a list of records (dicts) with keys "method", "target" and either "miou" (one record per seed;
    mean and sample std over seeds, std = 0 for one seed) or "mean" and "std" (and optionally "n");
    or a mapping {method: {target: [per-seed values]}}.
    """
    import numpy as np

    values: dict[str, dict[str, Any]] = {}
    if isinstance(table, Mapping):
        for method, per_target in table.items():
            if not isinstance(per_target, Mapping):
                raise ValueError(f"table[{method!r}] is a {type(per_target).__name__}; expected {{target: [values]}}")
            for target, vals in per_target.items():
                vals = [float(v) for v in (vals if isinstance(vals, Sequence) else [vals])]
                values.setdefault(str(method), {})[str(target)] = vals
    elif isinstance(table, Sequence) and not isinstance(table, (str, bytes)):
        for i, rec in enumerate(table):
            if not isinstance(rec, Mapping) or "method" not in rec or "target" not in rec:
                raise ValueError(f"table[{i}]={rec!r}; expected a dict with 'method', 'target' and 'miou' or 'mean'/'std'")
            cell = values.setdefault(str(rec["method"]), {})
            key = str(rec["target"])
            if "miou" in rec:
                if isinstance(cell.get(key), tuple):
                    raise ValueError(f"table: {rec['method']!r}/{key!r} mixes 'miou' records with a 'mean'/'std' record")
                cell.setdefault(key, []).append(float(rec["miou"]))
            elif "mean" in rec and "std" in rec:
                if key in cell:
                    raise ValueError(f"table: {rec['method']!r}/{key!r} appears twice")
                cell[key] = (float(rec["mean"]), float(rec["std"]), int(rec.get("n", 1)))
            else:
                raise ValueError(f"table[{i}] has neither 'miou' nor 'mean' and 'std': {rec!r}")
    else:
        raise ValueError(f"table is a {type(table).__name__}; expected a list of records or {{method: {{target: values}}}}")
    if not values:
        raise ValueError("table is empty")
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for method, per_target in values.items():
        for target, v in per_target.items():
            if isinstance(v, tuple):
                out.setdefault(method, {})[target] = v
            else:
                arr = np.asarray(v, dtype=float)
                if arr.size == 0:
                    raise ValueError(f"table: no values for {method!r}/{target!r}")
                std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
                out.setdefault(method, {})[target] = (float(arr.mean()), std, int(arr.size))
    return out


def plot_results(table: Any, path: Optional[str] = None, *, title: Optional[str] = None, ylabel: str = "mIoU (%)"):
    """Grouped bars: one group per target, one bar per method, height = mean, error bar = std over seeds.

    table: see `results_summary`. Targets and methods keep their first-seen order. Returns the Figure
    (its `results_summary` attribute holds the numbers drawn); writes a PNG to `path` if given.
    """
    import numpy as np

    Figure = _matplotlib()
    summary = results_summary(table)
    methods = list(summary)
    targets: list[str] = []
    for per_target in summary.values():
        for t in per_target:
            if t not in targets:
                targets.append(t)
    fig = Figure(figsize=(max(5.0, 1.1 * len(targets) * max(1.0, len(methods) / 4) + 2.5), 4.0), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(targets))
    for i, m in enumerate(methods):
        means = [summary[m].get(t, (np.nan, np.nan, 0))[0] for t in targets]
        stds = [summary[m].get(t, (np.nan, np.nan, 0))[1] for t in targets]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=m)
    ax.set_xticks(x, targets)
    ax.set_ylabel(ylabel)
    ax.set_title(title if title is not None else "mean ± std over seeds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncols=min(len(methods), 4), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.results_summary = summary
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
