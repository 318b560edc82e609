"""Context of the estimator's passes: transformers' activation checkpointing off while they run, and the one-time
note on the cost of per-sample Fisher on token inputs (both called by `FisherEstimator.step`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

from torch import nn

logger = logging.getLogger("peft_fishertune.fisher")


@contextlib.contextmanager
def no_transformers_checkpointing(model: nn.Module):
    """transformers' activation checkpointing (`gradient_checkpointing_enable()`: a `gradient_checkpointing` flag per
    layer) off for the estimator's passes, restored after: its recomputation would run with the original weights
    where the estimator substitutes them (the empirical estimate then fails with torch's CheckpointError "A
    different number of tensors was saved"). The estimator checkpoints blocks itself (`estimator_checkpointing`)."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in layers:
        m.gradient_checkpointing = False
    if layers:
        logger.debug("Fisher estimator: transformers' gradient checkpointing off for its passes (%d layers)",
                     len(layers))
    try:
        yield
    finally:
        for m in layers:
            m.gradient_checkpointing = True


def note_per_sample_cost_on_tokens(batch, input_key: str) -> None:
    """One warning when fisher_mode='per_sample' meets token inputs (a batch with `input_ids`, no `input_key`)."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch or input_key in batch:
        return
    logger.warning(
        "Fisher estimate with fisher_mode='per_sample' on token inputs: one forward/backward per sequence (twice with "
        "the DR term), about the micro-batch size times the passes of fisher_mode='batch' (3x to 8x on a toy "
        "Llama, docs/fisher.md). For LLMs set FisherTuneConfig(fisher_mode='batch') (squared mini-batch gradients)."
    )
