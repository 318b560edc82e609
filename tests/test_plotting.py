"""plot_selection / plot_results draw the numbers they should: the bars and heatmap cells read back
from the figure are compared with counts computed here, independently of the plotting code."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from peft import get_peft_model

import peft_fishertune as pf
from peft_fishertune.models import build_segmentation_model, tiny_backbone_config

pytest.importorskip("matplotlib")
from peft_fishertune.plotting import block_index, module_type, plot_results, plot_selection  # noqa: E402

TYPES = {"patch_embeddings.projection": "patch-embed", "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
         "fc1": "fc1", "fc2": "fc2", "norm1": "norm", "norm2": "norm"}


def _peft_model():
    torch.manual_seed(0)
    model = build_segmentation_model(backbone="dinov2", backbone_config=tiny_backbone_config("dinov2"),
                                     decoder="linear", num_labels=5)
    cfg = pf.FisherTuneConfig(target_modules=model.fisher_target_modules(kinds=("linear", "patch_embed", "norm")),
                              modules_to_save=model.decoder_module_names(), delta_min=0.02, delta_max=0.2)
    return get_peft_model(model, cfg)


def _scores(peft_model):
    # later blocks score higher, so the selection is uneven across blocks
    g = torch.Generator().manual_seed(1)
    out = {}
    for name, w in pf.target_parameters(peft_model):
        m = re.search(r"layer\.(\d+)\.", name)
        out[name] = torch.rand(w.shape, generator=g) * (1.0 + (int(m.group(1)) if m else 0))
    return out


def _expected(per_tensor):
    """{block label: fraction}, {type: fraction} from {name: (selected, numel)} with our own name parsing."""
    rows, cols = {}, {}
    for name, (sel, numel) in per_tensor.items():
        m = re.search(r"encoder\.layer\.(\d+)\.", name)
        row = m.group(1) if m else "embed"
        typ = next(t for k, t in TYPES.items() if f".{k}.weight" in name)
        for d, key in ((rows, row), (cols, typ)):
            a = d.setdefault(key, [0, 0])
            a[0] += sel
            a[1] += numel
    return {k: s / n for k, (s, n) in rows.items()}, {k: s / n for k, (s, n) in cols.items()}


def _axis(fig, gid):
    (ax,) = [a for a in fig.axes if a.get_gid() == gid]
    return ax


def _drawn(fig):
    table = fig.selection_table
    rows = [t.get_text() for t in _axis(fig, "heatmap").get_yticklabels()]
    cols = [t.get_text() for t in _axis(fig, "per_module_type").get_xticklabels()]
    per_row = {r: p.get_width() for r, p in zip(rows, _axis(fig, "per_layer").patches)}
    per_col = {c: p.get_height() for c, p in zip(cols, _axis(fig, "per_module_type").patches)}
    heat = np.ma.filled(_axis(fig, "heatmap").images[0].get_array(), np.nan)
    assert rows == table.rows and cols == table.columns
    return rows, cols, per_row, per_col, heat


def test_name_parsing():
    assert block_index("backbone.model.encoder.layer.7.attention.q_proj.weight") == 7
    assert block_index("backbone.model.embeddings.patch_embeddings.projection.weight") is None
    assert module_type("encoder.layer.7.attention.q_proj.weight") == "q"
    assert module_type("vision_model.encoder.layers.3.self_attn.out_proj.weight") == "o"
    assert module_type("blocks.2.attn.qkv.weight") == "qkv"
    assert module_type("blocks.2.mlp.lin2.weight") == "fc2"
    assert module_type("encoder.layer.0.norm1.weight") == "norm"
    assert module_type("embeddings.patch_embeddings.projection.weight") == "patch-embed"


def test_plot_selection_of_an_adapter_draws_its_active_counts(tmp_path):
    model = _peft_model()
    pf.select_parameters(model, _scores(model))
    pf.set_active_fraction(model, 0.1)
    # independent counts: the active elements each FisherTune layer holds
    per_tensor = {}
    for m in model.modules():
        if isinstance(m, pf.FisherTuneLayer):
            per_tensor[f"{m.ft_key}.weight"] = (int(m.active_indices("default").numel()), m.get_base_layer().weight.numel())
    exp_rows, exp_cols = _expected(per_tensor)
    assert exp_rows["3"] > exp_rows["0"]  # the scores favour late blocks: the picture must show it

    path = tmp_path / "sel.png"
    fig = plot_selection(model, path=str(path))
    assert path.is_file() and path.stat().st_size > 1000
    rows, cols, per_row, per_col, heat = _drawn(fig)
    assert set(rows) == set(exp_rows) and set(cols) == set(exp_cols)
    for r in rows:
        assert per_row[r] == pytest.approx(exp_rows[r], abs=1e-12)
    for c in cols:
        assert per_col[c] == pytest.approx(exp_cols[c], abs=1e-12)
    # heatmap cell (block 3, q) = active share of that block's q_proj weight
    sel, numel = per_tensor["backbone.model.encoder.layer.3.attention.q_proj.weight"]
    assert heat[rows.index("3"), cols.index("q")] == pytest.approx(sel / numel)
    assert np.isnan(heat[rows.index("embed"), cols.index("q")])
    total = sum(s for s, _ in per_tensor.values()) / sum(n for _, n in per_tensor.values())
    assert total == pytest.approx(0.1, abs=1e-3)


def test_plot_selection_of_a_score_dict_draws_the_top_fraction():
    model = _peft_model()
    scores = _scores(model)
    fraction = 0.05
    # independent counts: threshold at the k-th largest score over all elements
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    k = round(fraction * flat.numel())
    threshold = torch.sort(flat, descending=True).values[k - 1]
    per_tensor = {n: (int((s >= threshold).sum()), s.numel()) for n, s in scores.items()}
    assert sum(c for c, _ in per_tensor.values()) == k  # continuous random scores: no ties
    exp_rows, exp_cols = _expected(per_tensor)

    fig = plot_selection(scores, fraction=fraction)
    rows, cols, per_row, per_col, _ = _drawn(fig)
    for r in rows:
        assert per_row[r] == pytest.approx(exp_rows[r], abs=1e-12)
    for c in cols:
        assert per_col[c] == pytest.approx(exp_cols[c], abs=1e-12)
    # and it is where select_parameters puts the candidates (same ranking)
    pf.select_parameters(model, scores, delta_min=fraction, delta_max=fraction)
    fig2 = plot_selection(model)
    assert _drawn(fig2)[2] == per_row


def test_plot_selection_errors():
    model = _peft_model()
    with pytest.raises(ValueError, match="fraction"):
        plot_selection(_scores(model), fraction=1.5)
    with pytest.raises(ValueError, match="no candidates"):
        plot_selection(model, fraction=0.05)
    with pytest.raises(ValueError, match="expected a PEFT model"):
        plot_selection([1, 2, 3])
    with pytest.raises(ValueError, match="FisherTune layers"):
        plot_selection(torch.nn.Linear(2, 2))


def test_plot_results_bars_are_mean_and_std_over_seeds(tmp_path):
    vals = {("full", "fog"): [40.0, 42.0, 44.0], ("full", "night"): [20.0, 21.0, 25.0],
            ("fishertune", "fog"): [45.0, 45.5, 46.5], ("fishertune", "night"): [22.0, 30.0, 26.0]}
    records = [{"method": m, "target": t, "seed": s, "miou": v}
               for (m, t), vs in vals.items() for s, v in enumerate(vs)]
    path = tmp_path / "results.png"
    fig = plot_results(records, str(path))
    assert path.is_file()
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    # bars in method order (full, fishertune), each over targets (fog, night)
    expected = [np.mean(vals[(m, t)]) for m in ("full", "fishertune") for t in ("fog", "night")]
    assert heights == pytest.approx(expected)
    for (m, t), vs in vals.items():
        assert fig.results_summary[m][t][1] == pytest.approx(np.std(vs, ddof=1))
    with pytest.raises(ValueError, match="miou"):
        plot_results([{"method": "a", "target": "b"}])
