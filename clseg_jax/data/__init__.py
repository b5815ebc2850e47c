"""Datasets: name -> stream builder, each taking the ``config.data`` ConfigDict.

Builders do all their work when called (the digits builders parse MNIST only then), so importing
this package is cheap.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from clseg_jax.data import (
    ade,
    base,
    digits,
    digits_labels,
    medmnist,
    npz,
    npz_ml,
    shapes,
    tfds_seg,
    tiny_layouts,
    voc,
    voc_ml,
)

DATASETS: dict[str, Callable[[ml_collections.ConfigDict], base.Stream]] = {
    "shapes_di": shapes.make_domain,
    "shapes_ci": shapes.make_class,
    "digits_ci": digits.make_class,
    "digits_di": digits.make_domain,
    "npz": npz.make,
    "digits_cls": digits_labels.make_digits_cls,
    "digits_ml": digits_labels.make_digits_ml,
    "voc_ml": voc_ml.make_voc_ml,
    "npz_ml": npz_ml.make_npz_ml,
    "voc": voc.make,
    "ade": ade.make,
    "tfds_seg": tfds_seg.make,
    "tiny_voc": tiny_layouts.make_voc,
    "tiny_ade": tiny_layouts.make_ade,
    "medmnist": medmnist.make,
}


def make(cfg: ml_collections.ConfigDict) -> base.Stream:
    """Builds the stream named ``cfg.name``."""
    name = cfg.get("name", None)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {sorted(DATASETS)}")
    return DATASETS[name](cfg)
