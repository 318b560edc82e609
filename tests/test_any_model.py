"""FisherTuneTrainer and FisherTuneSchedule on transformers models built from tiny configs (ViT classifier, BERT
classifier, Llama causal LM): what each stage trains, the estimator seeing every batch, one selection, δ reaching
δ_max, bit-exact resume mid-stage-3, the loop API giving the Trainer's result, and the prior pull applied with N."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.trainer_utils import set_seed

from peft_fishertune import FisherTuneConfig, FisherTuneSchedule, FisherTuneTrainer, FisherTuneTrainingArguments
from peft_fishertune.tuner.layer import FisherTuneLayer
from peft_fishertune.tuner.selection import selection_summary

B = 2  # batch size (the DR term needs >= 2 samples per micro-batch)
FT = dict(delta_min=0.02, delta_max=0.1, fisher_mode="batch", accumulator_dtype="float32")


class _Data(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def vit(seed=0, **ft):
    set_seed(seed)
    base = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=64, image_size=16, patch_size=8, num_labels=3))
    cfg = FisherTuneConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
                           modules_to_save=["classifier"], **{**FT, **ft})
    g = torch.Generator().manual_seed(1)
    data = _Data([{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": torch.tensor(i % 3)}
                  for i in range(8)])
    return get_peft_model(base, cfg), data


def dinov2(seed=0):
    from transformers import Dinov2Config, Dinov2ForImageClassification

    set_seed(seed)
    base = Dinov2ForImageClassification(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=64, image_size=16, patch_size=8,
                                                     num_labels=3))
    cfg = FisherTuneConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
                           modules_to_save=["classifier"], **FT)
    return get_peft_model(base, cfg), vit()[1]


def bert(seed=0):
    set_seed(seed)
    base = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=60, num_labels=2,
                                                    max_position_embeddings=32))
    cfg = FisherTuneConfig(target_modules=["query", "key", "value"], modules_to_save=["classifier"],
                           perturb_at="bert.embeddings.word_embeddings", **FT)
    g = torch.Generator().manual_seed(2)
    data = _Data([{"input_ids": torch.randint(1, 60, (10,), generator=g), "attention_mask": torch.ones(10, dtype=torch.long),
                   "labels": torch.tensor(i % 2)} for i in range(8)])
    return get_peft_model(base, cfg), data


def llama(seed=0):
    set_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=60,
                                        max_position_embeddings=32))
    cfg = FisherTuneConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                           perturb_at="model.embed_tokens", **FT)
    g = torch.Generator().manual_seed(3)
    data = []
    for _ in range(8):
        ids = torch.randint(1, 60, (12,), generator=g)
        data.append({"input_ids": ids, "attention_mask": torch.ones(12, dtype=torch.long), "labels": ids.clone()})
    return get_peft_model(base, cfg), _Data(data)


def args(out, stages, **kw):
    return FisherTuneTrainingArguments(**{
        "output_dir": str(out), "stage1_steps": stages[0], "stage2_steps": stages[1], "stage3_steps": stages[2],
        "per_device_train_batch_size": B, "learning_rate": 1e-2, "fishertune_lr": 1e-2, "report_to": [],
        "use_cpu": True, "logging_steps": 1, "save_strategy": "no", "train_sampling_strategy": "sequential",
        "lr_scheduler_type": "constant", "max_grad_norm": 0.0, "disable_tqdm": True, **kw})


class _Watch(TrainerCallback):
    """Snapshots at the end of stage 1: the head's and the FisherTune values' state."""

    def __init__(self, trainer, t1):
        self.trainer, self.t1, self.at_t1 = trainer, t1, None

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.t1:
            model = self.trainer.model
            self.at_t1 = {
                "selections": self.trainer.schedule.state["selections"],
                "ft_trainable": [p.requires_grad for p in self.trainer.schedule.late_parameters()],
                "ft_numel": sum(p.numel() for p in self.trainer.schedule.late_parameters()),
                "head": {n: p.detach().clone() for n, p in model.named_parameters() if "modules_to_save" in n},
            }


def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if "modules_to_save" not in n and "ft_values" not in n}


@pytest.mark.parametrize("build", [vit, dinov2, bert], ids=["vit", "dinov2", "bert"])
def test_the_three_stages_on_a_classifier(build, tmp_path):
    model, data = build()
    head0 = {n: p.detach().clone() for n, p in model.named_parameters() if "modules_to_save" in n}
    base0 = _base_weights(model)
    t = (2, 2, 3)
    trainer = FisherTuneTrainer(model=model, args=args(tmp_path, t), train_dataset=data)
    watch = _Watch(trainer, t[0])
    trainer.add_callback(watch)
    assert trainer._prior_num_samples() == len(data)  # N of the prior pull: the training set's size
    trainer.train()
    # stage 1: the head trained, the FisherTune values did not exist / train yet
    s1 = watch.at_t1
    assert s1["selections"] == 0 and not any(s1["ft_trainable"]) and s1["ft_numel"] == 0
    assert head0.keys() == s1["head"].keys() and head0
    assert any(not torch.equal(head0[n], s1["head"][n]) for n in head0), "the head must train in stage 1"
    # nothing of the base model moved in any stage (FisherTune's deltas live beside the weights)
    for n, w in _base_weights(model).items():
        assert torch.equal(w, base0[n]), f"{n} changed"
    # stage 2: every batch went to the estimator, then one selection
    sel = trainer.schedule.last_selection
    assert sel is not None and sel.number == 1 and sel.num_samples == t[1] * B
    # stage 3: δ grew to δ_max at the last step; the values trained
    cfg = model.peft_config["default"]
    assert trainer.schedule.state["fraction"] == pytest.approx(cfg.delta_max)
    s = selection_summary(model)
    assert s.num_active == s.num_candidates == round(cfg.delta_max * s.num_targeted)
    deltas = torch.cat([m.ft_values["default"].detach() for m in model.modules() if isinstance(m, FisherTuneLayer)])
    assert deltas.abs().sum() > 0
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["stage"] for r in rows] == [1, 1, 2, 2, 3, 3, 3]
    assert {"lr_model", "lr_fishertune"} <= set(rows[-1])


def test_a_causal_lm_with_nothing_else_to_train(tmp_path):
    model, data = llama()
    with pytest.raises(ValueError, match="stage1_steps=2: stage 1 trains .*modules_to_save"):
        FisherTuneTrainer(model=model, args=args(tmp_path, (2, 2, 2)), train_dataset=data)
    trainer = FisherTuneTrainer(model=model, args=args(tmp_path, (0, 2, 2)), train_dataset=data)
    trainer.train()  # stage 2: no backward (nothing trains), the estimator still takes every batch
    assert trainer.schedule.last_selection.num_samples == 2 * B
    assert trainer.schedule.state["fraction"] == pytest.approx(FT["delta_max"])
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["stage"] for r in rows] == [2, 2, 3, 3] and all(r["loss"] > 0 for r in rows)


def test_resume_mid_stage_3_is_bit_exact(tmp_path):
    model, data = vit()
    t = (1, 2, 3)
    FisherTuneTrainer(model=model, args=args(tmp_path / "full", t, save_strategy="steps", save_steps=1),
                      train_dataset=data).train()
    model.save_pretrained(tmp_path / "full" / "adapter")
    model2, _ = vit()
    FisherTuneTrainer(model=model2, args=args(tmp_path / "resumed", t), train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))  # one tuning step done, two to go
    model2.save_pretrained(tmp_path / "resumed" / "adapter")
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _loop(build, stages, lr=1e-2, num_samples=None, state_at=None, resume=None, update_steps=None, **ft):
    """The plain-PyTorch loop of docs/trainer.md on the same data, in order; `state_at`: also return the state
    (schedule, weights, optimizer) before that step; `resume`: such a state to start from; `update_steps`: the
    schedule's selection_update_steps."""
    model, data = build(**ft) if ft else build()
    set_seed(42)
    schedule = FisherTuneSchedule(model, *stages, num_samples=len(data) if num_samples is None else num_samples,
                                  selection_update_steps=update_steps)
    opt = torch.optim.AdamW(schedule.param_groups(lr=lr), lr=lr, weight_decay=0.0)
    start = 0
    if resume is not None:
        start, state, weights, opt_state = copy.deepcopy(resume)
        model.load_state_dict(weights)
        schedule.load_state_dict(state)
        opt = torch.optim.AdamW(schedule.param_groups(lr=lr), lr=lr, weight_decay=0.0)
        opt.load_state_dict(opt_state)
    loader = torch.utils.data.DataLoader(data, batch_size=B)
    batches = [b for _ in range(4) for b in loader][: schedule.total_steps]
    saved = None
    for step in range(start, len(batches)):
        batch = batches[step]
        if step == state_at:
            saved = copy.deepcopy((step, schedule.state_dict(), model.state_dict(), opt.state_dict()))
        model.train()
        schedule.before_step(step).apply(opt)
        loss = schedule.loss(model(**batch).loss)
        if loss.requires_grad:
            loss.backward()
        schedule.estimate(batch)
        opt.step()
        opt.zero_grad()
    return model, schedule, saved


