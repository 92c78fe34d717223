"""How :class:`~captum_consistency.data.SpuriousContextShapes` draws an image.

The seeded label hash, the shapes' geometry, the background clutter, the cue stripes and the
rendering of one image (steps 2 to 5 of the generator described in
:mod:`captum_consistency.data.synthetic`), as functions of the image's parameters and random
streams.
"""

from __future__ import annotations

import colorsys
import math
from typing import Tuple

import numpy as np
from skimage import draw

#: The object classes, in label order; ``num_classes = K`` uses the first ``K``.
SHAPES: Tuple[str, ...] = (
    "disk",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "crescent",
    "bar",
    "hourglass",
    "chevron",
)
"""The object classes of :class:`~captum_consistency.data.SpuriousContextShapes`, in label
order; ``num_classes = K`` uses the first ``K``."""

# Geometry, as fractions of the image size.
_RADIUS_RANGE = (0.13, 0.25)
_CUE_SIZE = 0.17
_CUE_MAX_GAP = 0.04
_STRIPES_PER_CUE = 3.5
_DARK = 0.08

#: Largest object radius (fraction of the image side) that leaves room for the cue beside it.
_MAX_RADIUS_WITH_CUE = _RADIUS_RANGE[1]
_MAX_RADIUS = 0.45


def _check_object_size(value) -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"object_size must be a pair (min, max) of radii, got {value!r}") from None
    if not (0.05 <= lo <= hi <= _MAX_RADIUS):
        raise ValueError(
            f"object_size must satisfy 0.05 <= min <= max <= {_MAX_RADIUS} (circumradius as a "
            f"fraction of the image side), got {value!r}"
        )
    return lo, hi


# Streams of the label hash.
_U_LABEL, _U_CUE_KEEP, _U_CUE_CLASS, _U_STRAY, _U_STRAY_CLASS, _U_CUE_PRESENT = range(6)
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------
# Seeding
# --------------------------------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrap-around arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _hash_uniform(seed: int, split_id: int, index: np.ndarray, stream: int) -> np.ndarray:
    """Uniform float64 in [0, 1) for each index, a pure function of (seed, split, index, stream)."""
    with np.errstate(over="ignore"):
        h = _splitmix64(np.full(index.shape, seed & _MASK64, dtype=np.uint64))
        h = _splitmix64(h ^ np.uint64(split_id))
        h = _splitmix64(h ^ index.astype(np.uint64))
        h = _splitmix64(h ^ np.uint64(stream))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _polygon_mask(
    vertices: np.ndarray, cy: float, cx: float, r: float, theta: float, shape: Tuple[int, int]
) -> np.ndarray:
    """Rasterises unit-circle ``vertices`` ``(V, 2)`` as (x, y), rotated, scaled and shifted."""
    cos, sin = math.cos(theta), math.sin(theta)
    x = vertices[:, 0] * cos - vertices[:, 1] * sin
    y = vertices[:, 0] * sin + vertices[:, 1] * cos
    mask = np.zeros(shape, dtype=bool)
    rr, cc = draw.polygon(cy + r * y, cx + r * x, shape=shape)
    mask[rr, cc] = True
    return mask


def _regular(n: int, phase: float = 0.0) -> np.ndarray:
    a = phase + 2.0 * math.pi * np.arange(n) / n
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def _star(points: int, inner: float) -> np.ndarray:
    a = -math.pi / 2 + math.pi * np.arange(2 * points) / points
    rad = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([rad * np.cos(a), rad * np.sin(a)], axis=1)


_CROSS = np.array(
    [[0.3, -0.95], [0.3, -0.3], [0.95, -0.3], [0.95, 0.3], [0.3, 0.3], [0.3, 0.95],
     [-0.3, 0.95], [-0.3, 0.3], [-0.95, 0.3], [-0.95, -0.3], [-0.3, -0.3], [-0.3, -0.95]]
)  # fmt: skip
_BAR = np.array([[-0.96, -0.27], [0.96, -0.27], [0.96, 0.27], [-0.96, 0.27]])
_HOURGLASS = np.array(
    [[-0.68, -0.72], [0.68, -0.72], [0.1, 0.0], [0.68, 0.72], [-0.68, 0.72], [-0.1, 0.0]]
)
_CHEVRON = np.array([[-0.7, -0.7], [0.98, 0.0], [-0.7, 0.7], [-0.2, 0.0]])
_SQUARE = _regular(4, math.pi / 4)
_TRIANGLE = _regular(3, -math.pi / 2)
_STAR = _star(5, 0.42)


