"""Example uploads from the built-in shapes stream, for docs/service.md's session and the tests.

``experiences`` gives domain-incremental binary shapes (background / shape) under different
looks, the stream of the library's behaviour tests; ``write_zip`` writes one experience in the
upload zip layout (``uploads.py``): ``train/images/<name>.png``, ``train/masks/<name>.png``,
``test/...``.
"""

from __future__ import annotations

import io
import os
import zipfile

import ml_collections
import numpy as np
from PIL import Image

from clseg_jax.data import shapes


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
    cfg = ml_collections.ConfigDict(
        {
            "image_size": size,
            "train_per_exp": n_train,
            "test_per_exp": n_test,
            "seed": seed,
            "num_experiences": n,
            "binary": binary,
        }
    )
    out = []
    for exp in shapes.make_domain(cfg).experiences:
        out.append(
            {
                "x_train": exp.train.images,
                "y_train": exp.train.labels,
                "x_test": exp.test.images,
                "y_test": exp.test.labels,
            }
        )
    return out


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def zip_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """One experience in the upload zip layout, PNG images and single-channel PNG masks."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for split in ("train", "test"):
            images, masks = arrays[f"x_{split}"], arrays[f"y_{split}"]
            for i, (x, y) in enumerate(zip(images, masks, strict=True)):
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
