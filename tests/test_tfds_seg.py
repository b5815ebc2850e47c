"""tfds round trip: a tiny pets-like dataset prepared offline as array_record, read as a stream.

tfds 4.9.10 prepares array_record datasets without TensorFlow when features are given as PIL
images or encoded files (numpy arrays would need TensorFlow's PNG encoder).
"""

from __future__ import annotations

import pickle

import ml_collections
import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from clseg_jax.data import files, loader, tfds_seg  # noqa: E402

H, W = 20, 28  # not square: the canvas pads


def _example(i: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Image, trimap (1 pet / 2 background / 3 border) and species (0 cat, 1 dog) of example i."""
    rng = np.random.default_rng(i)
    trimap = np.full((H, W), 2, np.uint8)
    top, left = int(rng.integers(0, 8)), int(rng.integers(0, 12))
    trimap[top : top + 10, left : left + 12] = 3
    trimap[top + 1 : top + 9, left + 1 : left + 11] = 1
    image = np.where(trimap[..., None] == 1, 220, 30).astype(np.uint8).repeat(3, axis=-1)
    return image, trimap, i % 2


class ClsegTinyPets(tfds.core.GeneratorBasedBuilder):
    """Pets-like features: image, segmentation_mask [H,W,1] trimap, species."""

    VERSION = tfds.core.Version("1.0.0")
    # tfds looks for a checksums file next to a builder defined in a package, through the
    # `importlib_resources` backport, which is not installed: there are no downloads to check.
    code_path = None

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "segmentation_mask": tfds.features.Image(shape=(None, None, 1)),
                    "species": tfds.features.ClassLabel(names=["Cat", "Dog"]),
                    "idx": tfds.features.Scalar(np.int64),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(0, 8), "test": self._generate_examples(100, 4)}

    def _generate_examples(self, start, n):
        for i in range(start, start + n):
            image, trimap, species = _example(i)
            # PIL images: tfds encodes them without TensorFlow.
            yield (
                i,
                {
                    "image": Image.fromarray(image),
                    "segmentation_mask": Image.fromarray(trimap),
                    "species": species,
                    "idx": i,
                },
            )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    ClsegTinyPets(data_dir=str(path), file_format="array_record").download_and_prepare()
    return path


def _cfg(data_dir, tmp_path, **kw):
    cfg = {
        "tfds_name": "clseg_tiny_pets",
        "preset": "oxford_iiit_pet",
        "data_dir": str(data_dir),
        "image_size": 32,
        "cache_dir": str(tmp_path / "cache"),
    }
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def test_round_trip_with_the_pets_preset(data_dir, tmp_path):
    s = tfds_seg.make(_cfg(data_dir, tmp_path))
    assert s.num_classes == 3 and s.class_names == ("background", "cat", "dog")
    # tfds stores examples in its own order: read which example each position holds.
    order = {
        split: [
            int(e["idx"])
            for e in tfds.data_source("clseg_tiny_pets", split=split, data_dir=str(data_dir))
        ]
        for split in ("train", "test")
    }
    assert sorted(order["train"]) == list(range(8))
    # Protocol "1-1": cats then dogs; training images are those of the step's species.
    assert [e.classes for e in s.experiences] == [(0, 1), (0, 2)]
    for exp, species in zip(s.experiences, (0, 1), strict=True):
        assert [order["train"][i] % 2 for i in exp.train.indices] == [species] * 4
    assert len(s.test) == 4
    for i in range(4):
        x = s.test[i]
        image, trimap, species = _example(order["test"][i])
        # Written here from the preset's definition: 1 -> pet class, 2 -> 0, 3 -> 255.
        expected = np.select([trimap == 1, trimap == 2], [1 + species, 0], 255)
        assert x["label"].shape == (32, 32) and x["image"].shape == (32, 32, 3)
        np.testing.assert_array_equal(x["label"][:H, :W], expected)
        assert (x["label"][H:] == 255).all() and (x["label"][:, W:] == 255).all()
        # JPEG-free PNG encoding: the image comes back exactly.
        np.testing.assert_array_equal(x["image"][:H, :W], image)


def test_label_map_override_and_presence_cache(data_dir, tmp_path, monkeypatch):
    # No species split: pets as one class, border ignored, via an explicit label map.
    cfg = _cfg(
        data_dir,
        tmp_path,
        preset="",
        label_key="segmentation_mask",
        label_map=[[1, 1], [2, 0], [3, 255]],
        class_names=("background", "pet"),
        protocol="joint",
    )
    s = tfds_seg.make(cfg)
    assert [e.classes for e in s.experiences] == [(0, 1)] and len(s.experiences[0].train) == 8
    # Second build: presence comes from the cache, the masks are not read.
    monkeypatch.setattr(files, "_label_counts", lambda *a: pytest.fail("mask read again"))
    s2 = tfds_seg.make(cfg)
    assert s2.experiences[0].train.indices.tolist() == list(range(8))
    batch = next(
        iter(
            loader.train_dataset(
                s2.experiences[0].train,
                np.ones(2, bool),
                global_batch=2,
                epochs=1,
                seed=0,
                crop=16,
                scale=(0.5, 2.0),
            )
        )
    )
    assert batch["image"].shape == (2, 16, 16, 3)
    # grain workers receive sources pickled: the tfds source reopens its data there.
    src = s2.experiences[0].train.source
    again = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(again[3]["label"], src[3]["label"])
    assert repr(again) == repr(src) and "0x" not in repr(src)


def test_errors(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"cannot open 'clseg_no_such_set'.*array_record"):
        tfds_seg.make(_cfg(data_dir, tmp_path, tfds_name="clseg_no_such_set"))
    with pytest.raises(ValueError, match=r"no feature 'mask'"):
        tfds_seg.make(_cfg(data_dir, tmp_path, label_key="mask"))
    with pytest.raises(ValueError, match=r"unknown preset 'pets'"):
        tfds_seg.make(_cfg(data_dir, tmp_path, preset="pets"))
    # Without the species split, label 2 (dog) is outside a 2-class set.
    with pytest.raises(ValueError, match=r"labels \[2\] outside the class set 0\.\.1"):
        tfds_seg.make(_cfg(data_dir, tmp_path, class_names=("background", "pet"), protocol="joint"))
