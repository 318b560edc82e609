"""One table of training methods: FisherTune and the baselines, each a row.

A row says what wraps the model, whether a Fisher estimator runs in stage 2, when the backbone starts training,
where the selection comes from, and what the run saves. The trainer, the experiment runner and the config
validation read the row; nothing compares method names. Adding a baseline (e.g. Rein) is one `Method(...)` entry
in `METHODS` (plus its tuner).

    method = get_method("fim")
    model, peft_config = method.wrap(segmentor, cfg.method, cfg.model.candidate_kinds)
    method.backbone_parameters(model)      # what the backbone trains once it starts
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import nn

from .trainable import segmentor_of, wrapped_trainable

# ---------------------------------------------------------------------------------------------- wrapping


def _fishertune_wrap(overrides: dict[str, Any]) -> Callable:
    def wrap(seg, section, kinds=("linear",)):
        from peft import get_peft_model

        from ..tuner.config import FisherTuneConfig

        ft = {**dict(getattr(section, "fishertune", None) or {}), **overrides}
        config = FisherTuneConfig(target_modules=seg.fisher_target_modules(tuple(kinds)),
                                  modules_to_save=seg.decoder_module_names(), **ft)
        return get_peft_model(seg, config), config

    return wrap


def _lora_wrap(seg, section, kinds=("linear",)):
    from peft import LoraConfig, get_peft_model

    r = section.lora_r
    config = LoraConfig(r=r, lora_alpha=r, target_modules=seg.fisher_target_modules(tuple(kinds)),
                        modules_to_save=seg.decoder_module_names())
    return get_peft_model(seg, config), config


def _rein_wrap(seg, section, kinds=("linear",)):
    """Rein on every backbone block (found from the backbone's structure; `kinds` does not apply), the backbone
    frozen, query linking on with a Mask2Former decoder."""
    from ..rein import get_rein_segmentation_model

    model = get_rein_segmentation_model(seg, dict(getattr(section, "rein", None) or {}))
    return model, model.peft_config["default"]


def rein_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Rein's own parameters (every block's tokens, the shared MLPs, the scale, the query linking)."""
    from ..rein import rein_trainable_parameters

    return rein_trainable_parameters(model)


def _no_wrap(seg, section, kinds=("linear",)):
    return seg, None


def _baseline(name: str) -> Callable:
    """The wrap function `name` of training/baselines.py (imported when a model is wrapped)."""

    def wrap(seg, section, kinds=("linear",)):
        from . import baselines

        return getattr(baselines, name)(seg, section, kinds)

    wrap.__name__ = name
    return wrap


def peft_trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The backbone parameters PEFT left trainable when the model was wrapped (adapters, and biases when the
    config trains them)."""
    return wrapped_trainable(model)


# ---------------------------------------------------------------------------------- what trains


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the active adapters of every PEFT tuner layer in the backbone, in module order (what the
    layer declares in `adapter_layer_names`: `ft_values` for FisherTune, `lora_A`/`lora_B` for LoRA, ...)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    backbone = segmentor_of(model).backbone
    ids = set()
    for m in backbone.modules():
        if isinstance(m, BaseTunerLayer):
            for attr in m.adapter_layer_names:
                container = getattr(m, attr, None)
                for a in m.active_adapters:
                    if container is not None and a in container:
                        item = container[a]
                        ids.update(id(p) for p in ([item] if isinstance(item, nn.Parameter) else item.parameters()))
    return [p for p in backbone.parameters() if id(p) in ids]


def all_backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(segmentor_of(model).backbone.parameters())


def no_parameters(model: nn.Module) -> list[nn.Parameter]:
    return []


# ------------------------------------------------------------------------------------ selection


def random_selection_scores(model: nn.Module, seed: int) -> dict:
    """Uniform random scores per targeted weight, seeded per layer (the `random` row)."""
    from ..tuner.selection import random_scores

    return random_scores(model, seed)


def magnitude_selection_scores(model: nn.Module, seed: int) -> dict:
    """|w| of every targeted weight (the `magnitude` row; data-free, the seed does not enter)."""
    from ..tuner.selection import magnitude_scores

    return magnitude_scores(model)


# ---------------------------------------------------------------------------------------- table


def _refusing_stray_peft_config(name: str, wrap: Callable, takes: bool) -> Callable:
    """`wrap`, refusing a `method.peft_config` that this row would silently ignore."""
    if takes or getattr(wrap, "_checks_peft_config", False):
        return wrap

    def checked(seg, section, kinds=("linear",)):
        if getattr(section, "peft_config", None):
            from .config.errors import ConfigError

            raise ConfigError(f"method.peft_config is set but method.name={name!r} does not read it; remove it, or "
                              "use method.name: peft (any PEFT config) / dora / supertuning / shira (overrides)")
        return wrap(seg, section, kinds)

    checked._checks_peft_config = True
    return checked


@dataclass(frozen=True)
class Method:
    """One training method.

    name: `method.name` in configs. summary: one line for docs and logs.
    wrap: (segmentor, method section, candidate kinds) -> (model to train, PEFT config or None); the candidate
        kinds (`model.candidate_kinds`) name the backbone layers an adapter targets.
    estimator: a Fisher estimator runs in stage 2 (its scores make the selection).
    selection: None (no element selection), "fisher" (from the estimator), or the name of data-free scores
        ("random": layer-seeded, "magnitude": |w|) that `scores` computes.
    backbone_from_stage: the first stage in which the backbone trains (1 for Rein, 2 for LoRA / full fine-tuning, 3 after the
        selection, None never).
    backbone_parameters: model -> the backbone parameters this method trains once started.
    saves: "adapter" (PEFT `save_pretrained`: the adapter only) or "model" (the whole trained model).
    fishertune_overrides: FisherTuneConfig fields the method fixes (e.g. FIM-only: empirical, λ = 0).
    scores: (model, seed) -> {weight name: scores} for a data-free selection (the trainer's `_select` calls it
        instead of asking an estimator); None for "fisher" and for methods that do not select.
    """

    name: str
    summary: str
    wrap: Callable
    estimator: bool
    selection: Optional[str]
    backbone_from_stage: Optional[int]
    backbone_parameters: Callable[[nn.Module], list[nn.Parameter]]
    saves: str
    fishertune_overrides: dict = field(default_factory=dict)
    scores: Optional[Callable[[nn.Module, int], dict]] = None
    takes_peft_config: bool = False

    def __post_init__(self):
        object.__setattr__(self, "wrap", _refusing_stray_peft_config(self.name, self.wrap, self.takes_peft_config))
        if self.selection not in (None, "fisher", "random", "magnitude"):
            raise ValueError(f"Method {self.name!r}: selection={self.selection!r}; expected None, 'fisher', 'random', "
                             "'magnitude'")
        if (self.scores is not None) != (self.selection not in (None, "fisher")):
            raise ValueError(f"Method {self.name!r}: a data-free selection ({self.selection!r}) needs `scores`, and "
                             "only it takes them")
        if self.estimator != (self.selection == "fisher"):
            raise ValueError(f"Method {self.name!r}: an estimator runs exactly when the selection is 'fisher'")
        if self.saves not in ("adapter", "model"):
            raise ValueError(f"Method {self.name!r}: saves={self.saves!r}; expected 'adapter' or 'model'")

    @property
    def selects(self) -> bool:
        return self.selection is not None

    @property
    def step_kinds(self) -> tuple[str, str, str]:
        """What one training step of stage 1, 2 and 3 computes: "estimate" (stage 2 of a method with an estimator:
        the decoder step and the estimator's step), "backbone" (the method's backbone parameters train), "decoder"
        (the decoder alone). Stages of one kind run the same step, so `benchmarks/run_cost.py` times them as one
        (a backbone's first training steps, slower while the allocator settles, count once, not x T2)."""
        def kind(stage: int) -> str:
            if stage == 2 and self.estimator:
                return "estimate"
            if self.backbone_from_stage is not None and stage >= self.backbone_from_stage:
                return "backbone"
            return "decoder"

        return kind(1), kind(2), kind(3)

    def stage_requirements(self) -> dict[str, str]:
        """{training.stageN_steps: why it must be > 0} for this method."""
        req = {}
        if self.estimator:
            req["stage2_steps"] = "estimates Fisher scores in stage 2"
        if self.selects:
            req["stage3_steps"] = "needs sparse fine-tuning steps"
        return req


_SPARSE = dict(selection="fisher", estimator=True, backbone_from_stage=3, backbone_parameters=adapter_parameters,
               saves="adapter")

# the PEFT baselines train what PEFT made trainable, from stage 2 on like LoRA and full fine-tuning
_PEFT_ROW = dict(selection=None, estimator=False, backbone_from_stage=2, backbone_parameters=peft_trainable_parameters,
                 saves="adapter", takes_peft_config=True)

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("fishertune", "FisherTune: DR-FIM (variational by default) selection, growing sparse set",
           wrap=_fishertune_wrap({}), **_SPARSE),
    Method("drfim_empirical", "DR-FIM from the empirical Fisher (no variational step), growing sparse set",
           wrap=_fishertune_wrap({"fisher_estimator": "empirical"}),
           fishertune_overrides={"fisher_estimator": "empirical"}, **_SPARSE),
    Method("fim", "FIM-only: empirical Fisher of clean data, no domain term",
           wrap=_fishertune_wrap({"fisher_estimator": "empirical", "lambda_dr": 0.0}),
           fishertune_overrides={"fisher_estimator": "empirical", "lambda_dr": 0.0}, **_SPARSE),
    Method("random", "random element selection (layer-seeded), growing sparse set",
           wrap=_fishertune_wrap({}), selection="random", estimator=False, backbone_from_stage=3,
           backbone_parameters=adapter_parameters, saves="adapter", scores=random_selection_scores),
    Method("magnitude", "FisherTune's selection and schedule with |w| as the score (no estimator): the growing "
                        "sparse set up to δ_max, chosen by weight magnitude, to isolate the score from the machinery",
           wrap=_fishertune_wrap({}), selection="magnitude", estimator=False, backbone_from_stage=3,
           backbone_parameters=adapter_parameters, saves="adapter", scores=magnitude_selection_scores),
    Method("lora", "LoRA on the candidate layers, trained from stage 2 on",
           wrap=_lora_wrap, selection=None, estimator=False, backbone_from_stage=2,
           backbone_parameters=adapter_parameters, saves="adapter"),
    Method("rein", "Rein (CVPR 2024): learnable tokens refining every block's features, backbone frozen, trained "
                   "with the decoder from the first step",
           wrap=_rein_wrap, selection=None, estimator=False, backbone_from_stage=1,
           backbone_parameters=rein_parameters, saves="adapter"),
    Method("dora", "DoRA (ICML 2024): LoRA r = alpha = method.lora_r with use_dora (a learned magnitude per "
                   "output) on the candidate layers, trained from stage 2 on",
           wrap=_baseline("dora_wrap"), **_PEFT_ROW),
    Method("supertuning", "Super-Tuning (peft.SupertuningConfig): the largest-|w| int(δ_max·numel) entries of every "
                          "targeted weight (sparsity = 1 − δ_max, per layer, fixed), trained from stage 2 on",
           wrap=_baseline("supertuning_wrap"), **_PEFT_ROW),
    Method("shira", "SHiRA (peft.ShiraConfig): a random support of r·(m+n) entries per weight, r matched to δ_max "
                    "of the targeted elements, trained from stage 2 on",
           wrap=_baseline("shira_wrap"), **_PEFT_ROW),
    Method("soma", "SoMA (CVPR 2025, ysj9909/SoMA): LoRA r = 16 on q, k, v, o, fc1, fc2 of the last 2/3 of the "
                   "blocks (DINOv2-L: from 8), A/B from the minor singular components, base = residual, biases of "
                   "those layers train; from stage 2 on",
           wrap=_baseline("soma_wrap"), **_PEFT_ROW),
    Method("peft", "any PEFT config from method.peft_config ({peft_type: ..., ...}; targets default to the "
                   "candidate layers, the decoder is saved whole), trained from stage 2 on",
           wrap=_baseline("peft_wrap"), **_PEFT_ROW),
    Method("full", "full fine-tuning of the backbone from stage 2 on",
           wrap=_no_wrap, selection=None, estimator=False, backbone_from_stage=2,
           backbone_parameters=all_backbone_parameters, saves="model"),
    Method("freeze", "frozen backbone: the decoder trains alone",
           wrap=_no_wrap, selection=None, estimator=False, backbone_from_stage=None,
           backbone_parameters=no_parameters, saves="model"),
)}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method.name={name!r} is not allowed; expected one of {list(METHODS)}") from None


def method_names(*, sparse: Optional[bool] = None) -> tuple[str, ...]:
    """Names in table order; `sparse=True`: only methods that select elements (FisherTune adapters)."""
    return tuple(n for n, m in METHODS.items() if sparse is None or m.selects == sparse)
