"""Entry points (the top layer): pick and run an estimator; FisherTune's defaults; the prior pull for stage 3.

The layers below take the targeted weights explicitly and know nothing of the tuner. Here, and only here,
`params=None` means "the weights a FisherTune adapter targets" (`peft_fishertune.tuner.selection.
target_parameters`), and `prior_pull_loss` finds the adapter's deltas.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
from torch import nn

from .empirical import EmpiricalFisherEstimator
from .errors import FisherInputError
from .estimator import FisherEstimator
from .scores import DRFIMResult, prior_pull, prior_pull_coefficient
from .variational import VariationalFisherEstimator

ESTIMATORS = {"variational": VariationalFisherEstimator, "empirical": EmpiricalFisherEstimator}


def fishertune_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The base weights a FisherTune adapter targets, keyed like the unwrapped model's state dict."""
    from ..tuner.selection import target_parameters

    try:
        return dict(target_parameters(model))
    except ValueError as exc:
        raise FisherInputError(
            f"params=None means the weights a FisherTune adapter targets, but {exc}; or pass params={{name: "
            "parameter}} explicitly to score any model"
        ) from None


def _params(model, params):
    return fishertune_params(model) if params is None else params


def make_estimator(model: nn.Module, config, params: Optional[Mapping[str, nn.Parameter]] = None, loss_fn=None,
                   accelerator=None, **kwargs) -> FisherEstimator:
    """The estimator `config.fisher_estimator` names ("variational" or "empirical").

    `params=None`: the weights the model's FisherTune adapter targets.
    """
    kind = getattr(config, "fisher_estimator", None)
    if kind not in ESTIMATORS:
        raise FisherInputError(f"config.fisher_estimator={kind!r}; expected one of {list(ESTIMATORS)}")
    return ESTIMATORS[kind](model, config, _params(model, params), loss_fn, accelerator, **kwargs)


def _check_max_batches(max_batches) -> None:
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise FisherInputError(f"max_batches={max_batches!r}; expected None or an integer >= 1")


def _run(est: FisherEstimator, batches, max_batches, group_size: int, progress: bool, desc: str) -> DRFIMResult:
    from tqdm.auto import tqdm

    try:
        total = max_batches if max_batches is not None else (len(batches) if hasattr(batches, "__len__") else None)
        bar = tqdm(total=total, desc=desc, disable=not (progress and est.ranks.is_main))
        group: list = []
        n = 0
        for batch in batches:
            if max_batches is not None and n >= max_batches:
                break
            group.append(batch)
            n += 1
            if len(group) == group_size:
                est.step(group if group_size > 1 else group[0])
                group = []
            bar.update(1)
        bar.close()
        if group:
            est.step(group)
        if n == 0:
            raise FisherInputError("batches is empty: no data to estimate the Fisher information from")
        return est.result()
    finally:
        est.release()


