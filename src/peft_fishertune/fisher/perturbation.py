"""Domain perturbation x -> x' for DR-FIM (METHOD.md, "Domain-related Fisher").

Feature-statistics perturbation (DSU/MixStyle-like): per sample and channel, the mean
μ and std σ of a feature map are shifted, μ' = μ + ε_μ·s_μ, σ' = σ + ε_σ·s_σ, where
s_μ, s_σ are the batch std (over samples) of the statistic and ε_μ, ε_σ ~ N(0, 1)
per channel; x' = σ'·(x − μ)/σ + μ'. The weight reported with a draw is
w = mean_c exp(−(|ε_μ,c| + |ε_σ,c|)).

Interpretations (see docs/fisher.md): one ε draw per micro-batch, shared by its
samples (the batch is shifted as one "domain"); σ' is clamped at `eps`; the batch std
uses the population form. A micro-batch of one sample has s = 0, so x' = x: it is refused (the DR term
would silently vanish); identical samples in a larger batch give x' = x legitimately.

Where: the input pixels (`perturb_at=None`, key `input_key` of the batch, channel dim 1
of (B, C, H, W)), or the output of a named module through a forward hook (tensor
(B, C, H, W) or tokens (B, N, C); a tuple output has its first element perturbed).
With `perturb_at=None` and no `input_key` in the batch (a text model's `input_ids`), the
module is the model's input embeddings (`model.get_input_embeddings()`): x' shifts the
statistics of the token embeddings, per embedding channel (padding positions included).
The log says once where the perturbation goes (`FeaturePerturbation.where`).
For a module, s_μ, s_σ come from a calibration forward of the whole micro-batch that
stops at the module, so per-sample passes (batch of 1) use the same statistics.

Draws are reproducible: ε depends only on (seed, global micro-batch index).
With `strength=0` (disabled) the batch is returned unchanged (the same object) and
no hook is installed: an exact identity.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .errors import FisherInputError, finite_float
from .seeds import derived_generator

logger = logging.getLogger("peft_fishertune.fisher")

_PERTURB_STREAM = 0x5E9  # separates these draws from other uses of the same seed


@dataclass
class PerturbationDraw:
    """ε_μ, ε_σ (per channel) of one micro-batch, and its weight w."""

    eps_mu: torch.Tensor
    eps_sigma: torch.Tensor

    @property
    def weight(self) -> float:
        return float(torch.exp(-(self.eps_mu.abs() + self.eps_sigma.abs())).mean())


def draw(num_channels: int, seed: int, index: int) -> PerturbationDraw:
    """The draw for global micro-batch `index` under `seed` (float32, CPU)."""
    g = derived_generator(_PERTURB_STREAM, seed, index)
    eps = torch.randn(2, num_channels, generator=g, dtype=torch.float32)
    return PerturbationDraw(eps[0], eps[1])


def _channel_layout(x: torch.Tensor) -> tuple[tuple[int, ...], int]:
    """(dims reduced for per-sample statistics, channel dim) for (B, C, H, W) / (B, N, C)."""
    if x.ndim == 4:
        return (2, 3), 1
    if x.ndim == 3:
        return (1,), 2
    raise FisherInputError(
        f"cannot perturb a feature of shape {tuple(x.shape)}; expected (B, C, H, W) or tokens (B, N, C)"
    )


def feature_stats(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and std, shapes (B, C)."""
    dims, _ = _channel_layout(x)
    xf = x.float()
    mu = xf.mean(dims)
    sigma = (xf.var(dims, correction=0) + eps).sqrt()
    return mu, sigma