def _shape_mask(
    name: str, cy: float, cx: float, r: float, theta: float, rng: np.random.Generator,
    shape: Tuple[int, int],
) -> np.ndarray:  # fmt: skip
    """Boolean mask of one object; every shape lies within radius ``r`` of ``(cy, cx)``."""
    if name == "disk":
        mask = np.zeros(shape, dtype=bool)
        mask[draw.disk((cy, cx), r, shape=shape)] = True
        return mask
    if name == "ring":
        outer = np.zeros(shape, dtype=bool)
        outer[draw.disk((cy, cx), r, shape=shape)] = True
        outer[draw.disk((cy, cx), r * rng.uniform(0.45, 0.6), shape=shape)] = False
        return outer
    if name == "crescent":
        mask = np.zeros(shape, dtype=bool)
        mask[draw.disk((cy, cx), r, shape=shape)] = True
        off = r * rng.uniform(0.45, 0.6)
        mask[draw.disk((cy + off * math.sin(theta), cx + off * math.cos(theta)), 0.9 * r, shape=shape)] = False
        return mask
    vertices = {
        "square": _SQUARE,
        "triangle": _TRIANGLE,
        "star": _STAR,
        "cross": _CROSS,
        "bar": _BAR,
        "hourglass": _HOURGLASS,
        "chevron": _CHEVRON,
    }[name]
    return _polygon_mask(vertices, cy, cx, r, theta, shape)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _box(mask: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.int64)


def _background(rng: np.random.Generator, n: int, c: float) -> np.ndarray:
    """The ``(n, n, 3)`` float32 background at clutter level ``c`` (step 2 of the generator)."""
    base = rng.uniform(0.3, 0.6)
    img = np.full((n, n, 3), base, dtype=np.float32)
    if c == 0.0:
        return img
    img += (rng.normal(0.0, 0.02, 3) * c).astype(np.float32)
    # A faint linear gradient in a random direction.
    a = rng.uniform(0.0, 2.0 * math.pi)
    ramp = (np.cos(a) * np.arange(n)[None, :] + np.sin(a) * np.arange(n)[:, None]) / n
    img += (0.1 * c * (ramp - ramp.mean())).astype(np.float32)[..., None]
    # Low-contrast, unsaturated ellipses, rasterised together: (B, H, W) membership, then one
    # weighted sum of their tone offsets (one array pass instead of a Python loop over
    # skimage.draw.ellipse).
    nb = rng.poisson(8.0 * c)
    if nb:
        q = rng.random((nb, 6), dtype=np.float32)
        cy, cx = q[:, 0] * n, q[:, 1] * n
        iry, irx = 1.0 / ((0.04 + 0.16 * q[:, 2]) * n), 1.0 / ((0.04 + 0.16 * q[:, 3]) * n)
        cos, sin = np.cos(np.float32(math.pi) * q[:, 4]), np.sin(np.float32(math.pi) * q[:, 4])
        grid = np.arange(n, dtype=np.float32)
        dy = (grid[None, :] - cy[:, None])[:, :, None]  # (B, H, 1)
        dx = (grid[None, :] - cx[:, None])[:, None, :]  # (B, 1, W)
        u = dx * (cos * irx)[:, None, None] + dy * (sin * irx)[:, None, None]
        v = dy * (cos * iry)[:, None, None] - dx * (sin * iry)[:, None, None]
        u *= u
        v *= v
        inside = (u + v < 1.0).astype(np.float32).reshape(nb, n * n)
        tone = 0.06 * (2.0 * q[:, 5:6] - 1.0) + rng.normal(0.0, 0.008, (nb, 3))
        img += (inside.T @ tone.astype(np.float32)).reshape(n, n, 3)
    # Faint anti-aliased lines.
    nl = rng.poisson(6.0 * c)
    if nl:
        ends = rng.integers(0, n, (nl, 4))
        tones = (base + np.where(rng.random(nl) < 0.5, -1.0, 1.0) * rng.uniform(0.08, 0.15, nl))
        for (y0, x0, y1, x1), t in zip(ends.tolist(), tones.astype(np.float32)):
            rr, cc, val = draw.line_aa(y0, x0, y1, x1)
            keep = (rr >= 0) & (rr < n) & (cc >= 0) & (cc < n)
            rr, cc, val = rr[keep], cc[keep], val[keep].astype(np.float32)[:, None]
            img[rr, cc] = (1.0 - val) * img[rr, cc] + val * t
    # Uniform pixel noise of std 0.03 clutter (uniform: cheaper to draw than Gaussian).
    img += (rng.random((n, n, 3), dtype=np.float32) - 0.5) * np.float32(0.03 * c * math.sqrt(12.0))
    return img


