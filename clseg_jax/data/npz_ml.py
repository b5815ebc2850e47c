"""Multi-label stream from one user ``.npz`` file (``npz_ml``).

The image-level counterpart of ``npz.py`` (a folder of segmentation experiences): one file with
``x_train`` uint8 ``[N,H,W,3]``, ``y_train`` multi-hot ``[N,K]``, ``x_test``, ``y_test`` and
optionally ``class_names``, split into tasks by ``config.classes_per_step`` with
``class_steps``'s multi-label protocol.
"""

from __future__ import annotations

import os
from pathlib import Path

import ml_collections
import numpy as np

from clseg_jax.data import base, checks, class_steps
from clseg_jax.data.npz import ARRAYS


def _load(file: Path) -> tuple[dict[str, np.ndarray], tuple[str, ...] | None]:
    """The four arrays (validated) and the optional ``class_names`` of one multi-label .npz."""
    if not file.is_file():
        raise ValueError(f"npz_ml: file {str(file)!r} does not exist (config.path)")
    arrays = checks.read_npz(file, ARRAYS, "npz_ml", optional=("class_names",))
    names = arrays.pop("class_names", None)
    for split in class_steps.SPLITS:
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        checks.rgb_images(x, f"npz_ml: {file}: x_{split}")
        if y.ndim != 2 or len(y) != len(x):
            raise ValueError(
                f"npz_ml: {file}: y_{split} must be multi-hot [N,K] with N = {len(x)} "
                f"matching x_{split}, got shape {list(y.shape)}"
            )
        if not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
            raise ValueError(
                f"npz_ml: {file}: y_{split} must have an integer or bool dtype, got {y.dtype}"
            )
        checks.multi_hot(y, f"npz_ml: {file}: y_{split}")
    if arrays["y_train"].shape[1] != arrays["y_test"].shape[1]:
        raise ValueError(
            f"npz_ml: {file}: y_train has {arrays['y_train'].shape[1]} classes but y_test has "
            f"{arrays['y_test'].shape[1]}"
        )
    if arrays["x_train"].shape[1:3] != arrays["x_test"].shape[1:3]:
        raise ValueError(
            f"npz_ml: {file}: x_train images are {list(arrays['x_train'].shape[1:3])} but x_test "
            f"images are {list(arrays['x_test'].shape[1:3])}; both must share one size"
        )
    return arrays, None if names is None else tuple(str(n) for n in np.ravel(names))


def make_npz_ml(cfg: ml_collections.ConfigDict) -> base.Stream:
    """Multi-label stream from one user .npz file.

    The file holds ``x_train`` uint8 ``[N,H,W,3]``, ``y_train`` multi-hot ``[N,K]`` (0/1, any
    integer or bool dtype), ``x_test`` and ``y_test`` likewise (same H, W and K), and optionally
    ``class_names`` (``[K]`` strings). Every problem is a one-line ``ValueError`` naming the file
    and array.

    Config fields: ``path`` (required), ``classes_per_step`` (required: must sum to K),
    ``class_names`` (overrides the file's; default ``class_0..``), ``train_per_exp`` /
    ``test_per_exp`` (0 = all; else at most this many per task, sampled with ``seed``),
    ``seed`` (0).

    Returns:
        kind "multilabel", K classes; elements ``{"image": uint8 [H,W,3], "label": uint8 [K]}``
        with full labels.
    """
    what = "npz_ml"
    path = cfg.get("path", None)
    if not path:
        raise ValueError("npz_ml: config.path is empty; set it to a .npz file")
    file = Path(os.path.expanduser(str(path)))
    arrays, file_names = _load(file)
    k = arrays["y_train"].shape[1]
    steps = cfg.get("classes_per_step", None)
    if not steps:
        raise ValueError(
            f"npz_ml: config.classes_per_step is not set; give task sizes summing to K = {k} "
            f"(the number of columns of y_train in {file})"
        )
    tasks = class_steps.split_classes(steps, k, f"npz_ml: {file}", first=0)
    names = cfg.get("class_names", None)
    where = "config.class_names"
    if not names:
        names, where = file_names, f"{file}: class_names"
    if names:
        names = tuple(str(n) for n in names)
        if len(names) != k:
            raise ValueError(f"npz_ml: {where} has {len(names)} names for K = {k} classes")
    else:
        names = tuple(f"class_{c}" for c in range(k))
    caps = (
        checks.int_setting(cfg, "train_per_exp", 0, 0, what),
        checks.int_setting(cfg, "test_per_exp", 0, 0, what),
    )
    seed = checks.int_setting(cfg, "seed", 0, 0, what)
    parts = []
    for split in class_steps.SPLITS:
        part = class_steps.partition(arrays[f"y_{split}"], tasks)
        class_steps.check_partition(part, tasks, names, f"npz_ml: {file}", f"y_{split}")
        parts.append(part)

    def take(s: int, idx: np.ndarray, name: str) -> base.LabelSource:
        split = class_steps.SPLITS[s]
        x, y = arrays[f"x_{split}"][idx], arrays[f"y_{split}"][idx]
        return base.LabelSource(x, y.astype(np.uint8), name)

    exps = class_steps.capped_experiences(what, names, tasks, parts, caps, seed, take)
    return base.Stream(what, "multilabel", k, names, exps)
