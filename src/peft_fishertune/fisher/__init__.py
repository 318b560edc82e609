"""Fisher engine: empirical and variational diagonal Fisher, domain perturbation, DR-FIM.

Functional API::

    fisher = estimate_fisher(model, batches, mode="per_sample")          # {name: tensor}
    result = estimate_dr_fim(model, batches, config=cfg)                 # DRFIMResult

Stateful API (stage 2 of the trainer, interleaved with decoder steps)::

    est = DRFIMEstimator(model, cfg, loss_fn=..., accelerator=acc)       # picks cfg.fisher_estimator
    for batch in loader: train_decoder(batch); est.step(batch)
    ckpt["fisher"] = est.state_dict()   ...   est.load_state_dict(ckpt["fisher"])
    result = est.result(); est.release()

See docs/fisher.md.
"""

from ._common import FisherInputError
from .drfim import (
    DEFAULT_DR_EPS,
    DRFIMEstimator,
    DRFIMResult,
    combine_dr_fim,
    delta_fisher,
    estimate_dr_fim,
    make_estimator,
)
from .empirical import EmpiricalFisherEstimator, estimate_fisher
from .perturbation import FeaturePerturbation, PerturbationDraw, perturb_features
from .variational import VariationalFisherEstimator

__all__ = [
    "DEFAULT_DR_EPS",
    "DRFIMEstimator",
    "DRFIMResult",
    "EmpiricalFisherEstimator",
    "FeaturePerturbation",
    "FisherInputError",
    "PerturbationDraw",
    "VariationalFisherEstimator",
    "combine_dr_fim",
    "delta_fisher",
    "estimate_dr_fim",
    "estimate_fisher",
    "make_estimator",
    "perturb_features",
]