def _cue_patch(cls: int, k: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """``(side, side, 3)`` stripes of class ``cls``: angle ``pi cls / K``, hue ``cls / K``."""
    angle = math.pi * cls / k + rng.uniform(-0.05, 0.05)
    period = side / _STRIPES_PER_CUE
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    phase = 2.0 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period
    on = np.cos(phase + rng.uniform(0.0, 2.0 * math.pi)) > 0
    color = _hsv(cls / k, 1.0, 0.95)
    return np.where(on[..., None], color, np.float32(_DARK)).astype(np.float32)


def render(
    index: int, label: int, cue_label: int, stray_label: int, n: int, num_classes: int,
    object_size: Tuple[float, float], clutter: float, rng: np.random.Generator,
    clutter_rng: np.random.Generator,
) -> dict:  # fmt: skip
    """Image ``index`` of the generator (steps 2 to 5) as a dict of NumPy arrays and labels.

    ``rng`` draws the geometry and ``clutter_rng`` the background, so that the geometry does not
    depend on the clutter; ``stray_label`` is returned as ``-1`` when no place was found for
    the stray cue.
    """
    shape = (n, n)
    img = _background(clutter_rng, n, clutter)

    # Object.
    r = rng.uniform(*object_size) * n
    theta = rng.uniform(0.0, 2.0 * math.pi)
    cy, cx = rng.uniform(r + 1.0, n - r - 2.0, 2)
    mask = _shape_mask(SHAPES[label], cy, cx, r, theta, rng, shape)
    color = _hsv(rng.uniform(), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    rr, cc = np.nonzero(mask)
    g, a = rng.uniform(0.0, 0.15), rng.uniform(0.0, 2.0 * math.pi)
    shade = 1.0 + g * ((cc - cx) * math.cos(a) + (rr - cy) * math.sin(a)) / r
    img[rr, cc] = color[None, :] * shade[:, None].astype(np.float32)
    box = _box(mask)

    # Cue beside the object's box, on a side where it fits.
    side = max(5, round(_CUE_SIZE * n))
    gap = int(rng.integers(1, max(1, round(_CUE_MAX_GAP * n)) + 1))
    x1, y1, x2, y2 = box
    sides = []
    if x1 - gap - side >= 0:
        sides.append(("x", x1 - gap - side))
    if x2 + gap + side <= n - 1:
        sides.append(("x", x2 + gap + 1))
    if y1 - gap - side >= 0:
        sides.append(("y", y1 - gap - side))
    if y2 + gap + side <= n - 1:
        sides.append(("y", y2 + gap + 1))
    # Only objects without a cue can be too large for one (checked in __init__).
    axis, start = sides[int(rng.integers(len(sides)))] if sides else ("x", 0)
    if axis == "x":
        centre = (y1 + y2) / 2 + rng.uniform(-0.25, 0.25) * (y2 - y1)
        cue_y, cue_x = int(np.clip(round(centre - side / 2), 0, n - side)), int(start)
    else:
        centre = (x1 + x2) / 2 + rng.uniform(-0.25, 0.25) * (x2 - x1)
        cue_y, cue_x = int(start), int(np.clip(round(centre - side / 2), 0, n - side))
    # The cue's geometry is drawn even when the image has no cue, so that the rest of the
    # image (stray cue) is the same whatever cue_prob.
    patch = _cue_patch(max(cue_label, 0), num_classes, side, rng)
    cue_mask = np.zeros(shape, dtype=bool)
    cue_box = np.array([cue_x, cue_y, cue_x + side - 1, cue_y + side - 1], dtype=np.int64)
    busy = [(x1, y1, x2, y2, max(2, side // 2))]
    if cue_label >= 0:
        img[cue_y : cue_y + side, cue_x : cue_x + side] = patch
        cue_mask[cue_y : cue_y + side, cue_x : cue_x + side] = True
        busy.append((*cue_box, 2))
    else:
        cue_box = np.full(4, -1, dtype=np.int64)

    # Stray cue, away from the object and the cue (rejection sampling; may give up).
    stray_mask = np.zeros(shape, dtype=bool)
    if stray_label >= 0:
        for _ in range(20):
            sy, sx = rng.integers(0, n - side + 1, 2)
            if all(
                sx + side - 1 < bx1 - m or sx > bx2 + m or sy + side - 1 < by1 - m or sy > by2 + m
                for bx1, by1, bx2, by2, m in busy
            ):
                img[sy : sy + side, sx : sx + side] = _cue_patch(stray_label, num_classes, side, rng)
                stray_mask[sy : sy + side, sx : sx + side] = True
                break
        else:
            stray_label = -1

    np.clip(img, 0.0, 1.0, out=img)
    return {
        "image": (img * 255.0 + 0.5).astype(np.uint8),
        "label": label,
        "mask": mask,
        "box": box,
        "cue_mask": cue_mask,
        "cue_box": cue_box,
        "cue_label": cue_label,
        "stray_mask": stray_mask,
        "stray_label": stray_label,
        "index": index,
    }
