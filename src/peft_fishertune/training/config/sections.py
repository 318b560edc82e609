"""The four sections of an experiment config as typed dataclasses (their defaults are a run's defaults), the error
every config mistake raises, the field-type rules, and the `--help` text listing every key."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from ..methods import method_names
from .errors import ConfigError  # noqa: F401 - re-exported: every config module raises it

METHODS = method_names()  # the rows of training/methods.py
SPARSE_METHODS = method_names(sparse=True)
SECTIONS = ("model", "data", "method", "training")
STAGE_KEYS = ("stage1_steps", "stage2_steps", "stage3_steps")
# data fault options of `load_dgss_dataset` (peft_fishertune.data.loading / registry)
ON_FAULT = ("error", "skip")
VERIFY = ("auto", "none", "headers", "full")
UNKNOWN_LABEL = ("error", "ignore")
SIZE_MISMATCH = ("resize_image", "resize_label", "skip", "error")
# the evaluation settings a config without data.eval_protocol gets for the keys it leaves out
CUSTOM_PROTOCOL_DEFAULTS = {"test_scale": [1024, 512], "eval_mode": "slide", "window": [512, 512],
                            "stride": [341, 341]}


@dataclass
class DatasetEntry:
    """One dataset of the run: the training source or an evaluation target."""

    name: str = field(metadata={"help": "a registered dataset (peft_fishertune.data.list_datasets())."})
    root: str = field(metadata={"help": "the folder the official archives were unpacked into (docs/data.md)."})
    split: str = field(default="val", metadata={"help": "a split of that dataset (GTA5 'all' = the 24,966 images)."})
    condition: Optional[str] = field(default=None, metadata={"help": "ACDC: fog / night / rain / snow."})
    label: Optional[str] = field(default=None, metadata={"help": "the domain's name in tables (default name[/condition])."})
    max_images: Optional[int] = field(default=None, metadata={"help": "evaluate on the first N images only."})
    on_fault: str = field(default="error", metadata={"help": f"a faulty or unlabelled image: one of {ON_FAULT}."})
    verify: str = field(default="auto", metadata={
        "help": f"scan files when the run's data is built: one of {VERIFY}; auto = full for an evaluation set (every "
                "image and label decoded, cached per file by size/mtime), none for the training set."})
    unknown_label: str = field(default="error", metadata={"help": f"a raw mask value outside the table: {UNKNOWN_LABEL}."})
    size_mismatch: Optional[str] = field(
        default=None, metadata={"help": f"image/label of different size: {SIZE_MISMATCH} (None = dataset default)."})

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        return f"{self.name}/{self.condition}" if self.condition else self.name

    def loader_options(self) -> dict[str, Any]:
        """The keyword arguments of `load_dgss_dataset` this entry sets."""
        return {"split": self.split, "condition": self.condition, "on_fault": self.on_fault, "verify": self.verify,
                "unknown_label": self.unknown_label, "size_mismatch": self.size_mismatch}


@dataclass
class ModelSection:
    backbone: str = field(default="dinov2", metadata={"help": "a registered backbone (models.BACKBONES)."})
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "a hub id or a local checkpoint directory holding config.json."})
    tiny_backbone: Optional[dict] = field(
        default=None, metadata={"help": "build a small random-init backbone from tiny_config(**this) instead."})
    decoder: str = field(default="mask2former", metadata={"help": "mask2former | linear | upernet."})
    decoder_config: Optional[dict] = field(default=None, metadata={"help": "Mask2FormerConfig fields."})
    pyramid_channels: int = field(default=256, metadata={"help": "channels of the ViTDet-style feature pyramid."})
    num_labels: int = field(default=19, metadata={"help": "classes (19 Cityscapes trainIds)."})
    out_indices: Optional[list] = field(default=None, metadata={"help": "backbone blocks feeding the decoder."})
    candidate_kinds: list = field(default_factory=lambda: ["linear"],
                                  metadata={"help": "which backbone weights FisherTune may select."})


@dataclass
class DataSection:
    train: Optional[DatasetEntry] = field(default=None, metadata={"help": "the source dataset (required)."})
    eval: list[DatasetEntry] = field(default_factory=list, metadata={"help": "the target datasets (at least one)."})
    synthetic: Optional[dict] = field(
        default=None, metadata={"help": "generate synthetic domains first: {root, styles, num_images, size, seed}."})
    crop_size: list = field(default_factory=lambda: [512, 512], metadata={"help": "training crop (h, w)."})
    base_scale: list = field(default_factory=lambda: [1024, 512], metadata={"help": "resize before crop (long, short)."})
    ratio_range: list = field(default_factory=lambda: [0.5, 2.0], metadata={"help": "random rescale range."})
    cat_max_ratio: float = field(default=0.75, metadata={"help": "max share of one class in a crop (mmseg)."})
    photometric: bool = field(default=True, metadata={"help": "photometric distortion when training."})
    eval_protocol: Optional[str] = field(
        default=None, metadata={"help": "a published test protocol by name (rein, rein-1024, soma, soma-tta, soma-1024, "
                                        "tqdm, whole; docs/evaluation.md): its test scale per dataset, mode, window, "
                                        "stride, half-size Mapillary and TTA. null: the four keys below (custom)."})
    test_scale: Optional[list] = field(
        default=None, metadata={"help": "test resize (long, short); null = the protocol's, or 1024x512 without "
                                        "eval_protocol."})
    eval_mode: Optional[str] = field(
        default=None, metadata={"help": "slide | whole; null = the protocol's, or slide without eval_protocol."})
    window: Optional[list] = field(
        default=None, metadata={"help": "sliding window (h, w); null = the protocol's, or 512x512."})
    stride: Optional[list] = field(
        default=None, metadata={"help": "sliding stride (h, w), <= window; null = the protocol's, or 341x341."})
    eval_max_images: Optional[int] = field(
        default=None, metadata={"help": "evaluate every target on at most N images (an entry's own max_images "
                                        "wins when smaller); for smoke runs (configs/quick.yaml)."})
    selection_holdout: Optional[float] = field(
        default=None, metadata={"help": "hold out this fraction (0 < f < 1) of the source training set as the "
                                        "model-selection set (removed from training, chosen by selection_seed); "
                                        "evaluated as domain selection/<source>, outside the target mean; "
                                        "metric_for_best_model: selection_mIoU ranks on it."})
    selection_set: Optional[DatasetEntry] = field(
        default=None, metadata={"help": "or a dataset {name, root, split} as the model-selection set (e.g. the "
                                        "source's val split); not with selection_holdout."})
    selection_seed: int = field(default=0, metadata={"help": "seed of the held-out images (selection_holdout)."})

    def __post_init__(self):
        if self.eval_protocol is None:  # a custom protocol: these defaults (Rein's numbers for Cityscapes)
            for key, default in CUSTOM_PROTOCOL_DEFAULTS.items():
                if getattr(self, key) is None:
                    setattr(self, key, list(default) if isinstance(default, list) else default)


@dataclass
class MethodSection:
    name: str = field(default="fishertune", metadata={"help": f"one of {list(METHODS)}."})
    lora_r: int = field(default=16, metadata={"help": "rank of the LoRA baseline."})
    selection_update_steps: Optional[int] = field(
        default=None, metadata={"help": "recompute δ(t) every this many stage-3 steps (< the stage-3 steps), and on the "
                                        "last one; null: every max(1, stage-3 steps // 1000)."})
    fishertune: dict = field(default_factory=dict,
                             metadata={"help": "FisherTuneConfig fields (target_modules come from the model)."})
    rein: dict = field(default_factory=dict,
                       metadata={"help": "ReinConfig fields for method.name: rein (token_length, rank, ...)."})
    peft_config: Optional[dict] = field(
        default=None, metadata={"help": "method.name: peft: any PEFT config ({peft_type: LORA, r: 8, ...}); for the "
                                        "PEFT baseline rows, overrides of their config's fields."})


@dataclass
class ExperimentConfig:
    model: ModelSection
    data: DataSection
    method: MethodSection
    training: Any  # FisherTuneTrainingArguments (None when loaded with training=False)
    source: str = "<dict>"
    resolved: dict = field(default_factory=dict)  # the four sections as run: file + overrides, plain YAML types


SECTION_CLASSES = {"model": ModelSection, "data": DataSection, "method": MethodSection}


def training_class():
    """`FisherTuneTrainingArguments`: the type of the `training:` section (imported when first needed)."""
    from ..trainer import FisherTuneTrainingArguments

    return FisherTuneTrainingArguments


# ------------------------------------------------------------------------------------------------ field types


def hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def fmt(ann) -> str:
    """A field type as a reader writes it (`int | None`, `one of ['a', 'b']`)."""
    origin = typing.get_origin(ann)
    if origin is Literal:
        return f"one of {list(typing.get_args(ann))}"
    if origin in (Union, types.UnionType):
        return " | ".join(fmt(a) for a in typing.get_args(ann))
    if ann is type(None):
        return "None"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(fmt(a) for a in typing.get_args(ann))}]"
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def type_ok(value, annotation) -> bool:
    """Whether a YAML value fits a field type (no coercion: `1` is no float's text, `True` no integer)."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(type_ok(value, a) for a in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, annotation) or value in {m.value for m in annotation}
    if origin is not None:
        annotation = origin
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, (dict, annotation))
    return isinstance(value, annotation)