def _values(model):
    return [(m.ft_indices["default"].clone(), m.ft_values["default"].detach().clone())
            for m in model.modules() if isinstance(m, FisherTuneLayer)]


@pytest.fixture(scope="module")
def trainer_values(tmp_path_factory):
    """FisherTuneTrainer's candidates and deltas on the ViT, stages (2, 2, 3), data in order, seed 42."""
    model, data = vit()
    set_seed(42)
    out = tmp_path_factory.mktemp("ref")
    FisherTuneTrainer(model=model, args=args(out, (2, 2, 3), seed=42, optim="adamw_torch"), train_dataset=data).train()
    return _values(model)


def test_the_loop_api_gives_the_trainers_selection_and_deltas(trainer_values):
    t = (2, 2, 3)
    looped, schedule, _ = _loop(vit, t)
    assert schedule.last_selection.num_samples == t[1] * B
    for (i1, v1), (i2, v2) in zip(trainer_values, _values(looped)):
        assert torch.equal(i1, i2)  # the same candidates, in the same order
        assert torch.allclose(v1, v2, atol=1e-6)


def test_the_loop_state_dict_round_trips(tmp_path):
    t = (1, 2, 3)
    whole, _, saved = _loop(vit, t, state_at=2)  # saved after stage 1 + one estimation step (estimator running)
    assert saved[1]["estimator"] is not None and saved[1]["ft_state"]["selections"] == 0
    resumed, schedule, _ = _loop(vit, t, resume=saved)
    assert schedule.state["selections"] == 1
    for (i1, v1), (i2, v2) in zip(_values(whole), _values(resumed)):
        assert torch.equal(i1, i2) and torch.equal(v1, v2)
    with pytest.raises(ValueError, match="another stage plan"):
        FisherTuneSchedule(vit()[0], 1, 2, 4, num_samples=8).load_state_dict(saved[1])


