"""Rein's modules: the parameters shared by all blocks (`ReinShared`) and the per-block wrapper (`ReinLayer`).

Per adapter, each wrapped block holds its own tokens (``rein_tokens_a`` [m, r] and ``rein_tokens_b`` [r, dim], or
one [m, dim] tensor when ``rank=None``); the two MLPs, the scale s and the query-linking layers live once, in a
`ReinShared` module. As in PEFT's VB-LoRA (its vector bank), the tuner owns that module and every layer registers the
same object (``rein_shared``): parameters are deduplicated by `named_parameters()`, and the adapter file keeps one
copy (see `ReinModel._get_adapter_state_dict`).

Shapes: B batch, N patch tokens, m = token_length, C = dim, Q = query_dims, L = number of wrapped blocks.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


class ReinShared(nn.Module):
    """What all blocks share: mlp_token2feat, mlp_delta_f (Linear(C, C)), the scale s, and the query linking
    (transform: Linear(C, Q), merge: Linear(3Q, Q)) when `link_token_to_query`."""

    def __init__(self, dim: int, config) -> None:
        super().__init__()
        self.dim = dim
        self.use_softmax = config.use_softmax
        self.scale = nn.Parameter(torch.tensor(float(config.scale_init if config.init_weights else 1.0)))
        # nn.Linear's default init is kaiming_uniform(a=sqrt(5)), the reference's choice for both MLPs
        self.mlp_token2feat = nn.Linear(dim, dim)
        self.mlp_delta_f = nn.Linear(dim, dim)
        if config.link_token_to_query:
            q = config.query_dims
            self.transform = nn.Linear(dim, q)
            self.merge = nn.Linear(3 * q, q)
        else:
            self.transform = self.merge = None

    def link_queries(self, tokens: torch.Tensor) -> torch.Tensor:
        """All blocks' tokens (L, m, C) -> queries (m, Q): per query channel, [max over blocks, mean over blocks,
        last block] -> merge. The three statistics are interleaved per channel (q0max, q0mean, q0last, q1max, ...),
        the reference's layout, so its `merge` weights load unchanged."""
        if self.transform is None:
            raise RuntimeError("this Rein adapter was built with link_token_to_query=False: it has no query linking")
        t = self.transform(tokens)  # (L, m, Q)
        stats = torch.stack([t.amax(0), t.mean(0), t[-1]], dim=-1)  # (m, Q, 3)
        return self.merge(stats.flatten(-2))  # (m, Q)

    def refine(self, f: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens f (B, N, C), block tokens (m, C) -> f + s · mlp_delta_f(Δ + f)."""
        attn = torch.matmul(f, tokens.transpose(0, 1))  # (B, N, m)
        if self.use_softmax:
            attn = (attn * self.dim**-0.5).softmax(-1)
        delta = torch.matmul(attn[..., 1:], self.mlp_token2feat(tokens[1:]))  # (B, N, C)
        return f + self.scale * self.mlp_delta_f(delta + f)


class ReinLayer(nn.Module, BaseTunerLayer):
    """A backbone block followed by Rein's refinement of its patch tokens (for every active adapter, in order).

    The block's output is (B, P + N, C) with P = `num_prefix` leading tokens, or a (B, h, w, C) grid (SAM: no
    prefix). A tuple output is refined in its first element. Merging is not defined: the refinement depends on the
    features, it is no weight delta.
    """

    adapter_layer_names = ("rein_tokens_a", "rein_tokens_b", "rein_shared")
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, *, shared: nn.ModuleDict, dim: int,
                 layer_index: int, num_prefix: int, patch_size: Optional[int] = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.rein_tokens_a = nn.ParameterDict({})
        self.rein_tokens_b = nn.ParameterDict({})
        self.rein_shared = shared  # the tuner's container: one object, registered here and on the tuner
        self.dim = dim
        self.in_features = self.out_features = dim  # read by PEFT's generic tooling
        self.layer_index = layer_index
        self.num_prefix = num_prefix
        self.patch_size = patch_size
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        if adapter_name not in self.rein_shared:
            raise RuntimeError(f"Rein: the shared parameters of adapter {adapter_name!r} must exist before its layers")
        ref = self.rein_shared[adapter_name].mlp_delta_f.weight
        m, c = config.token_length, self.dim
        kw = dict(device=ref.device, dtype=ref.dtype)
        # the reference's uniform bound: sqrt(6 / (3 p² + fan)), fan = C (full tokens) or sqrt(C r) (factorised)
        p = self.patch_size or 16
        if config.rank is None:
            a, b = torch.empty(m, c, **kw), None
            bound = math.sqrt(6.0 / (3 * p * p + c))
        else:
            a, b = torch.empty(m, config.rank, **kw), torch.empty(config.rank, c, **kw)
            bound = math.sqrt(6.0 / (3 * p * p + math.sqrt(c * config.rank)))
        if ref.device != torch.device("meta"):
            for t in (a, b):
                if t is not None:
                    nn.init.uniform_(t, -bound, bound)
        self.rein_tokens_a[adapter_name] = nn.Parameter(a)
        if b is not None:
            self.rein_tokens_b[adapter_name] = nn.Parameter(b)
        self.set_adapter(self.active_adapters)

    def tokens(self, adapter_name: str) -> torch.Tensor:
        """This block's tokens T (m, C)."""
        a = self.rein_tokens_a[adapter_name]
        return a @ self.rein_tokens_b[adapter_name] if adapter_name in self.rein_tokens_b else a

    def _active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.rein_tokens_a]

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotImplementedError(
            "Rein cannot be merged into the base weights: its refinement f + s·mlp(Δ(f) + f) depends on the features, "
            "it is no weight delta. Keep the adapter (PeftModel), or drop it with unload()."
        )

    def unmerge(self) -> None:
        return None  # never merged

    def forward(self, *args: Any, **kwargs: Any):
        out = self.base_layer(*args, **kwargs)
        adapters = [] if self.disable_adapters else self._active()
        if not adapters:
            return out
        hidden = out[0] if isinstance(out, tuple) else out
        for name in adapters:
            hidden = self.refine(hidden, name)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    def refine(self, hidden: torch.Tensor, adapter_name: str) -> torch.Tensor:
        shared = self.rein_shared[adapter_name]
        if hidden.ndim == 4:  # (B, h, w, C) grid, no prefix tokens
            b, h, w, c = hidden.shape
            return shared.refine(hidden.reshape(b, h * w, c), self.tokens(adapter_name)).reshape(b, h, w, c)
        if hidden.ndim != 3 or hidden.shape[1] <= self.num_prefix:
            raise ValueError(
                f"Rein (block {self.layer_index}): expected the block's output (B, {self.num_prefix} prefix + N patch "
                f"tokens, C) or (B, h, w, C); got shape {tuple(hidden.shape)}"
            )
        prefix, f = hidden[:, : self.num_prefix], hidden[:, self.num_prefix :]
        return torch.cat([prefix, shared.refine(f, self.tokens(adapter_name))], dim=1)

    def __repr__(self) -> str:
        return "rein." + super().__repr__()