def batch_spread(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """s_μ, s_σ: population std over the batch of the per-sample statistics, shapes (C,)."""
    mu, sigma = feature_stats(x, eps)
    return mu.std(0, correction=0), sigma.std(0, correction=0)


def perturb_features(
    x: torch.Tensor,
    eps_mu: torch.Tensor,
    eps_sigma: torch.Tensor,
    s_mu: Optional[torch.Tensor] = None,
    s_sigma: Optional[torch.Tensor] = None,
    *,
    strength: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """x' = σ'·(x − μ)/σ + μ' with μ' = μ + strength·ε_μ·s_μ, σ' = max(σ + strength·ε_σ·s_σ, eps).

    `s_mu`, `s_sigma` default to the batch spread of `x` itself.
    """
    if strength == 0:
        return x
    dims, cdim = _channel_layout(x)
    if s_mu is None or s_sigma is None:
        s_mu, s_sigma = batch_spread(x, eps)
    c = x.shape[cdim]
    if eps_mu.numel() != c or eps_sigma.numel() != c:
        raise FisherInputError(f"perturbation has {eps_mu.numel()} channels, the feature has {c} (dim {cdim})")
    mu, sigma = feature_stats(x, eps)  # (B, C)
    mu_p = mu + strength * eps_mu.to(mu) * s_mu.to(mu)
    sigma_p = (sigma + strength * eps_sigma.to(mu) * s_sigma.to(mu)).clamp_min(eps)
    shape = [x.shape[0], 1, 1, 1] if x.ndim == 4 else [x.shape[0], 1, c]
    if x.ndim == 4:
        shape[1] = c

    def r(t):
        return t.reshape(shape)

    xf = x.float()
    out = r(sigma_p) * (xf - r(mu)) / r(sigma) + r(mu_p)
    return out.to(x.dtype)


class _StopForward(Exception):
    pass


def _find_module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    hits = [n for n in modules if n.endswith("." + name)]
    if len(hits) == 1:
        return modules[hits[0]]
    if not hits:
        raise FisherInputError(f"perturb_at={name!r}: no module of that name in the model")
    raise FisherInputError(f"perturb_at={name!r} is ambiguous; it matches {hits[:5]}; give the full module name")


class FeaturePerturbation:
    """Makes x' for one micro-batch: `with pert.applied(model, batch, index) as batch_p: ...`.

    Args:
        seed: seed of the ε draws.
        perturb_at: None (input pixels) or the name of a module whose output is perturbed.
        input_key: batch key of the pixels when `perturb_at` is None.
        strength: multiplier of ε (0 disables: exact identity).
    """

    def __init__(self, seed: int = 0, perturb_at: Optional[str] = None, *, input_key: str = "pixel_values",
                 strength: float = 1.0, eps: float = 1e-6):
        finite_float("strength", strength, low=0.0)
        self.seed = int(seed)
        self.perturb_at = perturb_at
        self.input_key = input_key
        self.strength = float(strength)
        self.eps = eps
        self.where: Optional[str] = None  # where the last draw was applied (set on first use; logged once)

    def _log_where(self, where: str) -> None:
        if where != self.where:
            self.where = where
            logger.info("DR-FIM perturbation x -> x': %s", where)

    def _input_embeddings(self, model: nn.Module, batch: Mapping[str, Any]) -> str:
        """The name of the model's input-embedding module (perturb_at=None on a batch without `input_key`)."""
        get = getattr(model, "get_input_embeddings", None)
        emb = None
        if callable(get):
            try:
                emb = get()
            except (NotImplementedError, AttributeError):
                emb = None
        names = [n for n, m in model.named_modules() if m is emb] if isinstance(emb, nn.Module) else []
        if not names:
            raise FisherInputError(
                f"input_key={self.input_key!r} is not in the batch (keys {sorted(batch)}) and the model has no input "
                "embeddings (get_input_embeddings()) to perturb instead; set perturb_at to the name of the module "
                "whose output to perturb (e.g. 'model.embed_tokens'), or input_key to the batch's input tensor"
            )
        return names[0]

    @property
    def enabled(self) -> bool:
        return self.strength != 0

    def _refuse_single(self, b: int, perturb_at: Optional[str] = None) -> None:
        if b < 2:
            where = f"module {perturb_at!r}" if perturb_at else f"batch[{self.input_key!r}]"
            raise FisherInputError(
                f"DR-FIM perturbation of {where} on a micro-batch of {b} sample: the batch std of its feature "
                "statistics is 0, so x' = x and the domain term would silently vanish; use micro-batches of >= 2 "
                "samples (e.g. per_device_train_batch_size >= 2), or turn the DR term off (lambda_dr=0 or perturb=False)"
            )

    @contextlib.contextmanager
    def applied(self, model: nn.Module, batch: Mapping[str, Any], index: int):
        """Yield (batch', draw) for global micro-batch `index`; draw is None when disabled."""
        if not self.enabled:
            yield batch, None
            return
        perturb_at = self.perturb_at
        if perturb_at is None and self.input_key not in batch:
            perturb_at = self._input_embeddings(model, batch)
            self._log_where(f"on the output of the input embeddings {perturb_at!r} (the batch has no "
                            f"{self.input_key!r}; set perturb_at to choose another module)")
        elif perturb_at is not None:
            self._log_where(f"on the output of module {perturb_at!r} (perturb_at)")
        if perturb_at is None:
            self._log_where(f"on batch[{self.input_key!r}] (the input)")
            x = batch[self.input_key]
            _, cdim = _channel_layout(x)
            d = draw(x.shape[cdim], self.seed, index)
            self._refuse_single(x.shape[0])
            out = dict(batch)
            out[self.input_key] = perturb_features(x, d.eps_mu, d.eps_sigma, strength=self.strength, eps=self.eps)
            yield out, d
            return
        module = _find_module(model, perturb_at)
        state: dict[str, Any] = {}

        def calibrate(mod, args, output):
            x = output[0] if isinstance(output, tuple) else output
            state["spread"] = batch_spread(x.detach(), self.eps)
            state["channels"] = x.shape[_channel_layout(x)[1]]
            state["b"] = x.shape[0]
            raise _StopForward

        handle = module.register_forward_hook(calibrate)
        try:
            with torch.no_grad():
                model(**batch)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if "spread" not in state:
            raise FisherInputError(f"perturb_at={perturb_at!r}: the module was not called in the forward pass")
        self._refuse_single(state["b"], perturb_at)
        d = draw(state["channels"], self.seed, index)
        s_mu, s_sigma = state["spread"]

        def apply(mod, args, output):
            if isinstance(output, tuple):
                return (perturb_features(output[0], d.eps_mu, d.eps_sigma, s_mu, s_sigma, strength=self.strength,
                                         eps=self.eps),) + tuple(output[1:])
            return perturb_features(output, d.eps_mu, d.eps_sigma, s_mu, s_sigma, strength=self.strength,
                                    eps=self.eps)

        handle = module.register_forward_hook(apply)
        try:
            yield batch, d
        finally:
            handle.remove()
