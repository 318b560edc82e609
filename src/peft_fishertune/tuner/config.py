"""`FisherTuneConfig`: every option of the method, validated when built.

Defaults follow METHOD.md (the paper's setting); fields marked
"interpretation" are choices this project made where the paper is silent.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

PEFT_TYPE_NAME = "FISHERTUNE"

SCHEDULES = ("linear", "exp", "cosine")
SCOPES = ("global", "per_tensor")
ESTIMATORS = ("variational", "empirical")
FISHER_MODES = ("per_sample", "batch")
VARIATIONAL_METHODS = ("natural", "reparam")
INIT_SELECTIONS = ("none", "random", "magnitude")
ENCODINGS = ("auto", "index", "bitmask", "gaps")


class FisherTunePeftType(str, enum.Enum):
    """A one-member enum so `config.peft_type.value` works where PEFT calls it.

    PEFT's own `PeftType` is closed; its mappings are keyed by the string, and a
    `str` enum member compares and hashes equal to the plain string.
    """

    FISHERTUNE = PEFT_TYPE_NAME


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"FisherTuneConfig.{name}={value!r} is not allowed; expected one of {list(allowed)}")


def _in_range(name: str, value, lo: float, hi: float, *, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise ValueError(f"FisherTuneConfig.{name}={value!r} is out of range; expected a number in {bracket}{lo}, {hi}]")


@dataclass
class FisherTuneConfig(PeftConfig):
    """Configuration of a FisherTune adapter (element-wise sparse deltas on a model's own weights)."""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Names (suffix match) or a regex (full match) of the modules whose weights are candidates. "
            "Supported layer types: nn.Linear, nn.Conv2d, nn.LayerNorm, nn.Embedding."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules to leave out even if they match `target_modules`."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules trained fully and saved with the adapter (e.g. the segmentation decoder)."},
    )
    delta_min: float = field(default=0.01, metadata={"help": "Fraction of targeted elements active at the start of stage 3."})
    delta_max: float = field(default=0.15, metadata={"help": "Fraction active at the end; the candidate list has this size."})
    schedule: Literal["linear", "exp", "cosine"] = field(
        default="exp", metadata={"help": "How the active fraction grows from delta_min to delta_max."}
    )
    scope: Literal["global", "per_tensor"] = field(
        default="global",
        metadata={"help": "Rank all targeted elements together ('global') or take the same fraction of each tensor."},
    )
    lambda_dr: float = field(default=0.5, metadata={"help": "Eq. 15: weight of the domain-related term ΔF."})
    gamma: float = field(default=0.01, metadata={"help": "Eq. 7: weight of the KL term of the variational estimate."})
    tau: float = field(default=0.01, metadata={"help": "Eq. 7: std of the Gaussian prior N(θ_pt, τ²I)."})
    fisher_estimator: Literal["variational", "empirical"] = field(
        default="variational", metadata={"help": "'variational' (the paper's Eq. 13) or 'empirical' (mean squared gradients)."}
    )
    fisher_mode: Literal["per_sample", "batch"] = field(
        default="per_sample",
        metadata={"help": "Empirical Fisher from per-sample squared gradients (true) or squared batch gradients (fast proxy)."},
    )
    variational_method: Literal["natural", "reparam"] = field(
        default="natural",
        metadata={
            "help": "How the variational precision is learned: natural-gradient precision updates (VOGN-style) or "
            "SGD on log σ through the reparameterization trick (interpretation; see README)."
        },
    )
    variational_lr: float = field(default=0.05, metadata={"help": "Learning rate of log σ ('reparam') or β ('natural')."})
    data_scale: Optional[float] = field(
        default=None,
        metadata={
            "help": "Multiplier of the data term of the variational objective (the likelihood summed over N samples). "
            "None = 1, the paper's literal Eq. 7 (interpretation; see README on the prior swamping the data)."
        },
    )
    perturb_at: Optional[str] = field(
        default=None,
        metadata={"help": "Where x' is made for DR-FIM: None = the input pixels; else the name of a module whose output is perturbed."},
    )
    init_selection: Literal["none", "random", "magnitude"] = field(
        default="none",
        metadata={"help": "Selection made when the adapter is created: none (select later from Fisher scores), random, magnitude."},
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: deltas start at zero (identity). False: small random deltas (for tests of merging)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for random selection, random deltas and perturbations."})
    encoding: Literal["auto", "index", "bitmask", "gaps"] = field(
        default="auto",
        metadata={"help": "How saved indices are stored per tensor: int32 indices, a packed bitmask, uint8 gap "
                  "codes, or the smallest ('auto'). All lossless."},
    )
    # Fisher-engine fields (owned by peft_fishertune.fisher; validated in _validate_fisher_fields)
    fisher_average: Literal["mean", "ema"] = field(
        default="mean",
        metadata={"help": "Variational 'natural' precision over stage 2: a true running mean of all steps ('mean') "
                  "or an EMA with rate variational_lr ('ema')."},
    )
    prior_pull: bool = field(
        default=True,
        metadata={"help": "Eq. 7's pull (gamma/data_scale)·tau^-2·||delta||^2/2 of the tuned weights toward the "
                  "pretrained ones, added to the stage-3 loss (peft_fishertune.fisher.prior_pull_loss)."},
    )
    accumulator_dtype: Literal["float32", "bfloat16"] = field(
        default="float32", metadata={"help": "dtype of the Fisher estimator's accumulators (bfloat16 halves them)."}
    )
    accumulator_device: Optional[str] = field(
        default=None,
        metadata={"help": "Where the estimator's accumulators live: None = beside the weights, 'cpu' = offloaded."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = FisherTunePeftType.FISHERTUNE
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple, set)):
            self.exclude_modules = list(self.exclude_modules)
        if self.target_modules is None:
            raise ValueError(
                "FisherTuneConfig.target_modules is required: give module names (e.g. ['query', 'key', 'value']) "
                "or a regex"
            )
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("FisherTuneConfig.target_modules=[] is empty; name at least one module")
        _in_range("delta_min", self.delta_min, 0.0, 1.0, lo_open=True)
        _in_range("delta_max", self.delta_max, 0.0, 1.0, lo_open=True)
        if self.delta_min > self.delta_max:
            raise ValueError(
                f"FisherTuneConfig.delta_min={self.delta_min} is larger than delta_max={self.delta_max}; "
                "expected delta_min <= delta_max"
            )
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("scope", self.scope, SCOPES)
        _in_range("lambda_dr", self.lambda_dr, 0.0, 1.0)
        _in_range("gamma", self.gamma, 0.0, math.inf, lo_open=True)
        _in_range("tau", self.tau, 0.0, math.inf, lo_open=True)
        _choice("fisher_estimator", self.fisher_estimator, ESTIMATORS)
        _choice("fisher_mode", self.fisher_mode, FISHER_MODES)
        _choice("variational_method", self.variational_method, VARIATIONAL_METHODS)
        _in_range("variational_lr", self.variational_lr, 0.0, math.inf, lo_open=True)
        if self.data_scale is not None:
            _in_range("data_scale", self.data_scale, 0.0, math.inf, lo_open=True)
        _choice("init_selection", self.init_selection, INIT_SELECTIONS)
        _choice("encoding", self.encoding, ENCODINGS)
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"FisherTuneConfig.init_weights={self.init_weights!r} is not allowed; expected True or False")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"FisherTuneConfig.seed={self.seed!r} is not allowed; expected an integer")
        _validate_fisher_fields(self)


def _validate_fisher_fields(config: "FisherTuneConfig") -> None:
    """The Fisher engine's fields (the last ones of the config)."""
    _choice("fisher_average", config.fisher_average, ("mean", "ema"))
    if not isinstance(config.prior_pull, bool):
        raise ValueError(f"FisherTuneConfig.prior_pull={config.prior_pull!r} is not allowed; expected True or False")
    _choice("accumulator_dtype", config.accumulator_dtype, ("float32", "bfloat16"))
    _choice("accumulator_device", config.accumulator_device, (None, "cpu"))
    if config.fisher_average == "ema" and (config.fisher_estimator != "variational"
                                           or config.variational_method != "natural"):
        raise ValueError(
            "FisherTuneConfig.fisher_average='ema' applies to the variational 'natural' estimate only "
            f"(fisher_estimator={config.fisher_estimator!r}, variational_method={config.variational_method!r}); "
            "use fisher_average='mean'"
        )
