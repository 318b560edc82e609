"""`FisherTuneSchedule`: FisherTune's three stages (Algorithm 1) for any training loop.

One object holds what a FisherTune run decides at each step; `FisherTuneTrainer` (trainer.py) uses it, and so can a
plain PyTorch loop::

    schedule = FisherTuneSchedule(model, stage1_steps=100, stage2_steps=50, stage3_steps=350,
                                  num_samples=len(train_set))           # N of Eq. 7's prior pull
    optimizer = torch.optim.AdamW(schedule.param_groups(lr=1e-4, fishertune_lr=1e-5))
    for step, batch in zip(range(schedule.total_steps), batches):
        schedule.before_step(step).apply(optimizer)    # estimator / selection / δ(t) / what trains
        loss = schedule.loss(model(**batch).loss)      # + the prior pull once the selection is made
        if loss.requires_grad:
            loss.backward()
        schedule.estimate(batch)                       # stage 2: one estimator step on this batch
        optimizer.step(); optimizer.zero_grad()
    torch.save(schedule.state_dict(), "fishertune_state.pt")   # with the model and optimizer, for exact resume

    stage 1  [0, T1)          what trains outside the FisherTune layers (PEFT `modules_to_save`, e.g. a head)
    stage 2  [T1, T1+T2)      the same, and the Fisher estimator takes a step on every batch (`estimate`)
    stage 3  [T1+T2, T)       one selection from the estimate at T1+T2, then the active FisherTune values train too,
                              δ(t) growing from delta_min to delta_max, with Eq. 7's prior pull added to the loss
    (`alternate_steps = N`: estimation and tuning blocks of N steps alternate after the warm-up; see plan.py)

The prior pull (γ/N)·τ⁻²·‖δ‖²/2 carries the training set's size N because the training loss is a mean over samples
while Eq. 7 sums the likelihood over them (docs/fisher.md): `num_samples` is required unless the adapter's config
sets `data_scale` or `prior_pull=False`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..tuner.schedule import update_interval
from .plan import Phase, StagePlan

logger = logging.getLogger(__name__)

STATE_VERSION = 1


def _random(model, seed):
    from ..tuner.selection import random_scores

    return random_scores(model, seed)


def _magnitude(model, seed):
    from ..tuner.selection import magnitude_scores

    return magnitude_scores(model)


DATA_FREE_SCORES = {"random": _random, "magnitude": _magnitude}


def fishertune_layers(model: nn.Module) -> list:
    from ..tuner.layer import FisherTuneLayer

    return [m for m in model.modules() if isinstance(m, FisherTuneLayer)]


def fishertune_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The value tensors (`ft_values`) of the active adapters of every FisherTune layer, in module order: what
    stage 3 trains. A selection replaces them with new tensors (call again after one)."""
    out = []
    for m in fishertune_layers(model):
        for a in m.active_adapters:
            if a in m.ft_values:
                out.append(m.ft_values[a])
    return out


def fishertune_config(model: nn.Module):
    """The active adapter's `FisherTuneConfig` of a PEFT model, or None."""
    from ..tuner.config import FisherTuneConfig

    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return None
    name = getattr(model, "active_adapter", None)
    cfg = configs.get(name) if isinstance(name, str) else None
    return cfg if isinstance(cfg, FisherTuneConfig) else None


@contextlib.contextmanager
def no_activation_checkpointing(model: nn.Module):
    """Turn off transformers' per-layer activation checkpointing flags for the duration, then restore them.

    The estimator substitutes weights functionally and takes gradients after the call returns; activation
    checkpointing would recompute with the original weights, so it is off for the estimator's passes."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in layers:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in layers:
            m.gradient_checkpointing = True


@dataclass
class Selection:
    """One selection: the adapter's counts after it and where its scores came from."""

    summary: Any  # tuner.selection.SelectionSummary
    info: str
    num_samples: Optional[int]  # samples the estimate saw (None for random scores)
    step: Optional[int]
    number: int  # 1 for the first selection of the run, 2 for the next (alternating execution), ...


