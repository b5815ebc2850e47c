"""Example uploads from the built-in shapes stream, for docs/service.md's session and the tests.

``experiences`` gives domain-incremental binary shapes (background / shape) under different
looks, the stream of the library's behaviour tests; ``class_experiences`` the same looks with one
shape per image, labelled by its kind (a classification lineage's data). ``zip_bytes`` writes one
experience in the upload zip layout (``uploads.py``): ``train/images/<name>.png``,
``train/masks/<name>.png``, ``test/...``, or ``train/<class id>/<name>.png`` for class ids.
"""

from __future__ import annotations

import io
import os
import zipfile
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from clseg_jax.data import shapes


def _domain_stream(n: int, size: int, n_train: int, n_test: int, seed: int, **extra: Any):
    """``shapes.make_domain``'s stream of ``n`` looks; ``extra``: more of its config fields."""
    cfg = ml_collections.ConfigDict(
        {
            "image_size": size,
            "train_per_exp": n_train,
            "test_per_exp": n_test,
            "seed": seed,
            "num_experiences": n,
            **extra,
        }
    )
    return shapes.make_domain(cfg)


def experiences(
    n: int = 2,
    size: int = 64,
    n_train: int = 64,
    n_test: int = 32,
    seed: int = 0,
    binary: bool = True,
) -> list[dict[str, np.ndarray]]:
    """``n`` experiences as ``{"x_train" [N,S,S,3] uint8, "y_train" [N,S,S] uint8, ...}``;
    ``binary``: background / shape, else the 5 classes (background and 4 shapes)."""
    stream = _domain_stream(n, size, n_train, n_test, seed, binary=binary)
    return [
        {
            "x_train": exp.train.images,
            "y_train": exp.train.labels,
            "x_test": exp.test.images,
            "y_test": exp.test.labels,
        }
        for exp in stream.experiences
    ]


# ``class_experiences``' classes: shapes.CLASS_NAMES without the background.
CLASS_NAMES = shapes.CLASS_NAMES[1:]


def class_experiences(
    n: int = 2, size: int = 32, n_train: int = 64, n_test: int = 32, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """``n`` domain-incremental classification experiences: one shape per image, ``y_*`` uint8
    ``[N]`` its kind (0 circle, 1 square, 2 triangle, 3 cross: ``CLASS_NAMES``)."""
    out = []
    for exp in _domain_stream(n, size, n_train, n_test, seed, max_shapes=1).experiences:
        arrays = {}
        for split, source in (("train", exp.train), ("test", exp.test)):
            # The one shape's class is the mask's largest value (background is 0).
            arrays[f"x_{split}"] = source.images
            arrays[f"y_{split}"] = (
                source.labels.reshape(len(source.labels), -1).max(1) - 1
            ).astype(np.uint8)
        out.append(arrays)
    return out


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def zip_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """One experience in the upload zip layout: PNG images with single-channel PNG masks, or in
    class-id folders when the labels are ``[N]`` class ids."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for split in ("train", "test"):
            images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
            for i, (x, y) in enumerate(zip(images, labels, strict=True)):
                if np.ndim(y) == 0:
                    z.writestr(f"{split}/{int(y)}/{i:05d}.png", _png(x))
                else:
                    z.writestr(f"{split}/images/{i:05d}.png", _png(x))
                    z.writestr(f"{split}/masks/{i:05d}.png", _png(y))
    return buf.getvalue()


def write_zips(out_dir: str, n: int = 2, **kwargs) -> list[str]:
    """Writes ``exp0.zip .. exp{n-1}.zip`` under ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for k, arrays in enumerate(experiences(n, **kwargs)):
        path = os.path.join(out_dir, f"exp{k}.zip")
        with open(path, "wb") as f:
            f.write(zip_bytes(arrays))
        paths.append(path)
    return paths