def estimate_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    loss_fn=None,
    mode: str = "per_sample",
    max_batches: Optional[int] = None,
    params: Optional[Mapping[str, nn.Parameter]] = None,
    accelerator=None,
    per_sample_method: str = "auto",
    vmap_chunk_size: Optional[int] = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher {name: fp32 tensor like the weight} (no domain term).

    The model is called as `model(**batch)`; the loss is `loss_fn(outputs, batch)` if given, else
    `outputs.loss`. `mode="per_sample"`: mean of per-sample squared gradients; `mode="batch"`: mean of
    squared mini-batch gradients. `params=None`: the FisherTune adapter's targeted weights. Under several
    processes each process passes its own shard; the result (identical on all ranks) covers all of them.
    """
    _check_max_batches(max_batches)
    est = EmpiricalFisherEstimator(model, None, _params(model, params), loss_fn, accelerator, mode=mode,
                                   perturb=False, per_sample_method=per_sample_method,
                                   vmap_chunk_size=vmap_chunk_size)
    return _run(est, batches, max_batches, 1, progress, f"Fisher ({mode})").fisher_x


def estimate_dr_fim(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    config,
    loss_fn=None,
    params: Optional[Mapping[str, nn.Parameter]] = None,
    accelerator=None,
    max_batches: Optional[int] = None,
    micro_batches_per_step: int = 1,
    progress: bool = True,
    **kwargs,
) -> DRFIMResult:
    """F(x), the per-draw ΔF and the DR-FIM scores in one pass over `batches`.

    The estimator is `config.fisher_estimator`; `micro_batches_per_step` groups that many batches into
    one estimator step (matters for the variational estimate only, where one step = one weight sample and
    one precision update). Extra keyword arguments go to the estimator (e.g. `per_sample_method`,
    `input_key`, `data_scale`, `dr_eps`, `keep_fisher_xp`).
    """
    if not isinstance(micro_batches_per_step, int) or micro_batches_per_step < 1:
        raise FisherInputError(f"micro_batches_per_step={micro_batches_per_step!r}; expected an integer >= 1")
    _check_max_batches(max_batches)
    est = make_estimator(model, config, params, loss_fn, accelerator, **kwargs)
    return _run(est, batches, max_batches, micro_batches_per_step, progress, f"DR-FIM ({est.describe()})")


def prior_pull_loss(model: nn.Module, config=None, adapter_name: Optional[str] = None, *,
                    num_samples: Optional[int] = None) -> torch.Tensor:
    """Eq. 7's pull of the tuned weights toward the pretrained ones: (γ/s)·τ⁻²·Σ‖δ‖²/2 over the active deltas.

    θ̂ − θ_pt is exactly the FisherTune delta of each active element (inactive elements are at θ_pt). Add it to
    the stage-3 training loss; `config` defaults to the adapter's FisherTuneConfig (gamma, tau, data_scale).
    s is `config.data_scale` when set, else `num_samples` (the training set's size N: Eq. 7 sums the likelihood
    over N samples, so a loss averaged over samples carries γ/N; the trainer passes N). With neither, s = 1 (the
    literal Eq. 7, about N times too strong for a mean loss) and a UserWarning says so: pass `num_samples=N`
    (`num_samples=1` asks for the literal scale without the warning).
    Returns a 0-d tensor (0 when `config.prior_pull` is False or nothing is active). docs/fisher.md derives it.
    """
    from ..tuner.layer import FisherTuneLayer

    layers = [m for m in model.modules() if isinstance(m, FisherTuneLayer)]
    if not layers:
        raise FisherInputError("prior_pull_loss: the model has no FisherTune layers")
    if config is None:
        configs = getattr(model, "peft_config", {})
        name = adapter_name or getattr(model, "active_adapter", None)
        config = configs.get(name) if isinstance(configs, Mapping) else None
        if config is None:
            raise FisherInputError("prior_pull_loss: pass config= (the model has no peft_config for its adapter)")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise FisherInputError(f"prior_pull_loss: num_samples={num_samples!r}; expected the training set's size, "
                               "an integer >= 1")
    if not getattr(config, "prior_pull", True):
        return torch.zeros(())
    scale = getattr(config, "data_scale", None)
    if scale is None and num_samples is None:
        warnings.warn(
            "prior_pull_loss: no data size (num_samples=None and FisherTuneConfig.data_scale=None), so the pull "
            f"uses scale 1: gamma/tau^2 = {config.gamma / config.tau ** 2:g}, about N times too strong for a loss "
            "averaged over samples (Eq. 7 sums the likelihood over the N training samples). Pass "
            "num_samples=len(train_dataset) (or set data_scale; num_samples=1 keeps the literal scale silently).",
            UserWarning, stacklevel=2,
        )
    coef = prior_pull_coefficient(config.gamma, config.tau, num_samples if scale is None else scale)
    deltas = []
    for m in layers:
        for a in ([adapter_name] if adapter_name else m.active_adapters):
            if a in m.ft_values and m.num_active(a) > 0:
                deltas.append(m.pulled_values(a))  # the active deltas (or all, where the rest are zero)
    return prior_pull(deltas, coef)
