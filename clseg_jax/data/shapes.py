"""Procedural shapes streams: 1-3 filled shapes per image, segmented by shape type.

Classes: 0 background, 1 circle, 2 square, 3 triangle, 4 cross (plus sign). Images are uint8
``[N,S,S,3]`` and labels uint8 ``[N,S,S]`` with full labels (later shapes overwrite earlier ones).

* ``make_domain``: domain-incremental, the same four classes under different looks (palette,
  stripes/noise/checker textures, blur, contrast). Shape colours are drawn per shape from the
  domain's palette, independently of the class, so only the geometry identifies the class.
  ``binary=True`` labels every shape as one foreground class (background / shape), the setting
  of domain-incremental medical segmentation (one organ, new scanners): learnt in tens of steps
  by a small UNet, so it is the stream of the behaviour tests.
* ``make_class``: class-incremental, ``classes_per_step`` classes arrive per experience in one
  fixed "plain" look; each image of experience t holds at least one shape of step t's classes,
  drawn last so it is always visible.

The small vectorised pixel helpers (``hsv_to_rgb``, ``box_blur``, ``smooth_noise``, ``stripes``)
and the config reader ``settings`` are public because the digits stream reuses them. Everything is
deterministic given ``cfg.seed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import ml_collections
import numpy as np

from clseg_jax.data import base, checks, class_steps

NUM_CLASSES = 5
CLASS_NAMES = ("background", "circle", "square", "triangle", "cross")
BINARY_CLASS_NAMES = ("background", "shape")

# Stream ids mixed into the RNG seed so different streams/splits never share random draws.
_DOMAIN_STREAM, _CLASS_STREAM = 11, 12
_TRAIN, _TEST = 0, 1


# --------------------------------------------------------------------------- pixel helpers


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; inputs broadcastable floats in [0,1], output ``[..., 3]`` in [0,1]."""
    h, s, v = np.broadcast_arrays(np.asarray(h, np.float32), s, v)
    i = np.floor(h * 6.0).astype(np.int32) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1).astype(np.float32)


