"""`FisherTuneConfig`: every option of the method, validated when built.

Defaults follow METHOD.md (the paper's setting); fields marked
"interpretation" are choices this project made where the paper is silent.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from .._checks import finite_number
from .checks import SCOPES, check_choice, check_fractions
from .schedule import SCHEDULES

PEFT_TYPE_NAME = "FISHERTUNE"

ESTIMATORS = ("variational", "empirical")
FISHER_MODES = ("per_sample", "batch")
PER_SAMPLE_METHODS = ("auto", "vmap", "loop")
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
    check_choice(name, value, allowed, "FisherTuneConfig.")


def _in_range(name: str, value, lo: float, hi: float, *, lo_open: bool = False) -> None:
    finite_number(f"FisherTuneConfig.{name}", value, low=lo, high=None if math.isinf(hi) else hi, low_open=lo_open)


@dataclass
class FisherTuneConfig(PeftConfig):
    """Configuration of a FisherTune adapter (element-wise sparse deltas on a model's own weights)."""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Names (suffix match) or a regex (full match) of the modules whose weights are candidates. "
            "Supported layer types: nn.Linear, nn.Conv2d, nn.LayerNorm, nn.Embedding. None (default): the "
            "architecture's transformer-block Linear layers (peft_fishertune.tuner.targets.TARGET_MODULES: ViT, "
            "DINOv2, DINOv3, CLIP, SigLIP, SAM, EVA02, BERT, Llama, Mistral, Qwen2, Mask2Former; our "
            "SegmentationModel's fisher_target_modules()), filled in when the adapter is created."
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
        default="bfloat16",
        metadata={"help": "dtype of the Fisher estimator's accumulators. bfloat16 (default) halves them; over a "
                  "2,000-step stage 2 its top-15 % selection overlaps float32's at Jaccard 0.94 (seed-to-seed "
                  "noise of the estimate: 0.85; docs/fisher.md). float32 for an exact sum."},
    )
    accumulator_device: Optional[str] = field(
        default=None,
        metadata={"help": "Where the estimator's accumulators live: None = beside the weights, 'cpu' = offloaded."},
    )
    estimator_checkpointing: bool = field(
        default=True,
        metadata={"help": "Variational estimate: run each transformer block of its passes under activation "
                  "checkpointing (keeps one block's activations instead of all; one more forward per pass)."},
    )
    per_sample_method: Literal["auto", "vmap", "loop"] = field(
        default="loop",
        metadata={"help": "fisher_mode='per_sample': 'loop' (default: one sample at a time, gradients streamed "
                  "layer by layer), 'vmap' (torch.func: the per-sample gradients of a whole chunk exist at once, "
                  "plus one copy of the sampled weights for the variational estimate), or 'auto' (vmap where the "
                  "model and batch allow it, else the loop). A whole DINOv2-B run (benchmarks/run_cost.py "
                  "--fisher-mode per_sample): loop +1,023 MiB over frozen, vmap +1,702 MiB, at about the same "
                  "step time."},
    )
    vmap_chunk_size: Optional[int] = field(
        default=None,
        metadata={"help": "per_sample_method='vmap': samples per vmap chunk (None = the whole micro-batch). "
                  "Its per-sample gradients take chunk x the targeted weights' size."},
    )

    on_base_mismatch: Literal["warn", "error"] = field(
        default="warn",
        metadata={"help": "Loading the adapter onto a base whose targeted weights differ from the saved fingerprint: "
                  "'warn' (default) or 'error'. $PEFT_FISHERTUNE_ON_BASE_MISMATCH overrides it. A decoder of another "
                  "kind or options is always an error (tuner/fingerprint.py)."},
    )
    base_fingerprint: Optional[dict] = field(
        default=None,
        metadata={"help": "Written by save_pretrained: the targeted weights' shapes and 64 sampled values each, and "
                  "the decoder's kind and options, checked on load (tuner/fingerprint.py). Leave it None."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = FisherTunePeftType.FISHERTUNE
        self._check_module_names()
        self._check_method_fields()
        _choice("on_base_mismatch", self.on_base_mismatch, ("warn", "error"))

    def _check_module_names(self) -> None:
        """target_modules / exclude_modules: a regex string or a list of names; modules_to_save: a list of names."""
        if self.target_modules is not None:  # None: the model's default, filled in when the adapter is created
            self.target_modules = _names_or_regex("target_modules", self.target_modules)
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("FisherTuneConfig.target_modules=[] is empty; name at least one module")
        if self.exclude_modules is not None:
            self.exclude_modules = _names_or_regex("exclude_modules", self.exclude_modules)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                raise ValueError(
                    f"FisherTuneConfig.modules_to_save={self.modules_to_save!r} is a string; expected a list of "
                    f"module names, e.g. [{self.modules_to_save!r}]"
                )
            self.modules_to_save = _names_or_regex("modules_to_save", self.modules_to_save, regex=False)
        if self.perturb_at is not None and (not isinstance(self.perturb_at, str) or not self.perturb_at):
            raise ValueError(
                f"FisherTuneConfig.perturb_at={self.perturb_at!r} is not allowed; expected None (the input pixels) "
                "or the name of a module (a non-empty string)"
            )

    def _check_method_fields(self) -> None:
        check_fractions(self.delta_min, self.delta_max, "FisherTuneConfig.")
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
    _choice("per_sample_method", config.per_sample_method, PER_SAMPLE_METHODS)
    if config.vmap_chunk_size is not None and (isinstance(config.vmap_chunk_size, bool)
                                               or not isinstance(config.vmap_chunk_size, int)
                                               or config.vmap_chunk_size < 1):
        raise ValueError(f"FisherTuneConfig.vmap_chunk_size={config.vmap_chunk_size!r} is not allowed; expected "
                         "None (the whole micro-batch) or a positive integer")
    if not isinstance(config.estimator_checkpointing, bool):
        raise ValueError(f"FisherTuneConfig.estimator_checkpointing={config.estimator_checkpointing!r} is not "
                         "allowed; expected True or False")
    if config.fisher_average == "ema" and (config.fisher_estimator != "variational"
                                           or config.variational_method != "natural"):
        raise ValueError(
            "FisherTuneConfig.fisher_average='ema' applies to the variational 'natural' estimate only "
            f"(fisher_estimator={config.fisher_estimator!r}, variational_method={config.variational_method!r}); "
            "use fisher_average='mean'"
        )


def _names_or_regex(name: str, value, *, regex: bool = True):
    """A regex string (compiled to check it) or a list of non-empty module-name strings."""
    if isinstance(value, str):
        if not regex:
            raise ValueError(f"FisherTuneConfig.{name}={value!r} is a string; expected a list of module names")
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"FisherTuneConfig.{name}={value!r} is not a valid regular expression: {exc}") from None
        return value
    if not isinstance(value, (list, tuple, set)):
        kind = "a regex string or a list of module names" if regex else "a list of module names"
        raise ValueError(f"FisherTuneConfig.{name}={value!r} ({type(value).__name__}) is not allowed; expected {kind}")
    bad = [v for v in value if not isinstance(v, str) or not v]
    if bad:
        raise ValueError(
            f"FisherTuneConfig.{name} holds {bad[0]!r} ({type(bad[0]).__name__}); every entry must be a module "
            "name (a non-empty string)"
        )
    return sorted(value) if isinstance(value, set) else list(value)
