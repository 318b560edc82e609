"""The official Cityscapes label table and the lookup tables built from it.

Every loader delivers the 19 Cityscapes *trainIds* (0..18) with 255 = ignore.
Raw masks come in three encodings, each turned into trainIds by a 256-entry
lookup table (LUT) plus a validity table, so a raw value outside the table is
detected instead of silently becoming "ignore":

- ``"labelIds"`` (Cityscapes gtFine, GTA5, Nighttime Driving): Cityscapes label
  IDs 0..33; 255 (the license plate's id -1 written as uint8) is accepted as
  ignore.
- ``"trainIds"`` (ACDC, BDD100K, Foggy Zurich/Driving, Dark Zurich): 0..18 and
  255 pass through unchanged.
- ``"mapillary"`` (Mapillary Vistas v1.2, 66 classes 0..65): mapped to the 19
  classes by :data:`MAPILLARY_V12_TO_TRAINID` (the table used by DG papers,
  see docs/data.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255
NUM_CLASSES = 19


@dataclass(frozen=True)
class Label:
    name: str
    id: int
    train_id: int  # 255 = ignored in training and evaluation
    category: str
    color: tuple[int, int, int]


# Official table (cityscapesScripts, helpers/labels.py), restated.
CITYSCAPES_LABELS: tuple[Label, ...] = (
    Label("unlabeled", 0, 255, "void", (0, 0, 0)),
    Label("ego vehicle", 1, 255, "void", (0, 0, 0)),
    Label("rectification border", 2, 255, "void", (0, 0, 0)),
    Label("out of roi", 3, 255, "void", (0, 0, 0)),
    Label("static", 4, 255, "void", (0, 0, 0)),
    Label("dynamic", 5, 255, "void", (111, 74, 0)),
    Label("ground", 6, 255, "void", (81, 0, 81)),
    Label("road", 7, 0, "flat", (128, 64, 128)),
    Label("sidewalk", 8, 1, "flat", (244, 35, 232)),
    Label("parking", 9, 255, "flat", (250, 170, 160)),
    Label("rail track", 10, 255, "flat", (230, 150, 140)),
    Label("building", 11, 2, "construction", (70, 70, 70)),
    Label("wall", 12, 3, "construction", (102, 102, 156)),
    Label("fence", 13, 4, "construction", (190, 153, 153)),
    Label("guard rail", 14, 255, "construction", (180, 165, 180)),
    Label("bridge", 15, 255, "construction", (150, 100, 100)),
    Label("tunnel", 16, 255, "construction", (150, 120, 90)),
    Label("pole", 17, 5, "object", (153, 153, 153)),
    Label("polegroup", 18, 255, "object", (153, 153, 153)),
    Label("traffic light", 19, 6, "object", (250, 170, 30)),
    Label("traffic sign", 20, 7, "object", (220, 220, 0)),
    Label("vegetation", 21, 8, "nature", (107, 142, 35)),
    Label("terrain", 22, 9, "nature", (152, 251, 152)),
    Label("sky", 23, 10, "sky", (70, 130, 180)),
    Label("person", 24, 11, "human", (220, 20, 60)),
    Label("rider", 25, 12, "human", (255, 0, 0)),
    Label("car", 26, 13, "vehicle", (0, 0, 142)),
    Label("truck", 27, 14, "vehicle", (0, 0, 70)),
    Label("bus", 28, 15, "vehicle", (0, 60, 100)),
    Label("caravan", 29, 255, "vehicle", (0, 0, 90)),
    Label("trailer", 30, 255, "vehicle", (0, 0, 110)),
    Label("train", 31, 16, "vehicle", (0, 80, 100)),
    Label("motorcycle", 32, 17, "vehicle", (0, 0, 230)),
    Label("bicycle", 33, 18, "vehicle", (119, 11, 32)),
    Label("license plate", -1, -1, "vehicle", (0, 0, 142)),
)

NAME_TO_LABEL = {lab.name: lab for lab in CITYSCAPES_LABELS}
ID_TO_TRAINID: dict[int, int] = {
    lab.id: (IGNORE_INDEX if lab.train_id < 0 else lab.train_id) for lab in CITYSCAPES_LABELS
}

# The 19 evaluated classes, in trainId order.
CLASS_NAMES: tuple[str, ...] = tuple(
    lab.name for lab in sorted((l for l in CITYSCAPES_LABELS if 0 <= l.train_id < 255), key=lambda l: l.train_id)
)
assert len(CLASS_NAMES) == NUM_CLASSES

# Palette indexed by trainId (19 rows); ignore is drawn black.
PALETTE = np.array(
    [next(l.color for l in CITYSCAPES_LABELS if l.train_id == t) for t in range(NUM_CLASSES)], dtype=np.uint8
)

# Mapillary Vistas v1.2 (66 classes, index = value in the label PNG) -> trainId.
# The mapping of the DG/UDA literature's "Mapillary -> Cityscapes 19" conversion
# (used by the mmsegmentation-based line DAFormer/HRDA/Rein). Unlisted -> 255.
MAPILLARY_V12_TO_TRAINID: dict[int, int] = {
    13: 0,  # construction--flat--road
    24: 0,  # marking--general (lane marking)
    41: 0,  # object--manhole
    2: 1,  # construction--barrier--curb
    15: 1,  # construction--flat--sidewalk
    17: 2,  # construction--structure--building
    6: 3,  # construction--barrier--wall
    3: 4,  # construction--barrier--fence
    45: 5,  # object--support--pole
    47: 5,  # object--support--utility-pole
    48: 6,  # object--traffic-light
    50: 7,  # object--traffic-sign--front
    30: 8,  # nature--vegetation
    29: 9,  # nature--terrain
    27: 10,  # nature--sky
    19: 11,  # human--person
    20: 12,  # human--rider--bicyclist
    21: 12,  # human--rider--motorcyclist
    22: 12,  # human--rider--other-rider
    55: 13,  # object--vehicle--car
    61: 14,  # object--vehicle--truck
    54: 15,  # object--vehicle--bus
    58: 16,  # object--vehicle--on-rails
    57: 17,  # object--vehicle--motorcycle
    52: 18,  # object--vehicle--bicycle
}
MAPILLARY_V12_NUM_CLASSES = 66

LABEL_FORMATS = ("labelIds", "trainIds", "mapillary")


def build_lut(label_format: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(lut, valid)``: uint8 arrays of 256 entries; ``lut[raw]`` is the
    trainId, ``valid[raw]`` says whether ``raw`` is a value the format defines."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    valid = np.zeros(256, dtype=bool)
    if label_format == "labelIds":
        for raw, tid in ID_TO_TRAINID.items():
            raw = raw % 256  # license plate -1 is stored as 255
            lut[raw] = tid
            valid[raw] = True
    elif label_format == "trainIds":
        lut[:NUM_CLASSES] = np.arange(NUM_CLASSES, dtype=np.uint8)
        valid[:NUM_CLASSES] = True
        valid[IGNORE_INDEX] = True
    elif label_format == "mapillary":
        valid[:MAPILLARY_V12_NUM_CLASSES] = True
        for raw, tid in MAPILLARY_V12_TO_TRAINID.items():
            lut[raw] = tid
    else:
        raise ValueError(f"label_format={label_format!r} is not one of {LABEL_FORMATS}")
    return lut, valid


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """trainId map (H, W) -> RGB uint8 (H, W, 3) in the Cityscapes palette; ignore is black."""
    train_ids = np.asarray(train_ids)
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:NUM_CLASSES] = PALETTE
    return table[train_ids.astype(np.uint8)]


# trainId -> Cityscapes label ID (the 19 evaluated classes), for benchmark submissions (*_labelIds.png)
TRAINID_TO_ID: dict[int, int] = {
    lab.train_id: lab.id for lab in CITYSCAPES_LABELS if 0 <= lab.train_id < NUM_CLASSES
}


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """trainId map -> Cityscapes label IDs (uint8; 255 / unknown -> 0 = unlabeled), as the benchmark server expects."""
    table = np.zeros(256, dtype=np.uint8)
    for t, i in TRAINID_TO_ID.items():
        table[t] = i
    return table[np.asarray(train_ids).astype(np.uint8)]


def overlay_with_legend(image, train_ids: np.ndarray, alpha: float = 0.5):
    """PIL RGB: ``image`` blended with the colorized ``train_ids`` (alpha of the colors), and on its right a legend
    (swatch, class name, share of the pixels) of the classes present, largest first."""
    from PIL import Image, ImageDraw, ImageFont

    train_ids = np.asarray(train_ids)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    blend = (base * (1 - alpha) + colorize(train_ids).astype(np.float32) * alpha).round().astype(np.uint8)
    counts = np.bincount(train_ids.ravel().astype(np.int64), minlength=256)
    present = [int(t) for t in np.argsort(-counts) if counts[t] > 0]
    font = ImageFont.load_default()
    row, pad = 14, 6
    names = [CLASS_NAMES[t] if t < NUM_CLASSES else ("ignore" if t == IGNORE_INDEX else f"class {t}") for t in present]
    width = 10 + pad * 3 + max(int(font.getlength(f"{n} 100.0%")) for n in names) + pad
    h = max(blend.shape[0], pad * 2 + row * len(present))
    canvas = Image.new("RGB", (blend.shape[1] + width, h), (255, 255, 255))
    canvas.paste(Image.fromarray(blend), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0 = blend.shape[1] + pad
    for k, (t, n) in enumerate(zip(present, names)):
        y = pad + k * row
        color = tuple(int(c) for c in PALETTE[t]) if t < NUM_CLASSES else (0, 0, 0)
        draw.rectangle([x0, y + 1, x0 + 10, y + 11], fill=color, outline=(0, 0, 0))
        draw.text((x0 + 10 + pad, y), f"{n} {100 * counts[t] / train_ids.size:.1f}%", fill=(0, 0, 0), font=font)
    return canvas
