"""torch.compile of a reloaded FisherTune adapter: no graph break, no recompilation, eager results.

Regression (issue 21, item 8): after `PeftModel.from_pretrained`, every layer read its threshold with
`int(self.ft_threshold[...])` inside forward (Tensor.item(): 27 graph breaks on a 2-layer ViT, then the recompile limit
and eager). The thresholds and active positions are now read eagerly when the adapter is loaded.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers as T
from peft import PeftModel, get_peft_model

import peft_fishertune as pf

dynamo = pytest.importorskip("torch._dynamo", reason="torch.compile (torch._dynamo) is unavailable")
if not hasattr(torch, "compile"):
    pytest.skip("torch.compile is unavailable", allow_module_level=True)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "layernorm_before", "projection"]


def _vit():
    torch.manual_seed(0)
    return T.ViTForImageClassification(T.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=7,
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _saved_adapter(tmp_path, grown: bool):
    model = get_peft_model(_vit(), pf.FisherTuneConfig(target_modules=TARGETS, init_selection="random",
                                                      init_weights=False, delta_min=0.05, delta_max=0.2))
    if grown:
        pf.set_active_fraction(model, 0.2)  # fully grown: saved as a fixed selection (ranks -1, threshold 0)
    else:
        pf.set_active_fraction(model, 0.1)  # partly grown: the ranked candidate list and the threshold are saved
    model.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("grown", [False, True], ids=["partly-grown", "fully-grown"])
def test_reloaded_adapter_compiles_without_graph_breaks(tmp_path, grown):
    loaded = PeftModel.from_pretrained(_vit(), _saved_adapter(tmp_path, grown))
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    dynamo.reset()
    explained = dynamo.explain(loaded)(pixel_values=x)
    assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]
    assert explained.graph_count == 1
    dynamo.reset()


def test_compiled_reloaded_adapter_matches_eager_and_does_not_recompile(tmp_path):
    """Forward and the values' gradients of the compiled model (AOTAutograd, so the custom backward is traced too)
    equal eager; calling it again compiles nothing new."""
    path = _saved_adapter(tmp_path, grown=False)
    loaded = PeftModel.from_pretrained(_vit(), path, is_trainable=True)
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    eager = loaded(pixel_values=x).logits
    eager.pow(2).sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in loaded.named_parameters() if ".ft_values." in n}
    assert eager_grads and any(g.abs().sum() > 0 for g in eager_grads.values())
    loaded.zero_grad()
    dynamo.reset()
    compiled = torch.compile(loaded, backend="aot_eager")
    out = compiled(pixel_values=x).logits
    out.pow(2).sum().backward()
    assert torch.allclose(out, eager, atol=1e-5)
    for n, g in eager_grads.items():
        assert torch.allclose(dict(loaded.named_parameters())[n].grad, g, atol=1e-5), n
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = compiled(pixel_values=x).logits
    assert torch.allclose(again, eager, atol=1e-5)
    dynamo.reset()


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="inductor on CPU needs a C compiler")
def test_inductor_compiled_reloaded_adapter_matches_eager(tmp_path):
    loaded = PeftModel.from_pretrained(_vit(), _saved_adapter(tmp_path, grown=True))
    loaded.eval()
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eager = loaded(pixel_values=x).logits
        dynamo.reset()
        out = torch.compile(loaded)(pixel_values=x).logits
    assert torch.allclose(out, eager, atol=1e-4)
    # the base weights are untouched by the compiled forward
    base = dict(_vit().named_parameters())
    checked = 0
    for m in loaded.modules():
        if hasattr(m, "ft_values") and "default" in m.ft_values:
            key = m.ft_key + ".weight"
            assert torch.equal(m.get_base_layer().weight, base[key]), key
            checked += 1
    assert checked == 2 * 7 + 1
    dynamo.reset()
