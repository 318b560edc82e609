"""Per-sample Fisher with list-valued batch entries (Mask2Former's `mask_labels` / `class_labels`, issue 10)."""

import pytest
import torch
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

from peft_fishertune.fisher import EmpiricalFisherEstimator, FisherInputError


def _tiny_mask2former():
    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=swin, hidden_dim=32, mask_feature_size=32, feature_size=32,
                            num_queries=4, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                            dim_feedforward=32, encoder_feedforward_dim=32, num_labels=3, train_num_points=64,
                            common_stride=4)
    torch.manual_seed(0)
    return Mask2FormerForUniversalSegmentation(cfg).eval()  # eval: no dropout; the loss is still computed


def _batch(b=3):
    g = torch.Generator().manual_seed(1)
    masks, classes = [], []
    for i in range(b):  # images with different numbers of segments, so the lists cannot be stacked
        n = 1 + i % 3
        masks.append((torch.rand(n, 64, 64, generator=g) > 0.5).float())
        classes.append(torch.randint(0, 3, (n,), generator=g))
    return {"pixel_values": torch.randn(b, 3, 64, 64, generator=g), "mask_labels": masks, "class_labels": classes}


def _targets(model):
    return {n: p for n, p in model.named_parameters()
            if "swin.encoder.layers.0" in n and n.endswith(("q_proj.weight", "v_proj.weight", "query.weight", "value.weight"))}


def test_per_sample_fisher_splits_lists_like_a_reference_loop():
    model = _tiny_mask2former()
    params = _targets(model)
    assert params
    batch = _batch()
    est = EmpiricalFisherEstimator(model, params=params, mode="per_sample", perturb=False)
    torch.manual_seed(5)  # Mask2Former's loss samples points at random: same draws, same order as the reference
    est.step(batch)
    res = est.result()
    assert res.metadata["per_sample_method"] == "loop" and "mask_labels" in res.metadata["per_sample_fallback_reason"]
    torch.manual_seed(5)
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(3):
        sample = {"pixel_values": batch["pixel_values"][i : i + 1], "mask_labels": [batch["mask_labels"][i]],
                  "class_labels": [batch["class_labels"][i]]}
        loss = model(**sample).loss
        grads = torch.autograd.grad(loss, list(params.values()))
        for n, g in zip(params, grads):
            ref[n] += g.square() / 3
    for n in params:
        torch.testing.assert_close(res.fisher_x[n], ref[n], rtol=1e-4, atol=1e-12)
    # giving every one-image call all images' labels (the old behaviour) gives another number: the test can tell
    torch.manual_seed(5)
    old = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(3):
        loss = model(pixel_values=batch["pixel_values"][i : i + 1], mask_labels=batch["mask_labels"],
                     class_labels=batch["class_labels"]).loss
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            old[n] += g.square() / 3
    assert any(not torch.allclose(old[n], ref[n], rtol=1e-2) for n in params)
    for p in model.parameters():
        assert p.grad is None


def test_unsplittable_entries_are_refused_by_name():
    model = _tiny_mask2former()
    params = _targets(model)
    batch = _batch()
    bad = dict(batch, class_labels=batch["class_labels"][:2])
    with pytest.raises(FisherInputError, match=r"batch\['class_labels'\] is a list of length 2 but the batch has 3"):
        EmpiricalFisherEstimator(model, params=params, mode="per_sample", perturb=False).step(bad)
    nested = dict(batch, extra={"a": 1})
    with pytest.raises(FisherInputError, match=r"batch\['extra'\] is a nested mapping"):
        EmpiricalFisherEstimator(model, params=params, mode="per_sample", perturb=False).step(nested)
    # batch mode passes lists whole
    EmpiricalFisherEstimator(model, params=params, mode="batch", perturb=False).step(batch)