def _all_candidates_active(model):
    s = selection_summary(model)
    return s.num_active == s.num_candidates == round(model.peft_config["default"].delta_max * s.num_targeted)


def test_the_last_tuning_step_trains_delta_max_whatever_the_update_interval(tmp_path):
    """δ(t) recomputed every 3 of 5 tuning steps (tuning steps 0 and 3, where t = 3/4 gives δ < δ_max) is
    recomputed on the last tuning step too, so the last step trains δ_max and the adapter leaves with it: in the
    trainer, in the plain loop, and in alternating execution (blocks of 2: 6 tuning steps)."""
    t = (1, 2, 5)
    model, data = vit()
    trainer = FisherTuneTrainer(model=model, args=args(tmp_path / "t", t, selection_update_steps=3),
                                train_dataset=data)
    fractions = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            fractions.append(trainer.schedule.state["fraction"])

    trainer.add_callback(Record())
    trainer.train()
    cfg = model.peft_config["default"]
    d3 = cfg.delta_min * (cfg.delta_max / cfg.delta_min) ** (3 / 4)
    assert fractions[3:] == pytest.approx([cfg.delta_min, cfg.delta_min, cfg.delta_min, d3, cfg.delta_max])
    assert _all_candidates_active(model)
    looped, schedule, _ = _loop(vit, t, update_steps=3)
    assert schedule.state["fraction"] == pytest.approx(cfg.delta_max) and _all_candidates_active(looped)
    model, data = vit()
    trainer = FisherTuneTrainer(model=model, args=args(tmp_path / "a", (1, 5, 5), alternate_steps=2,
                                                       selection_update_steps=3), train_dataset=data)
    trainer.train()
    assert trainer.schedule.state["fraction"] == pytest.approx(cfg.delta_max) and _all_candidates_active(model)


@pytest.mark.parametrize("tune_steps, expected", [(3, 1), (1999, 1), (2000, 2), (28000, 28), (100000, 100)])
def test_the_default_update_interval_scales_with_the_tuning_steps(tune_steps, expected):
    """selection_update_steps=None (the default): δ(t) is recomputed every max(1, tuning steps // 1000) steps, at
    most about 1000 updates a run; an explicit interval is kept; anything else is refused, naming the argument."""
    model, data = vit()
    assert FisherTuneSchedule(model, 0, 2, tune_steps, num_samples=8).selection_update_steps == expected
    assert FisherTuneSchedule(model, 0, 2, tune_steps, num_samples=8,
                              selection_update_steps=7).selection_update_steps == 7
    assert FisherTuneTrainingArguments(output_dir="x", report_to=[]).selection_update_steps is None
    for bad in (0, -1, 1.5, True, "auto"):
        with pytest.raises(ValueError, match=f"selection_update_steps={bad!r}; expected"):
            FisherTuneSchedule(model, 0, 2, tune_steps, num_samples=8, selection_update_steps=bad)


