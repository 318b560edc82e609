"""FisherTune's staged schedule for any model: `FisherTuneTrainer` (transformers.Trainer) and `FisherTuneSchedule`
(your own loop). Nothing here knows the segmentation experiment (that is `peft_fishertune.training`).

    plan.py           StagePlan: what a run does at a step (pure)
    schedule.py       FisherTuneSchedule: estimator, selection, δ(t), prior pull, state (any loop)
    trainer.py        FisherTuneTrainer / FisherTuneTrainingArguments (uses the schedule)
    callback.py       FisherTuneCallback: the schedule on a plain transformers.Trainer
    checkpointing.py  atomic checkpoints and output files

See docs/trainer.md.
"""

from ..tuner.schedule import active_fraction
from .callback import FisherTuneCallback
from .plan import Phase, StagePlan
from .schedule import FisherTuneSchedule, Selection, StepChange, fishertune_parameters
from .trainer import FisherTuneTrainer, FisherTuneTrainingArguments

__all__ = [
    "FisherTuneCallback",
    "FisherTuneSchedule",
    "FisherTuneTrainer",
    "FisherTuneTrainingArguments",
    "Phase",
    "Selection",
    "StagePlan",
    "StepChange",
    "active_fraction",
    "fishertune_parameters",
]