@dataclass
class StepChange:
    """What `before_step` changed that an optimizer must follow.

    added: parameters that start training now (the FisherTune values when stage 3 starts) — add them to the
        optimizer. replaced: (old, new) pairs — a new selection (alternating execution) made new value tensors for
        parameters the optimizer already holds. selection: the `Selection` made before this step, if any.
    """

    added: list = field(default_factory=list)
    replaced: list = field(default_factory=list)
    selection: Optional[Selection] = None

    def apply(self, optimizer: Optional[torch.optim.Optimizer], group: Any = "fishertune") -> None:
        """Put the changes into `optimizer`: new parameters join the param group named `group` (a "name" key, as
        `FisherTuneSchedule.param_groups` makes; or an index), replaced ones take their old tensor's place (with fresh
        optimizer state). The group must already exist (it may be empty) so lr schedulers know it."""
        if optimizer is None:
            return
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        if self.replaced:
            swap_parameters(opt, [o for o, _ in self.replaced], [n for _, n in self.replaced])
        if self.added:
            held = {id(p) for g in opt.param_groups for p in g["params"]}
            new = [p for p in self.added if id(p) not in held]
            if new:
                _find_group(opt, group)["params"].extend(new)


def _find_group(opt, group) -> dict:
    if isinstance(group, int):
        return opt.param_groups[group]
    for g in opt.param_groups:
        if g.get("name") == group:
            return g
    raise ValueError(
        f"the optimizer has no param group named {group!r} for the FisherTune values that train from stage 3 on "
        f"(groups: {[g.get('name') for g in opt.param_groups]}); build it from schedule.param_groups(...), or add "
        f"a group {{'name': {group!r}, 'params': []}}, or pass group=<index>")


def swap_parameters(opt, old: list, new: list) -> None:
    """Replace `old` tensors by `new` ones in `opt`'s groups (their optimizer state is dropped)."""
    if len(old) != len(new):
        raise RuntimeError(f"a new selection changed the number of trained tensors ({len(old)} -> {len(new)})")
    replace = {id(o): n for o, n in zip(old, new)}
    for g in opt.param_groups:
        g["params"] = [replace.get(id(p), p) for p in g["params"]]
    for o in old:
        opt.state.pop(o, None)


