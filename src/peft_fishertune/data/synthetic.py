"""Synthetic street scenes in a clean source style, a GTA5-like style and ACDC-like conditions.

Procedural, vectorized numpy: a pinhole camera 1.6 m above a flat road renders a
street in perspective (road with lane markings, sidewalks, terrain, facades split into
building / vegetation / wall / fence segments, poles with traffic signs and lights,
cars, trucks, buses, persons, sky, sometimes the ego vehicle), with a per-pixel depth
map in metres. Styles then change only the appearance:

- ``clean``: the source domain (Cityscapes-like muted colors).
- ``synthetic``: GTA5-like (saturated, high contrast, warm, sharpened, little noise).
- ``fog``: atmospheric scattering ``I = J t + A (1 - t)``, ``t = exp(-beta d)`` with the depth map.
- ``night``: darkening (gamma), blue cast, light sources (street lamps, head/tail lights)
  as glows, shot + read sensor noise.
- ``rain``: slanted rain streaks, dimming, light haze.
- ``snow``: snow cover on the ground, falling flakes, grey sky, haze.

In-memory use (e.g. unlabeled multi-style images for pretraining)::

    rng = np.random.default_rng(0)
    image, label_ids, depth = render_scene(rng, (512, 256))
    foggy = apply_style(image, "fog", rng, depth=depth, label_ids=label_ids)

On disk: :func:`generate_synthetic_domains` writes one Cityscapes-layout root per style
(``<out>/<style>/leftImg8bit/...``, ``<out>/<style>/gtFine/..._gtFine_labelIds.png``),
each readable with ``load_dgss_dataset("cityscapes", <out>/<style>, split)``. Scene *i*
of a split is the same in every style (paired domains), and everything is a function
of ``seed``. CLI: ``python -m peft_fishertune.data.synthetic --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

STYLES = ("clean", "synthetic", "fog", "night", "rain", "snow")
SOURCE_STYLES = ("clean", "synthetic")
TARGET_STYLES = ("fog", "night", "rain", "snow")

# Cityscapes label IDs used by the renderer
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE = 7, 8, 11, 12, 13, 17
LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON = 19, 20, 21, 22, 23, 24
CAR, TRUCK, BUS, EGO = 26, 27, 28, 1

_BASE_COLORS = {  # RGB 0..1, "clean" look
    ROAD: (0.38, 0.37, 0.39),
    SIDEWALK: (0.60, 0.57, 0.55),
    BUILDING: (0.55, 0.50, 0.45),
    WALL: (0.62, 0.60, 0.52),
    FENCE: (0.45, 0.40, 0.32),
    POLE: (0.35, 0.35, 0.37),
    LIGHT: (0.12, 0.12, 0.10),
    SIGN: (0.80, 0.75, 0.15),
    VEGETATION: (0.25, 0.38, 0.15),
    TERRAIN: (0.45, 0.50, 0.28),
    SKY: (0.62, 0.74, 0.88),
    PERSON: (0.45, 0.20, 0.25),
    CAR: (0.20, 0.25, 0.45),
    TRUCK: (0.55, 0.55, 0.58),
    BUS: (0.75, 0.60, 0.20),
    EGO: (0.08, 0.08, 0.09),
    0: (0.0, 0.0, 0.0),
}
CAM_H = 1.6  # camera height (m)
MAX_DEPTH = 400.0


@lru_cache(maxsize=8)
def _grid(w: int, h: int):
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ys.setflags(write=False)
    xs.setflags(write=False)
    return ys, xs


def smooth_noise(rng: np.random.Generator, w: int, h: int, cell: int = 16) -> np.ndarray:
    """Low-frequency noise in [-1, 1] (H, W) float32: a coarse random grid upsampled bilinearly."""
    small = rng.random((h // cell + 2, w // cell + 2), dtype=np.float32) * 2 - 1
    return np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.BILINEAR))


def _box(lab, img, depth, y0, y1, x0, x1, label, color, d):
    """Paint an axis-aligned box (clipped), label + color + depth."""
    h, w = lab.shape
    y0, y1, x0, x1 = max(int(y0), 0), min(int(round(y1)), h), max(int(x0), 0), min(int(round(x1)), w)
    if y1 <= y0 or x1 <= x0:
        return
    lab[y0:y1, x0:x1] = label
    img[y0:y1, x0:x1] = color
    depth[y0:y1, x0:x1] = d


def render_scene(rng: np.random.Generator, size: tuple[int, int] = (512, 256)):
    """Draw one street scene.

    Returns ``(image uint8 (H, W, 3), label_ids uint8 (H, W) Cityscapes label IDs, depth float32 (H, W) metres)``.
    ``size`` is (W, H).
    """
    w, h = size
    ys, xs = _grid(w, h)
    f = 0.9 * w  # focal length in pixels
    hz = h * rng.uniform(0.36, 0.48)  # horizon row
    vx = w * rng.uniform(0.42, 0.58)  # vanishing point column
    road_half = rng.uniform(3.5, 7.0)
    walk = rng.uniform(2.0, 4.0)
    facade = road_half + walk + rng.uniform(0.0, 1.5)

    colors = {k: np.clip(np.array(c, np.float32) * rng.uniform(0.85, 1.15, 3), 0, 1) for k, c in _BASE_COLORS.items()}
    lab = np.full((h, w), SKY, np.uint8)
    depth = np.full((h, w), MAX_DEPTH, np.float32)

    # ground rows: depth per row, lateral world offset X per pixel
    g0 = min(int(np.floor(hz)) + 1, h - 1)
    d_row = np.minimum(f * CAM_H / np.maximum(ys[g0:, :1] - hz, 0.5), MAX_DEPTH)  # (Hg, 1)
    ax = np.abs(xs[g0:] - vx) * (d_row / f)
    lab[g0:] = np.where(ax < road_half, ROAD, np.where(ax < facade, SIDEWALK, TERRAIN))
    depth[g0:] = d_row

    # facades: per column, the depth where the facade plane |X| = facade meets the ground
    col = xs[0]
    dist = np.maximum(np.abs(col - vx), 1e-3)
    d_col = np.minimum(f * facade / dist, MAX_DEPTH)
    base_col = hz + CAM_H * f / d_col
    # segments along depth: building / vegetation / wall / fence / gap
    kinds = np.array([BUILDING, BUILDING, BUILDING, VEGETATION, VEGETATION, WALL, FENCE, 0])
    height_col = np.zeros(w, np.float32)
    label_col = np.zeros(w, np.uint8)
    tint_col = np.ones((w, 3), np.float32)
    for side in (-1, 1):
        cuts = np.cumsum(rng.uniform(6, 30, 24)) + 2.0
        seg_kind = kinds[rng.integers(0, len(kinds), 25)]
        seg_h = np.where(
            seg_kind == BUILDING,
            rng.uniform(8, 30, 25),
            np.where(seg_kind == VEGETATION, rng.uniform(4, 12, 25), rng.uniform(1.0, 2.5, 25)),
        )
        seg_tint = rng.uniform(0.7, 1.3, (25, 3)).astype(np.float32)
        on_side = (col - vx) * side > 0
        idx = np.searchsorted(cuts, d_col)
        height_col = np.where(on_side, seg_h[idx], height_col)
        label_col = np.where(on_side, seg_kind[idx], label_col)
        tint_col = np.where(on_side[:, None], seg_tint[idx], tint_col)
    # vegetation canopies are bumpy
    bump = 1.0 + 0.25 * np.abs(np.sin(col / (3.0 + 10 * rng.random()) + rng.uniform(0, 6)))
    height_col = np.where(label_col == VEGETATION, height_col * bump, height_col).astype(np.float32)
    top_col = hz - (height_col - CAM_H) * f / d_col
    facade_mask = (ys >= top_col) & (ys < base_col)
    facade_mask &= label_col > 0
    lab = np.where(facade_mask, label_col, lab)
    depth = np.where(facade_mask, d_col.astype(np.float32), depth)

    palette = np.zeros((256, 3), np.float32)
    for k, c in colors.items():
        palette[k] = c
    facade_color = palette[label_col] * tint_col  # (W, 3)
    img = np.where(facade_mask[..., None], facade_color, palette[lab])

    # one brightness factor per pixel: shading, building windows, sky gradient
    factor = 1.0 + 0.12 * smooth_noise(rng, w, h, 24)
    z_world = CAM_H - (ys - hz) * (d_col / f)
    win_cols = (label_col == BUILDING) & (np.mod(d_col, 3.2) < 1.7)
    win = facade_mask & win_cols & (z_world > 2.5) & (np.mod(z_world, 3.0) < 1.5)
    factor *= np.where(win, 0.45, 1.0).astype(np.float32)
    hz_i = max(int(hz), 1)
    factor[:hz_i] *= 0.8 + 0.35 * (ys[:hz_i] / hz)  # sky brightens toward the horizon (facades too: fine)
    img *= factor[..., None]
    # lane markings (still "road")
    mark = (ax < 0.12) & (np.mod(d_row, 9.0) < 4.5) & (lab[g0:] == ROAD)
    img[g0:][mark] = (0.85, 0.85, 0.82)

    # objects, drawn far to near
    objs = []
    for _ in range(rng.integers(2, 7)):  # poles (with signs / lights)
        objs.append(("pole", rng.uniform(5, 80), rng.choice([-1, 1]) * (road_half + rng.uniform(0.3, 1.0))))
    for _ in range(rng.integers(1, 7)):  # vehicles
        lane = rng.uniform(-road_half + 1.2, road_half - 1.2)
        objs.append(("vehicle", rng.uniform(5, 120), lane))
    for _ in range(rng.integers(0, 6)):  # persons on the sidewalks
        objs.append(("person", rng.uniform(4, 50), rng.choice([-1, 1]) * (road_half + rng.uniform(0.4, walk - 0.2))))
    objs.sort(key=lambda o: -o[1])
    for kind, d, x in objs:
        s = f / d  # pixels per metre at this depth
        base = hz + CAM_H * s
        cx = vx + x * s
        if kind == "pole":
            ph, pw = rng.uniform(4, 8), rng.uniform(0.15, 0.3)
            top = base - ph * s
            _box(lab, img, depth, top, base, cx - max(pw * s / 2, 0.5), cx + max(pw * s / 2, 0.5), POLE, colors[POLE], d)
            r = rng.random()
            if r < 0.45:
                sw_, sh_ = rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)
                col_ = colors[SIGN] * rng.uniform(0.6, 1.2, 3)
                _box(lab, img, depth, top, top + sh_ * s, cx - sw_ * s / 2, cx + sw_ * s / 2, SIGN, np.clip(col_, 0, 1), d)
            elif r < 0.75:
                _box(lab, img, depth, top, top + 1.0 * s, cx - 0.2 * s, cx + 0.2 * s, LIGHT, colors[LIGHT], d)
                lamp = (0.9, 0.1, 0.1) if rng.random() < 0.5 else (0.1, 0.9, 0.3)
                _box(lab, img, depth, top + 0.1 * s, top + 0.35 * s, cx - 0.12 * s, cx + 0.12 * s, LIGHT, lamp, d)
        elif kind == "vehicle":
            r = rng.random()
            label, vw, vh = (CAR, 1.8, 1.5) if r < 0.8 else ((TRUCK, 2.4, 3.2) if r < 0.9 else (BUS, 2.5, 3.3))
            color = rng.random(3).astype(np.float32) * 0.8 + 0.1 if label == CAR else colors[label] * rng.uniform(0.8, 1.2, 3)
            body = vh * (0.6 if label == CAR else 1.0)
            _box(lab, img, depth, base - body * s, base, cx - vw * s / 2, cx + vw * s / 2, label, np.clip(color, 0, 1), d)
            if label == CAR:  # cabin with dark windows
                _box(lab, img, depth, base - vh * s, base - body * s + 1, cx - 0.38 * vw * s, cx + 0.38 * vw * s, label,
                     np.clip(color * 0.6, 0, 1), d)
            _box(lab, img, depth, base - 0.35 * s, base, cx - vw * s / 2, cx - 0.25 * vw * s, label, (0.05, 0.05, 0.05), d)
            _box(lab, img, depth, base - 0.35 * s, base, cx + 0.25 * vw * s, cx + vw * s / 2, label, (0.05, 0.05, 0.05), d)
        else:  # person: body + head
            ph, pw = rng.uniform(1.55, 1.9), rng.uniform(0.45, 0.6)
            color = np.clip(colors[PERSON] * rng.uniform(0.5, 1.6, 3), 0, 1)
            _box(lab, img, depth, base - 0.85 * ph * s, base, cx - pw * s / 2, cx + pw * s / 2, PERSON, color, d)
            _box(lab, img, depth, base - ph * s, base - 0.85 * ph * s + 1, cx - 0.2 * s, cx + 0.2 * s, PERSON,
                 (0.8, 0.62, 0.5), d)
    if rng.random() < 0.4:  # ego vehicle hood (label ID 1: ignored in evaluation)
        y0 = int(h * rng.uniform(0.9, 0.96))
        lab[y0:] = EGO
        img[y0:] = colors[EGO]
        depth[y0:] = 1.0

    # fine grain
    img += rng.standard_normal((h, w, 1), dtype=np.float32) * 0.025
    return _to_uint8(img), lab, depth


# ----------------------------------------------------------------------------- styles


def _to_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) * (1.0 / 255.0)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    out = img * 255.0
    out += 0.5
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def _haze(img, depth, beta, airlight):
    t = np.exp(-beta * np.minimum(depth, MAX_DEPTH))[..., None]
    return img * t + np.asarray(airlight, np.float32) * (1 - t)


def _glows(h, w, centers, radii, colors):
    """Sum of Gaussian glows, each computed in its own window."""
    out = np.zeros((h, w, 3), np.float32)
    for (cy, cx), r, c in zip(centers, radii, colors):
        y0, y1 = max(int(cy - 3 * r), 0), min(int(cy + 3 * r) + 1, h)
        x0, x1 = max(int(cx - 3 * r), 0), min(int(cx + 3 * r) + 1, w)
        if y1 <= y0 or x1 <= x0:
            continue
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
        g = np.exp(-(yy * yy + xx * xx) / (2 * r * r))
        out[y0:y1, x0:x1] += g[..., None] * np.asarray(c, np.float32)
    return out


def _light_sources(rng, h, w, label_ids):
    """Lamp positions: on poles, vehicles and traffic lights when the label map is known
    (found among random probe pixels, cheap), plus a few random ones near the horizon band."""
    centers, radii, colors = [], [], []
    if label_ids is not None:
        py = rng.integers(0, h, 4000)
        px = rng.integers(0, w, 4000)
        probe = label_ids[py, px]
        for lid, color, n in ((POLE, (1.0, 0.85, 0.55), 6), (CAR, (1.0, 0.2, 0.15), 8), (TRUCK, (1.0, 0.2, 0.15), 2),
                              (BUS, (1.0, 0.9, 0.7), 2), (LIGHT, (1.0, 0.5, 0.2), 3)):
            hit = np.flatnonzero(probe == lid)[:n]
            for j in hit:
                centers.append((float(py[j]), float(px[j])))
                radii.append(float(rng.uniform(2, 9)))
                colors.append(color)
    for _ in range(rng.integers(2, 6)):
        centers.append((float(rng.uniform(0.2, 0.6) * h), float(rng.uniform(0, w))))
        radii.append(float(rng.uniform(3, 12)))
        colors.append((1.0, 0.8, 0.5))
    return centers, radii, colors


def _streaks(rng, h, w, density, length, slant):
    """Rain streaks: sparse drops smeared along a slanted line (sum of shifted copies)."""
    drops = (rng.random((h, w), dtype=np.float32) < density).astype(np.float32) * rng.uniform(0.5, 1.0)
    out = np.zeros_like(drops)
    for i in range(length):
        out += np.roll(np.roll(drops, i, axis=0), int(round(i * slant)), axis=1)
    return np.clip(out / max(length * 0.35, 1.0), 0, 1)


def apply_style(
    image: np.ndarray,
    style: str,
    rng: np.random.Generator,
    depth: np.ndarray | None = None,
    label_ids: np.ndarray | None = None,
) -> np.ndarray:
    """Re-render ``image`` (H, W, 3 uint8) in ``style`` (one of :data:`STYLES`).

    ``depth`` (metres, from :func:`render_scene`) drives fog/rain/snow haze; without it a
    row-based proxy is used (far at the top). ``label_ids`` places night light sources on
    poles and vehicles and snow on the ground; without it they go to plausible random places.
    """
    if style not in STYLES:
        raise ValueError(f"style={style!r} is not one of {STYLES}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8, got shape {image.shape} dtype {image.dtype}")
    h, w = image.shape[:2]
    if depth is None:
        ys, _ = _grid(w, h)
        depth = np.minimum(0.9 * w * CAM_H / np.maximum(ys - 0.45 * h, 0.5), MAX_DEPTH)
        depth = np.where(ys < 0.45 * h, MAX_DEPTH, depth).astype(np.float32)
    if style == "clean":
        return image.copy()
    img = _to_float(image)
    if style == "synthetic":
        gray = img.mean(2, keepdims=True)
        img = gray + (img - gray) * rng.uniform(1.35, 1.6)  # saturation
        img = (img - 0.5) * rng.uniform(1.15, 1.3) + 0.5 + rng.uniform(0.0, 0.05)  # contrast, brightness
        img = img * np.array([1.06, 1.0, 0.9], np.float32)  # warm cast
        out = Image.fromarray(_to_uint8(img)).filter(ImageFilter.SHARPEN)
        return np.asarray(out)
    if style == "fog":
        visibility = rng.uniform(40, 200)  # metres (meteorological visibility: t = 0.05)
        a = rng.uniform(0.75, 0.95)
        img = _haze(img, depth, 3.0 / visibility, (a, a, a * rng.uniform(1.0, 1.05)))
        img = img * (1.0 + 0.04 * smooth_noise(rng, w, h, 48))[..., None]
        return _to_uint8(img)
    if style == "night":
        # darkening as a per-channel lookup table on the uint8 input: gamma, gain, blue cast
        levels = np.arange(256, dtype=np.float32)[:, None] / 255.0
        lut = np.power(levels, rng.uniform(1.8, 2.6)) * rng.uniform(0.25, 0.45) * np.array([0.75, 0.85, 1.15], np.float32)
        img = lut[image, np.arange(3)]
        img = img + _glows(h, w, *_light_sources(rng, h, w, label_ids)) * rng.uniform(0.6, 1.0)
        ys, _ = _grid(w, h)
        img = img + np.array([0.05, 0.04, 0.03], np.float32) * np.clip(1 - ys / h, 0, 1)[..., None]  # sky glow
        gain = rng.uniform(0.01, 0.03)
        shot = np.sqrt(np.clip(img, 0, None)) * rng.standard_normal((h, w, 1), dtype=np.float32) * gain
        read = rng.standard_normal((h, w, 1), dtype=np.float32) * rng.uniform(0.005, 0.015)
        return _to_uint8(img + shot + read)
    if style == "rain":
        img = img * rng.uniform(0.6, 0.8) + 0.05
        img = _haze(img, depth, 3.0 / rng.uniform(300, 800), (0.55, 0.57, 0.6))
        streaks = _streaks(rng, h, w, rng.uniform(0.002, 0.005), int(rng.integers(8, 16)), rng.uniform(-0.4, 0.4))
        img = img * (1 - 0.5 * streaks[..., None]) + 0.75 * streaks[..., None] * 0.6
        return np.asarray(Image.fromarray(_to_uint8(img)).filter(ImageFilter.SMOOTH))
    # snow
    if label_ids is not None:
        flat = np.isin(label_ids, (ROAD, SIDEWALK, TERRAIN))
    else:
        ys, _ = _grid(w, h)
        flat = ys > 0.55 * h
    cover = np.clip(0.55 + 0.5 * smooth_noise(rng, w, h, 12), 0, 1) * flat
    snow_white = np.array([0.88, 0.9, 0.95], np.float32)
    img = img * (1 - cover[..., None] * 0.85) + snow_white * cover[..., None] * 0.85
    img = _haze(img, depth, 3.0 / rng.uniform(200, 600), (0.8, 0.82, 0.86))
    # flakes: sparse dots drawn at half resolution, upsampled bilinearly into soft blobs
    dots = (rng.random((h // 2, w // 2), dtype=np.float32) < rng.uniform(0.004, 0.01)).astype(np.float32)
    fl = np.asarray(Image.fromarray(dots, mode="F").resize((w, h), Image.BILINEAR))[..., None]
    fl = np.minimum(fl * 1.5, 1.0)
    img = img * (1 - fl) + fl * 0.95
    return _to_uint8(img)


def synthetic_stream(seed: int = 0, styles=STYLES, size: tuple[int, int] = (512, 256)):
    """Endless generator of ``{"image", "label_ids", "depth", "style"}`` (in memory, deterministic by seed)."""
    for s in styles:
        if s not in STYLES:
            raise ValueError(f"style={s!r} is not one of {STYLES}")
    i = 0
    while True:
        rng = np.random.default_rng([seed, 7, i])
        image, lab, depth = render_scene(rng, size)
        style = styles[i % len(styles)]
        yield {"image": apply_style(image, style, rng, depth, lab), "label_ids": lab, "depth": depth, "style": style}
        i += 1


# ----------------------------------------------------------------------------- on disk

_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


def generate_synthetic_domains(
    root: str | Path,
    styles=STYLES,
    num_images: dict[str, int] | None = None,
    size: tuple[int, int] = (512, 256),
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Path]:
    """Write ``<root>/<style>/`` Cityscapes-layout datasets; return ``{style: root/style}``.

    Files: ``<style>/leftImg8bit/<split>/<style>city/<style>city_<i:06d>_000019_leftImg8bit.png`` and
    ``<style>/gtFine/<split>/<style>city/<style>city_<i:06d>_000019_gtFine_labelIds.png``, plus
    ``<root>/synthetic_domains.json`` recording the arguments.
    """
    from tqdm.auto import tqdm

    num_images = {"train": 20, "val": 10} if num_images is None else dict(num_images)
    for s in styles:
        if s not in STYLES:
            raise ValueError(f"style={s!r} is not one of {STYLES}")
    for split, n in num_images.items():
        if split not in _SPLIT_CODE:
            raise ValueError(f"num_images has split {split!r}; allowed: {tuple(_SPLIT_CODE)}")
        if int(n) < 0:
            raise ValueError(f"num_images[{split!r}]={n} must be >= 0")
    w, h = size
    if w < 64 or h < 32:
        raise ValueError(f"size={size} too small; need at least (64, 32)")
    root = Path(root)
    roots = {s: root / s for s in styles}
    total = sum(num_images.values()) * len(styles)
    bar = tqdm(total=total, desc="synthetic domains", unit="img", disable=not progress)
    for split, n in num_images.items():
        for i in range(int(n)):
            scene_rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
            image, lab, depth = render_scene(scene_rng, size)
            for k, style in enumerate(styles):
                style_rng = np.random.default_rng([seed, _SPLIT_CODE[split], i, 1 + STYLES.index(style)])
                out = apply_style(image, style, style_rng, depth, lab)
                city = f"{style}city"
                stem = f"{city}_{i:06d}_000019"
                img_dir = roots[style] / "leftImg8bit" / split / city
                lbl_dir = roots[style] / "gtFine" / split / city
                img_dir.mkdir(parents=True, exist_ok=True)
                lbl_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(out).save(img_dir / f"{stem}_leftImg8bit.png", compress_level=1)
                Image.fromarray(lab.astype(np.uint8)).save(lbl_dir / f"{stem}_gtFine_labelIds.png", compress_level=1)
                bar.update(1)
    bar.close()
    root.mkdir(parents=True, exist_ok=True)
    (root / "synthetic_domains.json").write_text(
        json.dumps({"styles": list(styles), "num_images": num_images, "size": list(size), "seed": seed}, indent=2)
    )
    return roots


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write synthetic street-scene domains in the Cityscapes layout.")
    p.add_argument("--out", required=True, help="output folder; one Cityscapes-layout root per style inside")
    p.add_argument("--styles", nargs="+", default=list(STYLES), choices=STYLES)
    p.add_argument("--train", type=int, default=20, help="images in the train split per style")
    p.add_argument("--val", type=int, default=10, help="images in the val split per style")
    p.add_argument("--size", default="512x256", help="WxH, e.g. 512x256")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        p.error(f"--size must look like 512x256, got {args.size!r}")
    t0 = time.perf_counter()
    roots = generate_synthetic_domains(args.out, tuple(args.styles), {"train": args.train, "val": args.val}, (w, h), args.seed)
    n = (args.train + args.val) * len(args.styles)
    print(f"wrote {n} images in {time.perf_counter() - t0:.1f} s:")
    for s, r in roots.items():
        print(f"  {s:<10} {r}   load_dgss_dataset('cityscapes', '{r}', split='train')")


if __name__ == "__main__":
    main()