def box_blur(images: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur of float ``[N,H,W,C]`` with a ``2*radius+1`` window (edge padding)."""
    if radius <= 0:
        return images
    k = 2 * radius + 1
    out = images
    for axis in (1, 2):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius + 1, radius)
        c = np.cumsum(np.pad(out, pad, mode="edge"), axis=axis, dtype=np.float32)
        n = out.shape[axis]
        hi = np.take(c, np.arange(k, k + n), axis=axis)
        lo = np.take(c, np.arange(0, n), axis=axis)
        out = (hi - lo) / k
    return out


def smooth_noise(
    rng: np.random.Generator, n: int, size: int, cells: int, channels: int = 3
) -> np.ndarray:
    """Low-frequency noise ``[n,size,size,channels]`` in [0,1]: coarse grid, upsampled, blurred."""
    coarse = rng.random((n, cells, cells, channels), dtype=np.float32)
    idx = np.minimum(np.arange(size) * cells // size, cells - 1)
    up = coarse[:, idx][:, :, idx]
    return box_blur(up, max(1, size // (2 * cells)))


def stripes(rng: np.random.Generator, n: int, size: int, period: tuple[float, float]) -> np.ndarray:
    """Random-orientation square-wave stripes ``[n,size,size]`` in {0,1}, one pattern per image."""
    theta = rng.uniform(0, np.pi, (n, 1, 1))
    per = rng.uniform(*period, (n, 1, 1))
    phase = rng.uniform(0, 1, (n, 1, 1))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    proj = xx[None] * np.cos(theta) + yy[None] * np.sin(theta)
    return (((proj / per + phase) % 1.0) < 0.5).astype(np.float32)


def _checker(rng: np.random.Generator, n: int, size: int, period: tuple[int, int]) -> np.ndarray:
    """Axis-aligned checkerboard ``[n,size,size]`` in {0,1} with a random cell size per image."""
    cell = rng.integers(period[0], period[1] + 1, (n, 1, 1))
    off = rng.integers(0, 8, (n, 2, 1, 1))
    yy, xx = np.mgrid[0:size, 0:size]
    return ((((yy[None] + off[:, 0]) // cell) + ((xx[None] + off[:, 1]) // cell)) % 2).astype(
        np.float32
    )


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0,1] -> uint8 (rounded, clipped)."""
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- geometry


def _shape_masks(
    rng: np.random.Generator,
    n: int,
    size: int,
    max_shapes: int,
    top_classes: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Random shape layouts.

    Args:
        top_classes: optional classes the topmost (last drawn, hence visible) shape is drawn
            from, so a class-incremental experience can guarantee its step's classes.

    Returns:
        labels ``uint8 [n,size,size]`` (0 background, 1..4 shape class) and instance map
        ``int8 [n,size,size]`` (slot index of the visible shape, -1 background).
    """
    num = rng.integers(1, max_shapes + 1, n)  # [n] shapes per image
    # Slots are right-aligned so the last slot is always used: it is the one drawn on top.
    used = np.arange(max_shapes)[None, :] >= (max_shapes - num[:, None])  # [n,max_shapes]
    cls = rng.integers(1, NUM_CLASSES, (n, max_shapes))
    if top_classes is not None:
        allowed = np.asarray(top_classes)
        cls[:, -1] = allowed[rng.integers(0, len(allowed), n)]
    # Radius of the circumscribed circle, big enough to be non-trivial at any image size.
    radius = rng.uniform(0.14, 0.28, (n, max_shapes)) * size
    margin = radius * 0.9
    cy = rng.uniform(0, 1, (n, max_shapes)) * (size - 2 * margin) + margin
    cx = rng.uniform(0, 1, (n, max_shapes)) * (size - 2 * margin) + margin
    # Moderate rotations keep squares/crosses recognisable at low resolution while stopping a
    # model from learning only axis-aligned edges.
    theta = rng.uniform(-np.pi / 6, np.pi / 6, (n, max_shapes))

    grid = np.arange(size, dtype=np.float32) + 0.5
    labels = np.zeros((n, size, size), np.uint8)
    inst = np.full((n, size, size), -1, np.int8)
    for k in range(max_shapes):
        dy = grid[None, :, None] - cy[:, k, None, None]  # [n,S,1]
        dx = grid[None, None, :] - cx[:, k, None, None]  # [n,1,S]
        c, s = np.cos(theta[:, k, None, None]), np.sin(theta[:, k, None, None])
        u, v = c * dx + s * dy, -s * dx + c * dy  # [n,S,S] shape-frame coordinates
        r = radius[:, k, None, None]
        circle = u * u + v * v <= (0.85 * r) ** 2
        square = np.maximum(np.abs(u), np.abs(v)) <= 0.72 * r
        # Equilateral triangle with circumradius r (inradius r/2): inside all three edges, whose
        # outward normals point down (v grows downwards, so the apex is up) and to the upper sides.
        tri = np.ones_like(circle)
        for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
            tri &= u * np.cos(a) + v * np.sin(a) <= 0.5 * r
        arm = 0.32 * r
        cross = ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
        ck = cls[:, k, None, None]
        mask = np.where(ck == 1, circle, np.where(ck == 2, square, np.where(ck == 3, tri, cross)))
        mask &= used[:, k, None, None]
        labels = np.where(mask, ck.astype(np.uint8), labels)
        inst = np.where(mask, np.int8(k), inst)
    return labels, inst


# --------------------------------------------------------------------------- looks


@dataclass(frozen=True)
class _Look:
    """One domain's appearance. HSV ranges are (low, high) for uniform draws."""

    name: str
    bg_sat: tuple[float, float]
    bg_val: tuple[float, float]
    fg_sat: tuple[float, float]
    fg_val: tuple[float, float]
    # "none" | "stripes" | "checker" | "blotches": pattern modulating the background.
    bg_texture: str = "none"
    bg_texture_amp: float = 0.0
    # Per-pixel noise multiplied into the shapes only (texture inside shapes).
    fg_noise: float = 0.0
    # Stripes on shapes too (different pattern than the background's).
    fg_stripes_amp: float = 0.0
    # fg hue offset from bg hue; (0, 1) = any hue.
    hue_offset: tuple[float, float] = (0.0, 1.0)
    # fg value as an offset to the bg value (low contrast) instead of an absolute draw.
    relative_val: bool = False
    blur: float = 0.0  # box-blur radius as a fraction of the image size
    noise: float = 0.0  # std of additive Gaussian pixel noise (in [0,1] units)


DOMAINS: tuple[_Look, ...] = (
    _Look("plain", bg_sat=(0.0, 0.15), bg_val=(0.85, 1.0), fg_sat=(0.6, 1.0), fg_val=(0.45, 0.9)),
    _Look(
        "dark_striped",
        bg_sat=(0.0, 0.4),
        bg_val=(0.02, 0.15),
        fg_sat=(0.15, 0.5),
        fg_val=(0.55, 0.85),
        bg_texture="stripes",
        bg_texture_amp=0.45,
        fg_stripes_amp=0.25,
    ),
    _Look(
        "blurred_noisy",
        bg_sat=(0.3, 0.7),
        bg_val=(0.2, 0.45),
        fg_sat=(0.3, 0.9),
        fg_val=(0.7, 1.0),
        hue_offset=(0.25, 0.75),
        blur=1 / 32,
        noise=0.1,
    ),
    _Look(
        "low_contrast",
        bg_sat=(0.0, 0.2),
        bg_val=(0.35, 0.65),
        fg_sat=(0.0, 0.25),
        fg_val=(0.08, 0.16),
        hue_offset=(-0.08, 0.08),
        relative_val=True,
        noise=0.02,
    ),
    _Look(
        "blotchy_textured",
        bg_sat=(0.5, 0.9),
        bg_val=(0.4, 0.8),
        fg_sat=(0.5, 1.0),
        fg_val=(0.5, 1.0),
        bg_texture="blotches",
        bg_texture_amp=0.6,
        fg_noise=0.35,
        hue_offset=(0.2, 0.8),
    ),
    _Look(
        "checker_bright",
        bg_sat=(0.2, 0.6),
        bg_val=(0.1, 0.35),
        fg_sat=(0.0, 0.3),
        fg_val=(0.8, 1.0),
        bg_texture="checker",
        bg_texture_amp=0.25,
        fg_noise=0.15,
    ),
)


def render(
    rng: np.random.Generator, inst: np.ndarray, look: _Look, max_shapes: int = 3
) -> np.ndarray:
    """Paints an instance map ``int8 [N,S,S]`` (-1 = background) in ``look``; uint8 ``[N,S,S,3]``.

    Each shape gets its own random colour from the look's palette, independent of its class.
    """
    n, size = inst.shape[0], inst.shape[1]
    bg_h = rng.random((n, 1))
    bg_v = rng.uniform(*look.bg_val, (n, 1))
    bg = hsv_to_rgb(bg_h, rng.uniform(*look.bg_sat, (n, 1)), bg_v)  # [n,1,3]
    fg_h = (bg_h + rng.uniform(*look.hue_offset, (n, max_shapes))) % 1.0
    fg_s = rng.uniform(*look.fg_sat, (n, max_shapes))
    fg_v = rng.uniform(*look.fg_val, (n, max_shapes))
    if look.relative_val:
        # Either lighter or darker than the background by a small margin.
        sign = np.where(rng.random((n, max_shapes)) < 0.5, -1.0, 1.0)
        fg_v = np.clip(bg_v + sign * fg_v, 0.0, 1.0)
    fg = hsv_to_rgb(fg_h, fg_s, fg_v)  # [n,max_shapes,3]

    img = np.broadcast_to(bg[:, :, None, :], (n, size, size, 3)).astype(np.float32)  # [n,S,S,3]
    if look.bg_texture == "stripes":
        img = img + look.bg_texture_amp * stripes(rng, n, size, (size / 12, size / 6))[..., None]
    elif look.bg_texture == "checker":
        cells = (max(2, size // 16), max(3, size // 8))
        img = img + look.bg_texture_amp * _checker(rng, n, size, cells)[..., None]
    elif look.bg_texture == "blotches":
        blot = smooth_noise(rng, n, size, cells=6)  # [n,S,S,3] coloured blobs
        img = img * (1 - look.bg_texture_amp) + look.bg_texture_amp * blot

    fg_img = np.take_along_axis(fg, np.maximum(inst, 0).reshape(n, -1, 1).astype(np.intp), axis=1)
    fg_img = fg_img.reshape(n, size, size, 3)
    if look.fg_noise > 0:
        fg_img = fg_img * (1 + look.fg_noise * rng.standard_normal((n, size, size, 1)))
    if look.fg_stripes_amp > 0:
        fg_img = (
            fg_img - look.fg_stripes_amp * stripes(rng, n, size, (size / 20, size / 10))[..., None]
        )
    img = np.where((inst >= 0)[..., None], fg_img, img)

    if look.blur > 0:
        img = box_blur(img, max(1, round(look.blur * size)))
    if look.noise > 0:
        img = img + look.noise * rng.standard_normal(img.shape, dtype=np.float32)
    return to_uint8(img)


# --------------------------------------------------------------------------- streams


def settings(
    cfg: ml_collections.ConfigDict, max_items: str = "max_shapes"
) -> tuple[int, int, int, int, int]:
    """(image_size, train_per_exp, test_per_exp, seed, <max_items>) with validation.

    The settings every generated stream reads (shapes; digits with ``max_items="max_digits"``).
    """
    return (
        checks.int_setting(cfg, "image_size", 64, 16),
        checks.int_setting(cfg, "train_per_exp", 512, 1),
        checks.int_setting(cfg, "test_per_exp", 128, 1),
        checks.int_setting(cfg, "seed", 0, 0),
        checks.int_setting(cfg, max_items, 3, 1),
    )


def _sources(
    seed: int,
    stream: int,
    index: int,
    size: int,
    n_train: int,
    n_test: int,
    max_shapes: int,
    look: _Look,
    name: str,
    top_classes: Sequence[int] | None = None,
) -> tuple[base.ArraySource, base.ArraySource]:
    out = []
    for split, n in ((_TRAIN, n_train), (_TEST, n_test)):
        rng = np.random.default_rng([seed, stream, index, split])
        labels, inst = _shape_masks(rng, n, size, max_shapes, top_classes)
        images = render(rng, inst, look, max_shapes)
        out.append(base.ArraySource(images, labels, f"{name}/{'train' if split == 0 else 'test'}"))
    return out[0], out[1]


def _looks(names: Sequence[str]) -> tuple[_Look, ...]:
    """The looks named in ``names`` in that order; all of ``DOMAINS`` when empty."""
    by_name = {look.name: look for look in DOMAINS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"shapes_di: unknown look(s) {unknown}; valid looks: {list(by_name)}")
    return tuple(by_name[n] for n in names) or DOMAINS


def _binary(source: base.ArraySource) -> base.ArraySource:
    # A distinct name keeps its repr (grain's iterator-state key) apart from the 5-class source.
    return base.ArraySource(source.images, np.minimum(source.labels, 1), f"{source.name}/binary")


def make_domain(cfg: ml_collections.ConfigDict) -> base.Stream:
    """Domain-incremental shapes: ``num_experiences`` looks, cycled.

    The looks are ``cfg.looks`` (names from ``DOMAINS``, in that order) or all of ``DOMAINS``.
    """
    size, n_train, n_test, seed, max_shapes = settings(cfg)
    num_exp = checks.int_setting(cfg, "num_experiences", 4, 1)
    binary = bool(cfg.get("binary", False))
    class_names = BINARY_CLASS_NAMES if binary else CLASS_NAMES
    all_classes = tuple(range(len(class_names)))
    looks = _looks(cfg.get("looks", ()))
    exps = []
    for t in range(num_exp):
        look = looks[t % len(looks)]
        # Past len(looks) experiences the looks repeat with fresh random draws; the suffix keeps
        # names unique.
        name = look.name if t < len(looks) else f"{look.name}_{t // len(looks) + 1}"
        train, test = _sources(
            seed, _DOMAIN_STREAM, t, size, n_train, n_test, max_shapes, look, f"shapes_di/{name}"
        )
        if binary:
            train, test = _binary(train), _binary(test)
        exps.append(base.Experience(t, name, all_classes, train, test))
    return base.Stream("shapes_di", "domain", len(class_names), class_names, tuple(exps))


def make_class(cfg: ml_collections.ConfigDict) -> base.Stream:
    """Class-incremental shapes in the "plain" look; ``classes_per_step`` sums to 4."""
    size, n_train, n_test, seed, max_shapes = settings(cfg)
    steps = class_steps.split_classes(
        cfg.get("classes_per_step", (2, 2)), NUM_CLASSES - 1, "shapes_ci"
    )
    exps = []
    for t, step in enumerate(steps):
        name = "+".join(CLASS_NAMES[c] for c in step)
        train, test = _sources(
            seed,
            _CLASS_STREAM,
            t,
            size,
            n_train,
            n_test,
            max_shapes,
            DOMAINS[0],
            f"shapes_ci/{name}",
            top_classes=step,
        )
        exps.append(base.Experience(t, name, (0, *step), train, test))
    return base.Stream("shapes_ci", "class", NUM_CLASSES, CLASS_NAMES, tuple(exps))