# ------------------------------------------------------------------------------------------------ --help


def describe_sections(width: int = 100) -> str:
    """Every key of the model / data / method sections and of a dataset entry, with its type, default and help;
    then the training fields FisherTune adds or whose default it changes (for `scripts/train.py --help`)."""
    import textwrap

    def rows(cls, prefix: str, only=None) -> list[str]:
        out, types_ = [], hints(cls)
        for f in dataclasses.fields(cls):
            if only is not None and f.name not in only:
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default.value if isinstance(f.default, enum.Enum) else f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "(required)"
            out.append(f"  --{prefix}{f.name} ({fmt(types_[f.name])}, default {default!r})")
            if f.metadata.get("help"):
                out += textwrap.wrap(f.metadata["help"], width, initial_indent=" " * 6, subsequent_indent=" " * 6)
        return out

    own = set(training_class().__annotations__)  # declared (or re-declared) by FisherTuneTrainingArguments
    lines = ["config sections (YAML keys; override any with --<section>.<key> VALUE; a mapping given as VALUE is",
             "merged key by key into the file's, a list replaces it; a file may start from others with",
             "_base_: other.yaml or a list of files, see docs/training.md):", ""]
    lines += ["model:"] + rows(ModelSection, "model.") + [""]
    lines += ["data:"] + rows(DataSection, "data.") + [""]
    lines += ["a dataset entry (data.train, data.eval.<i>):"] + rows(DatasetEntry, "data.train.") + [""]
    lines += ["method:"] + rows(MethodSection, "method.") + ["  --method.fishertune.<field>: any FisherTuneConfig field", ""]
    lines += ["training: every transformers.TrainingArguments field, plus (or with FisherTune's default):"]
    lines += rows(training_class(), "training.", only=own)
    lines += ["  (stage1_steps, stage2_steps and stage3_steps must be written in the config: a forgotten one would",
              "  silently start a run of the paper's length)"]
    return "\n".join(lines)
