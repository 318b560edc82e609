"""Fisher engine: empirical and variational diagonal Fisher, domain perturbation, DR-FIM.

Layers (each imports only those above it in this list):

    errors, seeds, scores       the math: ΔF, the λ mix, DRFIMResult, the prior pull (nothing of models)
    perturbation, gradients,    x -> x'; streamed gradients, batches and losses, the model guard;
    weight_sampling, processes, per-layer weight samples; ranks; accumulator dtypes, accumulation and
    buffers                     the per-step work buffers
    micro_batch                 the statistic of one micro-batch and the per-micro-batch DR-FIM flow (a mixin)
    estimator                   the lifecycle shared by the estimators (step / result / state / release)
    empirical, variational      the two estimates
    api                         entry points; FisherTune's defaults (params=None), prior_pull_loss

Functional API::

    fisher = estimate_fisher(model, batches, params=params)              # {name: tensor}
    result = estimate_dr_fim(model, batches, config=cfg)                 # DRFIMResult (params=None: FisherTune's)

Stateful API (stage 2 of the trainer, interleaved with decoder steps)::

    est = make_estimator(model, cfg, accelerator=acc)                    # picks cfg.fisher_estimator
    for batch in loader: train_decoder(batch); est.step(batch)
    ckpt["fisher"] = est.state_dict()   ...   est.load_state_dict(ckpt["fisher"])
    result = est.result(); est.release()

Stage 3: `loss = loss + prior_pull_loss(model)` (Eq. 7's γτ⁻²‖θ̂ − θ_pt‖²/2). See docs/fisher.md.
"""

from .api import estimate_dr_fim, estimate_fisher, fishertune_params, make_estimator, prior_pull_loss
from .empirical import EmpiricalFisherEstimator
from .errors import FisherInputError
from .estimator import FisherEstimator
from .perturbation import FeaturePerturbation, PerturbationDraw, perturb_features
from .scores import DEFAULT_DR_EPS, DRFIMResult, combine_dr_fim, delta_fisher, mix_report, prior_pull
from .variational import VariationalFisherEstimator

__all__ = [
    "DEFAULT_DR_EPS",
    "DRFIMResult",
    "EmpiricalFisherEstimator",
    "FeaturePerturbation",
    "FisherEstimator",
    "FisherInputError",
    "PerturbationDraw",
    "VariationalFisherEstimator",
    "combine_dr_fim",
    "delta_fisher",
    "estimate_dr_fim",
    "estimate_fisher",
    "fishertune_params",
    "make_estimator",
    "mix_report",
    "perturb_features",
    "prior_pull",
    "prior_pull_loss",
]
