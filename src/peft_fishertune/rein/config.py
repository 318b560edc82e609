"""`ReinConfig`: the options of Rein ("Stronger, Fewer, & Superior", Wei et al., CVPR 2024), validated when built.

Defaults are the reference setting (w1oves/Rein, `LoRAReins` on DINOv2-L): 100 tokens per block factorised with
rank 16, softmax attention, learnable scale initialised to 1e-3, tokens linked to Mask2Former's 100 queries.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from .._checks import finite_number

PEFT_TYPE_NAME = "REIN"


class ReinPeftType(str, enum.Enum):
    """A one-member `str` enum, so `config.peft_type.value` works where PEFT calls it (see ECOSYSTEM_NOTES)."""

    REIN = PEFT_TYPE_NAME


def _positive_int(name: str, value, *, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        what = "a non-negative int" if allow_zero else "a positive int"
        raise ValueError(f"ReinConfig.{name}={value!r} is not allowed; expected {what}" + (" or None" if allow_none else ""))


@dataclass
class ReinConfig(PeftConfig):
    """Configuration of a Rein adapter: learnable tokens refining the features after every backbone block.

    After block i, on the patch tokens f (the prefix tokens, CLS and registers, pass unchanged):
        T_i = A_i @ B_i                                  (token_length, dim)    [rank=None: T_i is one tensor]
        attn = softmax(f T_iᵀ / sqrt(dim))
        Δ = attn[:, :, 1:] @ mlp_token2feat(T_i[1:])     (token 0 takes part in the softmax only)
        f <- f + s · mlp_delta_f(Δ + f)
    `mlp_token2feat`, `mlp_delta_f` (Linear(dim, dim) each) and the scalar s are shared by all blocks.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "None (default): every block of the model's backbone adapter (peft_fishertune.models), found "
            "from its structure. Otherwise the block modules to wrap (names by suffix, or a regex), in forward "
            "order, for models without a backbone adapter; then num_prefix_tokens must be given."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules to leave out even if they match target_modules."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained fully and saved with the adapter (the decoder)."}
    )
    token_length: int = field(default=100, metadata={"help": "Tokens per block (m); = Mask2Former's num_queries."})
    rank: Optional[int] = field(
        default=16,
        metadata={"help": "Rank r of the factorisation T = A[m, r] @ B[r, dim] (reference lora_dim); None = full tokens."},
    )
    scale_init: float = field(default=1e-3, metadata={"help": "Initial value of the shared learnable scale s."})
    use_softmax: bool = field(
        default=True, metadata={"help": "Softmax over tokens of f Tᵀ / sqrt(dim); False = raw dot products."}
    )
    link_token_to_query: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Project every block's tokens to the decoder width, merge max / mean / last over blocks into "
            "token_length queries that replace Mask2Former's learned query positions. Needs a Mask2Former decoder. "
            "None (default): True when the model is our segmentation model with a Mask2Former decoder, else False "
            "(a plain backbone); resolved when the adapter is created."
        },
    )
    query_dims: int = field(default=256, metadata={"help": "Width of the linked queries (Mask2Former hidden_dim)."})
    num_prefix_tokens: Optional[int] = field(
        default=None,
        metadata={
            "help": "Leading non-patch tokens (CLS, registers) passed through unchanged. None: from the backbone "
            "adapter. Required when target_modules is given."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the reference initialisation (s = scale_init, near-identity). False: s = 1 (tests: an "
            "output-changing adapter)."
        },
    )

    on_base_mismatch: str = field(
        default="warn",
        metadata={"help": "Loading the adapter onto a base whose wrapped blocks' weights differ from the saved "
                  "fingerprint: 'warn' (default) or 'error'; $PEFT_FISHERTUNE_ON_BASE_MISMATCH overrides it. A decoder "
                  "of another kind or options (e.g. replace_query_feat) is always an error (tuner/fingerprint.py)."},
    )
    base_fingerprint: Optional[dict] = field(
        default=None,
        metadata={"help": "Written by save_pretrained: the base's block weights (shapes, 64 sampled values each) and "
                  "the decoder's kind and options, checked on load (tuner/fingerprint.py). Leave it None."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = ReinPeftType.REIN
        _positive_int("token_length", self.token_length)
        if self.token_length < 2:
            raise ValueError(
                f"ReinConfig.token_length={self.token_length} is not allowed; expected >= 2 (token 0 only enters the softmax)"
            )
        _positive_int("rank", self.rank, allow_none=True)
        _positive_int("query_dims", self.query_dims)
        _positive_int("num_prefix_tokens", self.num_prefix_tokens, allow_none=True, allow_zero=True)
        finite_number("ReinConfig.scale_init", self.scale_init)
        for name in ("use_softmax", "link_token_to_query", "init_weights"):
            if name == "link_token_to_query" and self.link_token_to_query is None:
                continue
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ReinConfig.{name}={getattr(self, name)!r} is not allowed; expected true or false")
        if self.target_modules is not None and self.num_prefix_tokens is None:
            raise ValueError(
                "ReinConfig.num_prefix_tokens is required when target_modules is given (how many leading tokens, "
                "e.g. 1 for a CLS token, pass unchanged); leave target_modules=None to take both from the backbone adapter"
            )
        if isinstance(self.target_modules, list):
            self.target_modules = list(self.target_modules)
