"""Data layer: DGSS datasets as ``datasets.Dataset``, transforms, synthetic domains.

    from peft_fishertune.data import load_dgss_dataset, TrainTransform, collate_fn
    ds = load_dgss_dataset("gta5", "/data/gta5", transform=TrainTransform())
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, collate_fn=collate_fn)
"""

# Built-in datasets register themselves here, explicitly (see registry.py).
from . import acdc, bdd100k, cityscapes, foggy_driving, gta5, mapillary, nighttime_driving, zurich  # noqa: F401
from .labels import (
    CITYSCAPES_LABELS,
    CLASS_NAMES,
    ID_TO_TRAINID,
    IGNORE_INDEX,
    MAPILLARY_V12_TO_TRAINID,
    NUM_CLASSES,
    PALETTE,
    TRAINID_TO_ID,
    build_lut,
    colorize,
    overlay_with_legend,
    train_ids_to_label_ids,
)
from .loading import DGSSDecoder, dgss_config, load_dgss_dataset, with_dgss_transform
from .registry import (
    DatasetFileError,
    DatasetLayoutError,
    DatasetSpec,
    get_spec,
    list_datasets,
    register_dataset,
)
from .synthetic import STYLES, apply_style, generate_synthetic_domains, render_scene, synthetic_stream
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    SegmentationCollator,
    TrainTransform,
    collate_fn,
    denormalize,
    normalize,
)

__all__ = [
    "CITYSCAPES_LABELS",
    "CLASS_NAMES",
    "DGSSDecoder",
    "DatasetFileError",
    "DatasetLayoutError",
    "DatasetSpec",
    "EvalTransform",
    "ID_TO_TRAINID",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAPILLARY_V12_TO_TRAINID",
    "NUM_CLASSES",
    "PALETTE",
    "STYLES",
    "TRAINID_TO_ID",
    "SegmentationCollator",
    "TrainTransform",
    "apply_style",
    "build_lut",
    "collate_fn",
    "colorize",
    "denormalize",
    "dgss_config",
    "generate_synthetic_domains",
    "get_spec",
    "list_datasets",
    "load_dgss_dataset",
    "normalize",
    "overlay_with_legend",
    "register_dataset",
    "render_scene",
    "synthetic_stream",
    "train_ids_to_label_ids",
    "with_dgss_transform",
]