class FisherTuneSchedule:
    """FisherTune's staged schedule on `model` (a PEFT model with a `FisherTuneConfig` adapter).

    Args:
        model: the PeftModel.
        stage1_steps, stage2_steps, stage3_steps: T1 (warm-up), T2 (estimation), T3 (sparse tuning), in optimizer
            steps.
        num_samples: N, the training set's size (distinct samples), which scales Eq. 7's prior pull. Required when
            the adapter's `prior_pull` is on and its `data_scale` is unset.
        estimator_factory: () -> a Fisher estimator (peft_fishertune.fisher); default: `make_estimator` on the
            adapter's config (`fisher_estimator`, `fisher_mode`, `perturb_at`, ...), with `loss_fn` and `accelerator`.
        loss_fn: (outputs, batch) -> loss for the default estimator (default: `outputs.loss`).
        accelerator: an accelerate `Accelerator` under several processes (the estimate is reduced over them).
        alternate_steps: 0 sequential execution (the paper's default); N > 0 alternating blocks of N steps.
        selection_update_steps: recompute δ(t) every this many tuning steps, and on the last one (so the run ends
            at δ_max); None (default): every max(1, tuning steps // 1000) (`tuner.schedule.update_interval`).
        selection: "fisher" (from the estimate), a data-free score ("random": layer-seeded, "magnitude": |w|, or
            any name with `scores_fn`; baselines) or None (no selection: methods whose late parameters are not
            FisherTune values, e.g. LoRA in the segmentation baselines).
        scores_fn: (model, seed) -> {weight name: scores} for a data-free selection (default: by name).
        estimates: whether stage 2 runs the estimator (default: selection == "fisher").
        late_from_stage: first stage in which the late parameters train (3 for FisherTune; None: never).
        late_parameters: model -> the parameters that train from `late_from_stage` on (default: the FisherTune
            values). They are frozen until then.
        random_seed: seed of `selection="random"`.
    """

    def __init__(self, model: nn.Module, stage1_steps: int, stage2_steps: int, stage3_steps: int, *,
                 num_samples: Optional[int] = None, estimator_factory: Optional[Callable[[], Any]] = None,
                 loss_fn=None, accelerator=None, alternate_steps: int = 0, selection_update_steps: Optional[int] = None,
                 selection: Optional[str] = "fisher", estimates: Optional[bool] = None,
                 late_from_stage: Optional[int] = 3,
                 late_parameters: Optional[Callable[[nn.Module], list]] = None, random_seed: int = 0,
                 scores_fn: Optional[Callable[[nn.Module, int], dict]] = None):
        if selection not in ("fisher", None) and scores_fn is None and selection not in DATA_FREE_SCORES:
            raise ValueError(f"selection={selection!r}; expected 'fisher', None, one of {sorted(DATA_FREE_SCORES)} "
                             "or a name with scores_fn")
        estimates = (selection == "fisher") if estimates is None else bool(estimates)
        self.model = model
        self.plan = StagePlan(stage1_steps, stage2_steps, stage3_steps, alternate_steps=alternate_steps,
                              estimates=estimates, selects=selection is not None, backbone_from_stage=late_from_stage)
        self.selection_kind = selection
        self.selection_update_steps = update_interval(self.plan.tune_steps, selection_update_steps)
        self.random_seed = random_seed
        self.scores_fn = scores_fn
        self.loss_fn, self.accelerator = loss_fn, accelerator
        self._late_fn = late_parameters or fishertune_parameters
        self.config = fishertune_config(model)
        if selection is not None:
            if self.config is None:
                raise ValueError(
                    "FisherTuneSchedule: the model has no FisherTune adapter (model.peft_config[active_adapter] is not a "
                    "FisherTuneConfig); wrap it with peft.get_peft_model(model, FisherTuneConfig(...)) first")
            if not fishertune_layers(model):
                raise ValueError("FisherTuneSchedule: the model has no FisherTune layers (target_modules matched none?)")
        self.estimator_factory = estimator_factory
        if estimates and estimator_factory is None:
            self.estimator_factory = self._default_estimator
            if getattr(self.config, "fisher_estimator", None) == "variational":  # fail now, not after stage 1
                from ..fisher.seeds import check_addressable
                from ..tuner.selection import target_parameters

                check_addressable(dict(target_parameters(model)))
        self.num_samples = self._check_num_samples(num_samples)
        self._note_strong_pull()
        self.estimator = None
        # activated: the late parameters joined the optimizer; selections: how many were made; fraction: δ now
        self.state: dict[str, Any] = {"activated": False, "selections": 0, "fraction": None}
        self.last_selection: Optional[Selection] = None
        self._entered_step: Optional[int] = None
        self._late_on: Optional[bool] = None
        self._added: list = []
        for p in self.late_parameters():  # frozen until their stage (stage 1 trains modules_to_save only)
            p.requires_grad_(False)

    # ---------------------------------------------------------------- structure
    def _default_estimator(self):
        from ..fisher import make_estimator

        return make_estimator(self.model, self.config, loss_fn=self.loss_fn, accelerator=self.accelerator)

    def _check_num_samples(self, n) -> Optional[int]:
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"num_samples={n!r}; expected the training set's size, an integer >= 1")
            return n
        cfg = self.config
        if (self.plan.selects and cfg is not None and getattr(cfg, "prior_pull", False)
                and getattr(cfg, "data_scale", None) is None):
            raise ValueError(
                "num_samples is required: stage 3 adds Eq. 7's prior pull (γ/N)·τ⁻²·‖δ‖²/2, and N is the training "
                "set's size (the loss is a mean over samples; with N = 1 the pull is N times too strong). Pass "
                "num_samples=len(train_dataset), or set FisherTuneConfig.data_scale, or prior_pull=False")
        return None

    STRONG_PULL = 0.1  # κ = γ/(N·τ²) from which the note below is given (GTA5 at the defaults: 0.004)

    def _note_strong_pull(self) -> None:
        """Say so when Eq. 7's pull is strong: on a small training set it holds the deltas near the pretrained
        weights (the DG benchmark, N = 200, κ = 0.5: deltas 4x smaller, 0.71 mIoU lost with a flat schedule;
        docs/benchmarks.md)."""
        cfg = self.config
        if not (self.plan.selects and cfg is not None and getattr(cfg, "prior_pull", False)):
            return
        from ..fisher.scores import prior_pull_coefficient

        scale = getattr(cfg, "data_scale", None) or self.num_samples
        kappa = prior_pull_coefficient(cfg.gamma, cfg.tau, scale)
        if kappa >= self.STRONG_PULL:
            warnings.warn(
                f"Eq. 7's prior pull is strong here: κ = γ/(N·τ²) = {kappa:.3g} (γ={cfg.gamma:g}, τ={cfg.tau:g}, "
                f"N={scale}); on a training set this small it holds the FisherTune deltas near the pretrained weights "
                "(on the DG benchmark at κ = 0.5 it cost 0.71 mIoU with a flat schedule). Set "
                "FisherTuneConfig(prior_pull=False), or data_scale to the N the pull should assume.",
                UserWarning, stacklevel=3)

    @property
    def total_steps(self) -> int:
        return self.plan.total

    @property
    def activated(self) -> bool:
        return bool(self.state["activated"])

    def late_parameters(self) -> list[nn.Parameter]:
        """The parameters that train from stage 3 on (the FisherTune values), current tensors."""
        return list(self._late_fn(self.model))

    def trainable_late_parameters(self) -> list[nn.Parameter]:
        """The late parameters that train now (empty before their stage): what a multi-process run reduces itself."""
        return [p for p in self.late_parameters() if p.requires_grad] if self.activated else []

    def phase(self, step: int) -> Phase:
        """What the plan does at `step` (stage, estimating, late parameters training, selection due, tune step)."""
        return self.plan.at(step)

    def stage_at(self, step: int) -> int:
        return self.plan.stage_at(step)

    def fraction_at(self, step: int) -> Optional[float]:
        """δ(t) at `step` (None outside tuning)."""
        cfg = self.config
        if cfg is None:
            return None
        return self.plan.fraction_at(step, cfg.delta_min, cfg.delta_max, cfg.schedule)

    def param_groups(self, lr: float, fishertune_lr: Optional[float] = None, weight_decay: float = 0.0,
                     fishertune_weight_decay: float = 0.0) -> list[dict]:
        """Optimizer groups for a plain loop: "model" (what trains now) and "fishertune" (the FisherTune values;
        empty until stage 3 starts, `StepChange.apply` fills it)."""
        late = {id(p) for p in self.late_parameters()}
        now = [p for p in self.model.parameters() if p.requires_grad and id(p) not in late]
        if self.activated:
            now_late = self.late_parameters()
        else:
            now_late = []
        return [{"name": "model", "params": now, "lr": lr, "weight_decay": weight_decay},
                {"name": "fishertune", "params": now_late, "lr": lr if fishertune_lr is None else fishertune_lr,
                 "weight_decay": fishertune_weight_decay}]

    # ---------------------------------------------------------------- the stages
    def before_step(self, step: int) -> StepChange:
        """Make the model match the plan at `step` (call once before each optimizer step's first forward; repeated
        calls for the same step do nothing). Returns what the optimizer must follow (`StepChange.apply`)."""
        change = StepChange()
        if self._entered_step == step:
            return change
        self._entered_step = step
        phase = self.plan.at(step)
        if phase.estimating and self.estimator is None:
            self.estimator = self.estimator_factory()
            logger.info("stage 2: Fisher estimator %s", getattr(self.estimator, "describe", lambda: "")())
        if phase.select_now:
            change.selection, change.replaced = self.select(step)
        if phase.backbone_trains != self._late_on:
            params = self.late_parameters()
            for p in params:
                p.requires_grad_(phase.backbone_trains)
            if phase.backbone_trains and not self.state["activated"]:
                change.added = params
                self.state["activated"] = True
            self._late_on = phase.backbone_trains
        if self.plan.selects and phase.tune_step is not None:
            last = phase.tune_step == phase.tune_steps - 1  # the run ends at δ_max, whatever the interval
            if phase.tune_step % self.selection_update_steps == 0 or last or self.state["fraction"] is None:
                from ..tuner.selection import set_active_fraction

                f = self.fraction_at(step)
                if f != self.state["fraction"]:
                    set_active_fraction(self.model, f)
                    self.state["fraction"] = f
        self._added = change.added
        return change

    def new_trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the last `before_step` started training (add them to your optimizer)."""
        return list(self._added)

    def select(self, step: Optional[int] = None) -> tuple[Selection, list]:
        """Rank the candidates (from the estimate, consumed and released; or random scores), keep the top δ_max,
        activate δ_min. Returns the `Selection` and the (old, new) value tensors an optimizer already holding the old
        ones must swap."""
        from .._memory import release_freed_memory
        from ..tuner.selection import select_parameters

        n_samples = None
        if self.selection_kind != "fisher":  # a data-free selection (random, magnitude)
            fn = self.scores_fn or DATA_FREE_SCORES[self.selection_kind]
            scores = fn(self.model, self.random_seed)
            info = f"{self.selection_kind} scores"
        else:
            if self.estimator is None:
                raise RuntimeError("a selection is due without a Fisher estimate (no estimation steps before it)")
            # consume: the scores are built in place from the accumulators, which the estimator then drops
            result = self.estimator.result(consume=True)
            scores = result.scores
            n_samples = int(result.num_samples)
            info = f"{result.estimator}/{result.mode}, {result.num_samples} samples, w={result.w:.3f}"
            mix = result.metadata or {}
            if mix.get("dr_term") and "lambda_effective" in mix:  # how much the DR term weighs in these scores
                info += (f", λ={mix['lambda_dr']:g}: ΔF term {mix['lambda_effective']:.2f} of the score mass, "
                         f"{mix['dr_share_top']:.2f} in the top {100 * mix['top_fraction']:.0f} %")
            del result
            self.release_estimator()
        old = self.late_parameters()
        summary = select_parameters(self.model, scores)
        del scores
        new = self.late_parameters()
        replaced = []
        if self.state["activated"]:
            for p, q in zip(old, new):
                q.requires_grad_(p.requires_grad)
            replaced = [(o, n) for o, n in zip(old, new) if o is not n]
            if len(old) != len(new):
                raise RuntimeError(f"a new selection changed the number of trained tensors ({len(old)} -> {len(new)})")
        else:
            for q in new:
                q.requires_grad_(False)
        del old, new
        self.state["selections"] += 1
        self.state["fraction"] = None  # select_parameters reset the threshold: apply δ(t) again
        release_freed_memory()  # stage 2's accumulators and the scores, back to the OS
        self.last_selection = Selection(summary, info, n_samples, step, self.state["selections"])
        return self.last_selection, replaced

    def release_estimator(self) -> None:
        """Stage 2 is over: free everything the estimator owned (accumulators, precisions, hooks, references)."""
        from .._memory import release_freed_memory

        if self.estimator is not None:
            if not getattr(self.estimator, "released", False):
                self.estimator.release()
            self.estimator = None
        release_freed_memory()

    def estimate(self, batch, step: Optional[int] = None, context=None) -> bool:
        """Feed `batch` (what `model(**batch)` takes, with the labels) to the estimator if the plan estimates at
        `step` (default: the step of the last `before_step`). Call it after the step's backward (its gradients are
        left alone). Returns whether the estimator took the batch."""
        step = self._entered_step if step is None else step
        if step is None:
            raise RuntimeError("estimate(batch): call before_step(step) first (or pass step=)")
        if self.estimator is None or not self.plan.at(step).estimating:
            return False
        with no_activation_checkpointing(self.model), (context if context is not None else contextlib.nullcontext()):
            self.estimator.step(batch)
        return True

    def prior_pull(self) -> torch.Tensor:
        """Eq. 7's pull (γ/N)·τ⁻²·Σ‖δ‖²/2 of the active FisherTune values toward the pretrained weights, N =
        `num_samples` (or the config's `data_scale`); a 0-d zero before the first selection, for methods without one
        or with `prior_pull=False`."""
        if self.state["selections"] == 0 or self.config is None or not self.plan.selects:
            return torch.zeros(())
        from ..fisher import prior_pull_loss

        return prior_pull_loss(self.model, num_samples=self.num_samples)

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` plus the prior pull (what stage 3 minimizes)."""
        if self.state["selections"] == 0:
            return loss
        return loss + self.prior_pull().to(loss.device)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs besides the model's weights and the optimizer: the schedule's state, every PEFT
        tuner layer's own tensors (the FisherTune candidate lists, whose order carries the ranking, and thresholds),
        and the estimator's buffers and RNG."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = {}
        for name, m in self.model.named_modules():
            if isinstance(m, BaseTunerLayer):
                own = set(m.adapter_layer_names) | set(m.other_param_names)
                tensors = {k: v.detach().cpu().clone() for k, v in m.state_dict().items() if k.split(".")[0] in own}
                if tensors:
                    layers[name] = tensors
        return {
            "version": STATE_VERSION,
            "plan": asdict(self.plan),
            "ft_state": dict(self.state),
            "layers": layers,
            "estimator": self.estimator.state_dict() if self.estimator is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s state into this schedule and its model (before the optimizer is rebuilt: the
        value tensors a selection made are recreated here)."""
        saved_plan = state.get("plan")
        if saved_plan is not None and saved_plan != asdict(self.plan):
            diffs = [f"{k}: saved {saved_plan.get(k)!r}, here {v!r}" for k, v in asdict(self.plan).items()
                     if saved_plan.get(k) != v]
            raise ValueError("FisherTuneSchedule.load_state_dict: the state is of another stage plan (" + "; ".join(diffs) + ")")
        modules = dict(self.model.named_modules())
        for name, tensors in state["layers"].items():
            m = modules.get(name)
            if m is None:  # written with module names relative to the unwrapped model
                m = modules.get("base_model.model." + name)
            if m is None:
                raise ValueError(f"FisherTuneSchedule.load_state_dict: the state holds layer {name!r}, which this "
                                 "model does not have")
            m.load_state_dict(tensors, strict=False)
        ft = dict(state["ft_state"])
        if "selected" in ft:  # written before alternating execution existed
            ft["selections"] = int(bool(ft.pop("selected")))
        self.state = {"activated": False, "selections": 0, "fraction": None, **ft}
        self._entered_step, self._late_on = None, None
        if state.get("estimator") is not None:
            self.estimator = self.estimator_factory()
            self.estimator.load_state_dict(state["estimator"])
        else:
            self.estimator = None
