"""The shared argument checks (`peft_fishertune._checks`) and the places that use them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from peft_fishertune._checks import finite_number, integer


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -math.inf, True, "1e-3", None, [1.0]])
def test_finite_number_refuses_non_numbers(bad):
    with pytest.raises(ValueError, match=r"^lr=.*; expected a finite number$"):
        finite_number("lr", bad)


def test_finite_number_bounds_and_message():
    assert finite_number("lr", 0, low=0) == 0.0 and isinstance(finite_number("lr", 1, low=0), float)
    assert finite_number("x", np.float32(0.5), low=0, high=1) == 0.5
    with pytest.raises(ValueError, match=r"^x=-0\.1; expected a finite number >= 0$"):
        finite_number("x", -0.1, low=0)
    with pytest.raises(ValueError, match=r"^r=0; expected a finite number in \(0, 1\]$"):
        finite_number("r", 0, low=0, high=1, low_open=True)
    with pytest.raises(ValueError, match=r"in \(0, 1\)$"):
        finite_number("r", 1.0, low=0, high=1, low_open=True, high_open=True)
    with pytest.raises(ValueError, match=r"<= 2$"):
        finite_number("r", 3, high=2)


def test_integer():
    assert integer("steps", 3, low=1) == 3 and integer("steps", np.int64(3), low=1) == 3
    for bad in (0, 2.0, True, "3", None):
        with pytest.raises(ValueError, match=r"^steps=.*; expected an integer >= 1$"):
            integer("steps", bad, low=1)
    with pytest.raises(ValueError, match=r"in \[0, 4\]"):
        integer("i", 5, low=0, high=4)


def test_users_refuse_what_they_used_to_accept_silently():
    from peft_fishertune.inference import slide_inference
    from peft_fishertune.models import build_segmentation_model, tiny_backbone_config
    from peft_fishertune.standin.pretrain import PretrainConfig

    # True passed as a number (1.0) before; inf learning rates reached the optimizer
    with pytest.raises(ValueError, match="min_crop_scale=True"):
        PretrainConfig.quick(min_crop_scale=True)
    with pytest.raises(ValueError, match="mask_ratio=1.0"):
        PretrainConfig.quick(mask_ratio=1.0)
    model = build_segmentation_model("dinov2", backbone_config=tiny_backbone_config("dinov2"), decoder="linear",
                                     num_labels=3)
    with pytest.raises(ValueError, match="weight_decay=inf"):
        model.param_groups(weight_decay=float("inf"))
    with pytest.raises(ValueError, match="num_labels=2.0"):
        build_segmentation_model("dinov2", backbone_config=tiny_backbone_config("dinov2"), decoder="linear",
                                 num_labels=2.0)
    from peft_fishertune.metrics import MeanIoU

    with pytest.raises(ValueError, match=r"MeanIoU.num_classes=19.0"):  # a TypeError in range() before
        MeanIoU(num_classes=19.0)
    with pytest.raises(ValueError, match=r"MeanIoU.num_classes=0"):  # an empty 1x1 matrix before
        MeanIoU(num_classes=0)
    fn = lambda x: torch.zeros(x.shape[0], 2, *x.shape[-2:])  # noqa: E731
    with pytest.raises(ValueError, match="windows_per_call=0"):  # was silently taken as 1
        slide_inference(fn, torch.zeros(1, 3, 16, 16), 2, window=8, stride=8, windows_per_call=0)
    with pytest.raises(ValueError, match=r"window\[0\]=8.0"):
        slide_inference(fn, torch.zeros(1, 3, 16, 16), 2, window=8.0, stride=8)
    with pytest.raises(ValueError, match=r"stride\[1\]=0"):
        slide_inference(fn, torch.zeros(1, 3, 16, 16), 2, window=8, stride=(8, 0))