def _delta_norm(model):
    return float(torch.cat([m.ft_values["default"].detach().reshape(-1) for m in model.modules()
                            if isinstance(m, FisherTuneLayer)]).norm())


def test_the_prior_pull_is_applied_and_scaled_by_n():
    t = (0, 2, 4)
    off, _, _ = _loop(vit, t, lr=5e-2, prior_pull=False)
    n1, _, _ = _loop(vit, t, lr=5e-2, num_samples=1)
    big, _, _ = _loop(vit, t, lr=5e-2, num_samples=10**6)
    # the same active set, different deltas: the pull acts, and N = 1 (the literal γ/τ²) pulls hardest
    assert _delta_norm(n1) < 0.8 * _delta_norm(big)
    assert _delta_norm(n1) < 0.8 * _delta_norm(off)
    assert _delta_norm(big) == pytest.approx(_delta_norm(off), rel=0.05)
    model, data = vit()
    with pytest.raises(ValueError, match="num_samples is required"):
        FisherTuneSchedule(model, *t)
    FisherTuneSchedule(model, *t, num_samples=len(data))  # given: fine


def test_a_plain_transformers_trainer_with_the_callback(tmp_path, trainer_values):
    """docs/trainer.md's plain-Trainer recipe: the schedule through FisherTuneCallback gives FisherTuneTrainer's
    selection, the estimator sees every stage-2 batch, and the prior pull is in the loss."""
    from transformers import Trainer, TrainingArguments

    from peft_fishertune import FisherTuneCallback

    t = (2, 2, 3)
    model, data = vit()
    schedule = FisherTuneSchedule(model, *t, num_samples=len(data))
    targs = TrainingArguments(str(tmp_path / "plain"), max_steps=schedule.total_steps, per_device_train_batch_size=B,
                              learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                              train_sampling_strategy="sequential", lr_scheduler_type="constant", max_grad_norm=0.0,
                              disable_tqdm=True, seed=42)
    Trainer(model=model, args=targs, train_dataset=data, callbacks=[FisherTuneCallback(schedule)]).train()
    assert schedule.last_selection.num_samples == t[1] * B
    assert schedule.state["fraction"] == pytest.approx(FT["delta_max"])
    for (i1, v1), (i2, v2) in zip(trainer_values, _values(model)):
        assert torch.equal(i1, i2)
        assert torch.allclose(v1, v2, atol=1e-6)


def test_gradient_accumulation_feeds_every_micro_batch(tmp_path):
    model, data = vit()
    trainer = FisherTuneTrainer(model=model, args=args(tmp_path, (1, 1, 2), gradient_accumulation_steps=2),
                                train_dataset=data)
    trainer.train()
    assert trainer.schedule.last_selection.num_samples == 1 * B * 2  # both micro-batches of the stage-2 step
    assert trainer.schedule.state["fraction"] == pytest.approx(FT["delta_max"])


def test_weights_too_large_for_the_cpu_noise_are_refused_before_the_first_step(monkeypatch):
    """The variational estimator's CPU noise addresses 2**32 elements per tensor. A larger targeted weight is refused
    when the schedule is built (not after stage 1), naming it; with the empirical estimator, which draws no noise,
    the same model is fine. (The limit is lowered here so a small transformers ViT crosses it: fc1 has 2,048.)"""
    from peft_fishertune.fisher import make_estimator, seeds
    from peft_fishertune.fisher.errors import FisherInputError

    monkeypatch.setattr(seeds, "COUNTER_MAX_ELEMENTS", 1500)
    model, data = vit()
    with pytest.raises(ValueError, match=r"2\*\*32 elements.*fc1\.weight \(2,048 elements\)"):
        FisherTuneSchedule(model, 0, 2, 4, num_samples=len(data))
    with pytest.raises(FisherInputError, match="fc1"):
        make_estimator(model, model.peft_config["default"])
    model, data = vit(fisher_estimator="empirical")
    FisherTuneSchedule(model, 0, 2, 4, num_samples=len(data))
