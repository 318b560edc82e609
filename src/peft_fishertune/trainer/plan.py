"""The stage plan: a pure function of the global step saying what a FisherTune run does at that step.

    plan = StagePlan(stage1_steps=10_000, stage2_steps=2_000, stage3_steps=28_000, estimates=True, selects=True,
                     backbone_from_stage=3)
    plan.at(12_000)   # Phase(stage=3, estimating=False, backbone_trains=True, select_now=True, tune_step=0, ...)

Sequential execution (the paper's default, Algorithm 1):

    stage 1  [0, T1)            the head / decoder only (modules_to_save; the FisherTune values frozen)
    stage 2  [T1, T1+T2)        the head keeps training; the Fisher estimator takes a step on every batch
    stage 3  [T1+T2, T)         select once at T1+T2, then the head + the active elements, δ(t) growing

Alternating execution (`alternate_steps = N > 0`, the paper's Table 2 "AE-2k/4k/6k"; our reading): after the
warm-up, blocks of N steps alternate, estimation first: [estimate N][tune N][estimate N][tune N]... up to T. Each
estimation block starts a fresh estimate; the first step of each tuning block selects again from it. Only
T2 + T3 (the steps after the warm-up) matters then. A trailing estimation block that no tuning block would follow
is tuned instead (an estimate nobody uses is wasted work). δ(t) grows over the tuning steps only: t counts the
tuning steps done out of all tuning steps of the run.

`FisherTuneSchedule` (what to do at a step) and the trainer's log callback (what to show) read this; nothing here
touches a model, so it is tested on its own (tests/test_methods.py). `backbone_from_stage` is the first stage in
which the late parameters (the FisherTune values; a baseline's backbone) train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..tuner.schedule import fraction_at_step


@dataclass(frozen=True)
class Phase:
    """What happens at one global step (the step about to run).

    stage: 1 warm-up, 2 estimation, 3 tuning. estimating: the estimator takes a step on this batch.
    backbone_trains: the method's backbone parameters get gradients. select_now: a (new) selection is made before
    this step. tune_step / tune_steps: index of this step among all tuning steps, and their count (None outside
    tuning). block: the index of the alternating block (0 in sequential runs).
    """

    step: int
    stage: int
    estimating: bool
    backbone_trains: bool
    select_now: bool
    tune_step: Optional[int]
    tune_steps: int
    block: int = 0


@dataclass(frozen=True)
class StagePlan:
    stage1_steps: int
    stage2_steps: int
    stage3_steps: int
    alternate_steps: int = 0  # 0: sequential execution; N > 0: estimation / tuning blocks of N steps after warm-up
    estimates: bool = True  # the method runs a Fisher estimator in stage 2
    selects: bool = True  # the method selects backbone elements at the start of stage 3
    backbone_from_stage: Optional[int] = 3  # first stage in which the backbone trains; None: never

    def __post_init__(self):
        for name in ("stage1_steps", "stage2_steps", "stage3_steps", "alternate_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r}; expected an integer >= 0")
        if self.backbone_from_stage not in (None, 1, 2, 3):
            raise ValueError(f"backbone_from_stage={self.backbone_from_stage!r}; expected 1, 2, 3 or None")
        if self.alternate_steps:
            if not (self.estimates and self.selects):
                raise ValueError(f"alternate_steps={self.alternate_steps}: alternating execution needs a method that "
                                 "estimates Fisher scores and selects from them (fishertune, drfim_empirical, fim)")
            if self.after_warmup <= self.alternate_steps:
                raise ValueError(
                    f"alternate_steps={self.alternate_steps}: stage2_steps + stage3_steps = {self.after_warmup} leaves "
                    "no tuning block; it must exceed alternate_steps")

    # ------------------------------------------------------------------ sizes
    @property
    def total(self) -> int:
        return self.stage1_steps + self.stage2_steps + self.stage3_steps

    @property
    def after_warmup(self) -> int:
        return self.stage2_steps + self.stage3_steps

    def _num_blocks(self) -> int:
        n = self.alternate_steps
        return -(-self.after_warmup // n)

    def _block_kind(self, block: int) -> int:
        """2 (estimation) or 3 (tuning) for an alternating block."""
        if block % 2 == 1:
            return 3
        last = self._num_blocks() - 1
        return 3 if block == last and block > 0 else 2  # a trailing estimation block is tuned instead

    @property
    def tune_steps(self) -> int:
        """Number of tuning (stage-3) steps in the whole run."""
        if not self.alternate_steps:
            return self.stage3_steps
        n, r = self.alternate_steps, self.after_warmup
        return sum(min(n, r - b * n) for b in range(self._num_blocks()) if self._block_kind(b) == 3)

    def _tune_steps_before(self, block: int) -> int:
        n, r = self.alternate_steps, self.after_warmup
        return sum(min(n, r - b * n) for b in range(block) if self._block_kind(b) == 3)

    # ------------------------------------------------------------------ lookup
    def stage_at(self, step: int) -> int:
        return self.at(step).stage

    def at(self, step: int) -> Phase:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r}; expected an integer >= 0")
        t1 = self.stage1_steps
        step_c = min(step, max(self.total - 1, 0))  # past the end: the last step's phase
        if step_c < t1:
            return Phase(step, 1, False, self._trains(1), False, None, self.tune_steps)
        if not self.alternate_steps:
            if step_c < t1 + self.stage2_steps:
                return Phase(step, 2, self.estimates, self._trains(2), False, None, self.tune_steps)
            k = step_c - t1 - self.stage2_steps
            return Phase(step, 3, False, self._trains(3), self.selects and k == 0 and step == step_c, k,
                         self.tune_steps)
        n = self.alternate_steps
        block, offset = divmod(step_c - t1, n)
        kind = self._block_kind(block)
        if kind == 2:
            return Phase(step, 2, True, False, False, None, self.tune_steps, block)
        # a tuning block right after an estimation block selects again on its first step
        fresh = offset == 0 and self._block_kind(block - 1) == 2 and step == step_c
        tuned = self._tune_steps_before(block) + offset
        return Phase(step, 3, False, True, fresh, tuned, self.tune_steps, block)

    def _trains(self, stage: int) -> bool:
        return self.backbone_from_stage is not None and stage >= self.backbone_from_stage

    def fraction_at(self, step: int, delta_min: float, delta_max: float, kind: str = "exp") -> Optional[float]:
        """δ at `step` (None outside tuning or for methods without a selection): δ_min on the first tuning step,
        δ_max on the last, the schedule `kind` in between."""
        phase = self.at(step)
        if not self.selects or phase.tune_step is None:
            return None
        return fraction_at_step(phase.tune_step, 0, max(self.tune_steps, 1), delta_min, delta_max, kind)

    def describe(self) -> str:
        t1, t2, t3 = self.stage1_steps, self.stage2_steps, self.stage3_steps
        if self.alternate_steps:
            return (f"alternating execution: warm-up {t1} steps, then estimation / tuning blocks of "
                    f"{self.alternate_steps} steps over {self.after_warmup} steps ({self.tune_steps} tuning)")
        return f"sequential execution: stages {t1} + {t2} + {t3} steps"
