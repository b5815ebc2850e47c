"""Every dataset's sources are ``base.Source``s: sized, rows of uint8 RGB images, stable reprs.

One tiny stream per registered dataset (``data.DATASETS``), built twice from the same inputs: the
reprs must match (grain restores iterator state by them, so no memory address may leak in).
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from clseg_jax import data
from clseg_jax.data import base, files, medmnist, npz, tiny_layouts, voc

SMALL = {"image_size": 16, "train_per_exp": 2, "test_per_exp": 2}
TINY = {"n_train": 12, "n_val": 6, "image_size": 24}


def _npz(root: Path) -> dict:
    rng = np.random.default_rng(0)
    exps = [
        {
            "x_train": rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8),
            "y_train": rng.integers(0, 3, (3, 8, 8)),
            "x_test": rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8),
            "y_test": rng.integers(0, 3, (2, 8, 8)),
        }
        for _ in range(2)
    ]
    npz.write(root / "npz", exps)
    return {"path": str(root / "npz")}


def _npz_ml(root: Path) -> dict:
    rng = np.random.default_rng(0)
    y = np.eye(4, dtype=np.uint8)  # one image per class
    x = rng.integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    np.savez(root / "ml.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    return {"path": str(root / "ml.npz"), "classes_per_step": (2, 2)}


def _voc_ml(root: Path) -> dict:
    """Per split, one image of the first class and one of the last: both tasks get images."""
    folder = root / "VOCml"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        ids = [f"{split}_{c}" for c in (0, 19)]
        (folder / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for image_id, c in zip(ids, (0, 19), strict=True):
            obj = f"<object><name>{voc.VOC_CLASSES[c]}</name></object>"
            (folder / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation>{obj}</annotation>"
            )
            Image.new("RGB", (10, 8), (c, 0, 0)).save(folder / "JPEGImages" / f"{image_id}.jpg")
    return {"path": str(folder), "image_size": 12, "classes_per_step": (10, 10)}


def _folder(kind: str, root: Path) -> dict:
    """A tiny VOC / ADE folder read by the real loader."""
    cfg = {"protocol": "2-2", "image_size": 24, "cache_dir": str(root / "cache")}
    if kind == "voc":
        folder = tiny_layouts.write_voc(root / "voc", size=24)
        return {
            **cfg,
            "root": str(folder),
            "class_names": tiny_layouts.class_names(4),
            "train_split": "train",
        }
    folder = tiny_layouts.write_ade(root / "ade", size=24).parent
    return {
        **cfg,
        "root": str(folder),
        "class_names": tiny_layouts.class_names(4, background="other"),
    }


def _medmnist(root: Path) -> dict:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 16), ("val", 8), ("test", 8)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 8).astype(np.uint8)[:, None]
    root.mkdir(parents=True, exist_ok=True)
    np.savez(medmnist.file_path(root, "bloodmnist"), **arrays)
    return {"root": str(root), "flag": "bloodmnist"}


def _tfds(root: Path) -> dict:
    pytest.importorskip("tensorflow_datasets")
    from tests.test_tfds_seg import ClsegTinyPets

    ClsegTinyPets(data_dir=str(root / "tfds"), file_format="array_record").download_and_prepare()
    return {
        "tfds_name": "clseg_tiny_pets",
        "preset": "oxford_iiit_pet",
        "data_dir": str(root / "tfds"),
        "image_size": 32,
        "cache_dir": str(root / "cache"),
    }


def _tiny(root: Path) -> dict:
    return {**TINY, "root": str(root / "tiny"), "cache_dir": str(root / "cache")}


# Dataset name -> config fields for a tiny stream (written under the given folder if needed).
CASES = {
    "shapes_di": lambda root: {**SMALL, "num_experiences": 2},
    "shapes_ci": lambda root: SMALL,
    "digits_ci": lambda root: SMALL,
    "digits_di": lambda root: {**SMALL, "num_experiences": 2},
    "npz": _npz,
    "digits_cls": lambda root: {**SMALL, "classes_per_step": (5, 5)},
    "digits_ml": lambda root: {**SMALL, "classes_per_step": (5, 5)},
    "voc_ml": _voc_ml,
    "npz_ml": _npz_ml,
    "voc": lambda root: _folder("voc", root),
    "ade": lambda root: _folder("ade", root),
    "tfds_seg": _tfds,
    "tiny_voc": _tiny,
    "tiny_ade": _tiny,
    "medmnist": _medmnist,
}


def test_every_dataset_has_a_case():
    assert set(CASES) == set(data.DATASETS)


def _sources(stream: base.Stream) -> list:
    """Every source an experience (or the stream's test set) holds, with the splits below them."""
    found = []
    for exp in stream.experiences:
        found += [exp.train, exp.test]
    if stream.test is not None:
        found.append(stream.test)
    found.append(base.ConcatSource([exp.train for exp in stream.experiences]))
    parents = [s.source for s in found if isinstance(s, files.Subset)]
    return found + parents


@pytest.mark.parametrize("name", sorted(CASES))
def test_sources_follow_the_protocol(name, tmp_path):
    cfg = ml_collections.ConfigDict({"name": name, **CASES[name](tmp_path)})
    first, second = data.make(cfg), data.make(cfg)
    sources = _sources(first)
    assert sources
    for src in sources:
        assert isinstance(src, base.Source), type(src)
        assert len(src) > 0, repr(src)
        row = src[0]
        assert set(row) >= {"image", "label"}, repr(src)
        image = np.asarray(row["image"])
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3, repr(src)
        assert " at 0x" not in repr(src), repr(src)
    assert [repr(s) for s in sources] == [repr(s) for s in _sources(second)]
