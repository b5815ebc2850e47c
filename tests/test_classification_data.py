"""Classification streams: split-MNIST, multi-label digits, VOC-layout folders and npz files."""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from clseg_jax import data
from clseg_jax.data import base, digits, digits_labels, npz_ml, voc, voc_ml


def _cfg(**kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(kw)


def _one_line_error(build, cfg: ml_collections.ConfigDict, *fragments: str) -> str:
    with pytest.raises(ValueError) as err:
        build(cfg)
    msg = str(err.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def _sources_equal(a: base.Stream, b: base.Stream) -> bool:
    return all(
        np.array_equal(ea.train.images, eb.train.images)
        and np.array_equal(ea.train.labels, eb.train.labels)
        and np.array_equal(ea.test.images, eb.test.images)
        and np.array_equal(ea.test.labels, eb.test.labels)
        for ea, eb in zip(a.experiences, b.experiences, strict=True)
    )


def test_registry_names():
    for name in ("digits_cls", "digits_ml", "voc_ml", "npz_ml"):
        assert name in data.DATASETS


# --------------------------------------------------------------------------- LabelSource


def test_label_source_validates_and_reprs():
    images = np.zeros((3, 4, 5, 3), np.uint8)
    single = base.LabelSource(images, np.array([0, 7, 2]), "s")
    assert single[1]["label"].shape == () and int(single[1]["label"]) == 7
    assert single.labels.dtype == np.uint8
    assert repr(single) == "LabelSource('s', n=3, shape=(4, 5), label=())"
    multi = base.LabelSource(images, np.eye(3, 4, dtype=bool), "m")
    assert multi[2]["label"].tolist() == [0, 0, 1, 0]
    assert repr(multi) == "LabelSource('m', n=3, shape=(4, 5), label=(4,))"
    with pytest.raises(ValueError, match=r"m2: labels must be \[N\] class ids or \[N,K\]"):
        base.LabelSource(images, np.zeros((2, 4)), "m2")
    with pytest.raises(ValueError, match=r"labels must be 0/1 \(multi-hot\), got values 2\.\.2"):
        base.LabelSource(images, np.full((3, 4), 2), "m3")
    with pytest.raises(ValueError, match=r"class ids 0\.\.254"):
        base.LabelSource(images, np.array([0, 1, 255]), "s2")
    with pytest.raises(ValueError, match="integer dtype"):
        base.LabelSource(images, np.zeros(3, np.float32), "s3")
    with pytest.raises(ValueError, match=r"uint8 \[N,H,W,3\]"):
        base.LabelSource(images[..., 0], np.zeros(3, np.int64), "s4")


def test_visible_multi_hot():
    label = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], np.uint8)
    visible = np.array([True, True, False, False])
    out = base.visible_multi_hot(label, visible)
    assert out.dtype == np.uint8
    assert out.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]


# --------------------------------------------------------------------------- digits_cls


def test_digits_cls_stream_and_disjoint_digits():
    # At 28 px every image is a raw MNIST digit: find it, and check which pool it came from.
    stream = data.make(_cfg(name="digits_cls", image_size=28))
    assert (stream.name, stream.kind, stream.num_classes) == ("digits_cls", "class", 10)
    assert stream.class_names == tuple(str(d) for d in range(10))
    x, y = digits.load_mnist()
    train_pool, test_pool = digits.split_pools(y)
    where = {x[i].tobytes(): i for i in range(len(x))}
    for t, exp in enumerate(stream.experiences):
        assert exp.index == t and exp.classes == (2 * t, 2 * t + 1)
        assert exp.name == f"{2 * t}+{2 * t + 1}"
        for src, pool, n in ((exp.train, train_pool, 800), (exp.test, test_pool, 200)):
            assert src.images.shape == (n, 28, 28, 3) and src.images.dtype == np.uint8
            assert src.labels.shape == (n,) and src.labels.dtype == np.uint8
            item = src[0]
            assert item["image"].shape == (28, 28, 3) and item["label"].shape == ()
            np.testing.assert_array_equal(src.images[..., 2], src.images[..., 0])  # grey
            idx = np.array([where[im.tobytes()] for im in src.images[..., 0]])
            assert np.isin(idx, pool).all()  # train digits never in test and vice versa
            np.testing.assert_array_equal(src.labels, y[idx])
            assert set(src.labels.tolist()) == set(exp.classes)
            assert len(set(idx.tolist())) == n  # every digit of the step, once
    assert stream.seen_classes(4) == tuple(range(10))


def test_digits_cls_sizes_caps_and_seed():
    x, _ = digits.load_mnist()
    digit_set = {d.tobytes() for d in x}
    big = digits_labels.make_digits_cls(_cfg(image_size=64, train_per_exp=7, test_per_exp=3))
    e = big.experiences[0]
    assert e.train.images.shape == (7, 64, 64, 3) and len(e.test) == 3
    # 64 = 2 x 28 + 8: each pixel doubled, 4 px of black border.
    core = e.train.images[:, 4:60, 4:60, 0][:, ::2, ::2]
    assert all(d.tobytes() in digit_set for d in core)
    assert e.train.images[:, :4].max() == 0 and e.train.images[:, 60:].max() == 0
    assert sorted(np.bincount(e.train.labels, minlength=2)[:2]) == [3, 4]  # balanced cap
    small = digits_labels.make_digits_cls(
        _cfg(image_size=16, classes_per_step=(4, 3, 3), train_per_exp=8, test_per_exp=4)
    )
    assert [exp.classes for exp in small.experiences] == [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]
    assert small.experiences[0].train.images.shape == (8, 16, 16, 3)
    for exp in small.experiences:
        assert np.isin(exp.train.labels, exp.classes).all()
        assert np.isin(exp.test.labels, exp.classes).all()
        assert set(exp.train.labels.tolist()) == set(exp.classes)

    cfg = dict(classes_per_step=(5, 5), train_per_exp=10, test_per_exp=10)
    a = digits_labels.make_digits_cls(_cfg(seed=1, **cfg))
    b = digits_labels.make_digits_cls(_cfg(seed=1, **cfg))
    c = digits_labels.make_digits_cls(_cfg(seed=2, **cfg))
    assert _sources_equal(a, b) and not _sources_equal(a, c)


def test_digits_cls_errors():
    build = digits_labels.make_digits_cls
    _one_line_error(build, _cfg(classes_per_step=(5, 4)), "digits_cls", "sum to 10", "(5, 4)")
    _one_line_error(build, _cfg(image_size=4), "digits_cls", "config.image_size", ">= 8")
    _one_line_error(build, _cfg(train_per_exp=-1), "config.train_per_exp", ">= 0")


# --------------------------------------------------------------------------- digits_ml

ML_SMALL = dict(image_size=32, train_per_exp=32, test_per_exp=16)


def test_digits_ml_stream_partition_and_full_labels():
    stream = data.make(_cfg(name="digits_ml", **ML_SMALL))
    assert (stream.name, stream.kind, stream.num_classes) == ("digits_ml", "multilabel", 10)
    assert [e.classes for e in stream.experiences] == [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]
    others = 0
    for exp in stream.experiences:
        task = list(exp.classes)
        for src, n in ((exp.train, 32), (exp.test, 16)):
            assert src.images.shape == (n, 32, 32, 3) and src.images.dtype == np.uint8
            assert src.labels.shape == (n, 10) and src.labels.dtype == np.uint8
            assert set(np.unique(src.labels).tolist()) <= {0, 1}
            assert src[0]["label"].shape == (10,)
            assert src.labels[:, task].any(axis=1).all()  # every image holds a class of t
            assert (src.labels.sum(axis=1) <= 3).all()
        others += int(np.delete(exp.train.labels, task, axis=1).sum())
    assert others > 0  # labels are full: other tasks' digits stay labelled in the source


def test_digits_ml_deterministic_by_seed_and_max_digits():
    a = digits_labels.make_digits_ml(_cfg(seed=3, **ML_SMALL))
    b = digits_labels.make_digits_ml(_cfg(seed=3, **ML_SMALL))
    c = digits_labels.make_digits_ml(_cfg(seed=4, **ML_SMALL))
    assert _sources_equal(a, b) and not _sources_equal(a, c)
    one = digits_labels.make_digits_ml(_cfg(max_digits=1, classes_per_step=(5, 5), **ML_SMALL))
    for exp in one.experiences:
        assert (exp.train.labels.sum(axis=1) == 1).all()
        assert exp.train.labels[:, list(exp.classes)].any(axis=1).all()


def test_digits_ml_errors():
    build = digits_labels.make_digits_ml
    _one_line_error(build, _cfg(classes_per_step=(4, 4)), "digits_ml", "sum to 10")
    _one_line_error(build, _cfg(max_digits=0), "config.max_digits", ">= 1")


# --------------------------------------------------------------------------- voc_ml

VOC_TRAIN = {
    "2008_000001": [("aeroplane", 0), ("person", 1)],  # person only as a difficult object
    "2008_000002": [("cat", 0)],
    "2008_000003": [("dog", 0), ("person", 0), ("dog", 0)],
    "2008_000004": [("tvmonitor", 0)],
}
VOC_VAL = {
    "2008_000005": [("bus", 0), ("sofa", 0)],
    "2008_000006": [("horse", 1)],
}


def _xml(image_id: str, objects) -> str:
    objs = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{difficult}</difficult>"
        f"<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>8</xmax><ymax>8</ymax></bndbox></object>"
        for name, difficult in objects
    )
    return (
        f"<annotation><folder>VOC2012</folder><filename>{image_id}.jpg</filename>"
        f"<size><width>16</width><height>16</height><depth>3</depth></size>{objs}</annotation>"
    )


def _write_voc(root: Path, train=VOC_TRAIN, val=VOC_VAL) -> Path:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, ids in (("train", train), ("val", val)):
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for k, (image_id, objects) in enumerate(ids.items()):
            (root / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, objects))
            shape = (16, 24, 3) if k == 0 else (16, 16, 3)  # one non-square image
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.jpg")
    return root


def _ids(src: voc_ml.ImageFileSource) -> list[str]:
    return [Path(p).stem for p in src.paths]


def test_voc_ml_stream_and_partition(tmp_path: Path):
    root = _write_voc(tmp_path / "VOC2012")
    stream = data.make(_cfg(name="voc_ml", path=str(root), image_size=12))
    assert (stream.name, stream.kind, stream.num_classes) == ("voc_ml", "multilabel", 20)
    assert stream.class_names == voc.VOC_CLASSES
    assert [e.classes for e in stream.experiences] == [
        tuple(range(7)),
        tuple(range(7, 14)),
        tuple(range(14, 20)),
    ]
    assert [e.name for e in stream.experiences] == [
        "aeroplane..car",
        "cat..motorbike",
        "person..tvmonitor",
    ]
    want_train = [
        ["2008_000001"],
        ["2008_000002", "2008_000003"],
        ["2008_000001", "2008_000003", "2008_000004"],
    ]
    want_test = [["2008_000005"], ["2008_000006"], ["2008_000005"]]
    for exp, train_ids, test_ids in zip(stream.experiences, want_train, want_test, strict=True):
        assert _ids(exp.train) == train_ids and _ids(exp.test) == test_ids
        for src in (exp.train, exp.test):
            assert src.labels.shape == (len(src), 20) and src.labels.dtype == np.uint8
            assert src.labels[:, list(exp.classes)].any(axis=1).all()
            item = src[0]
            assert item["image"].shape == (12, 12, 3) and item["image"].dtype == np.uint8
            assert item["label"].shape == (20,)
    # Full labels, difficult objects included: image 1 keeps its aeroplane in task 2's source.
    first = stream.experiences[2].train
    names = voc.VOC_CLASSES
    want = [names.index("aeroplane"), names.index("person")]
    assert np.flatnonzero(first.labels[0]).tolist() == want
    assert repr(first) == "ImageFileSource('voc_ml/person..tvmonitor/train', n=3, shape=(12, 12))"
    # The non-square JPEG is resized to a square, not cropped.
    assert stream.experiences[0].train[0]["image"].shape == (12, 12, 3)


def test_voc_ml_difficult_caps_and_splits(tmp_path: Path):
    root = _write_voc(tmp_path / "voc")
    # Without difficult objects image 1 has no person, so task 2 loses it ...
    strict = voc_ml.make_voc_ml(_cfg(path=str(root), include_difficult=False, test_split="train"))
    assert _ids(strict.experiences[2].train) == ["2008_000003", "2008_000004"]
    # ... and val image 6 (a difficult horse only) joins no task: task 1 has no test image.
    with pytest.raises(ValueError, match=r"task 1 .* has no 'val' images"):
        voc_ml.make_voc_ml(_cfg(path=str(root), include_difficult=False))
    capped = dict(path=str(root), train_per_exp=2, classes_per_step=(7, 7, 6))
    a = voc_ml.make_voc_ml(_cfg(seed=0, **capped))
    assert [len(e.train) for e in a.experiences] == [1, 2, 2]
    b = voc_ml.make_voc_ml(_cfg(seed=0, **capped))
    assert [_ids(e.train) for e in a.experiences] == [_ids(e.train) for e in b.experiences]
    seeds = {
        tuple(_ids(voc_ml.make_voc_ml(_cfg(seed=s, **capped)).experiences[2].train))
        for s in range(8)
    }
    assert len(seeds) > 1  # the cap samples with the seed
    swapped = voc_ml.make_voc_ml(
        _cfg(path=str(root), train_split="val", test_split="train", classes_per_step=(10, 10))
    )
    assert _ids(swapped.experiences[0].train) == ["2008_000005"]  # bus; horse is class 12
    assert _ids(swapped.experiences[1].train) == ["2008_000005", "2008_000006"]
    assert _ids(swapped.experiences[1].test) == ["2008_000001", "2008_000003", "2008_000004"]


def test_voc_ml_errors(tmp_path: Path):
    build = voc_ml.make_voc_ml
    _one_line_error(build, _cfg(), "config.path is empty")
    _one_line_error(build, _cfg(path=str(tmp_path / "nope")), "nope", "does not exist")
    root = _write_voc(tmp_path / "voc")

    def fresh(name: str, **kw) -> Path:
        return _write_voc(tmp_path / name, **kw)

    r = fresh("no_ann")
    for f in (r / "Annotations").iterdir():
        f.unlink()
    (r / "Annotations").rmdir()
    _one_line_error(build, _cfg(path=str(r)), "Annotations", "does not exist")

    _one_line_error(
        build, _cfg(path=str(root), test_split="test"), "test.txt", "config.test_split", "'test'"
    )
    r = fresh("unknown")
    (r / "Annotations" / "2008_000002.xml").write_text(_xml("2008_000002", [("kitten", 0)]))
    _one_line_error(build, _cfg(path=str(r)), "2008_000002.xml", "'kitten'", "aeroplane")
    r = fresh("no_jpg")
    (r / "JPEGImages" / "2008_000006.jpg").unlink()
    _one_line_error(build, _cfg(path=str(r)), "2008_000006.jpg", "'val'", "does not exist")
    r = fresh("no_xml")
    (r / "Annotations" / "2008_000003.xml").unlink()
    _one_line_error(build, _cfg(path=str(r)), "2008_000003.xml", "does not exist")
    r = fresh("bad_xml")
    (r / "Annotations" / "2008_000004.xml").write_text("<annotation><object>")
    _one_line_error(build, _cfg(path=str(r)), "2008_000004.xml", "not valid XML")
    _one_line_error(build, _cfg(path=str(root), classes_per_step=(7, 7)), "sum to 20")
    r = fresh("empty_task", train={"2008_000002": [("cat", 0)]})
    _one_line_error(build, _cfg(path=str(r)), "task 0", "aeroplane..car", "'train'")
    r = fresh("broken_jpg")
    (r / "JPEGImages" / "2008_000002.jpg").write_bytes(b"not a jpeg")
    src = build(_cfg(path=str(r))).experiences[1].train  # building reads no JPEG
    msg = _one_line_error(lambda _: src[0], None, "2008_000002.jpg", "cannot be decoded")
    assert "voc_ml/cat..motorbike/train" in msg


# --------------------------------------------------------------------------- npz_ml


def _ml_arrays(rng, n=12, k=5, size=6) -> dict[str, np.ndarray]:
    def split(m):
        y = (rng.random((m, k)) < 0.35).astype(np.int64)
        y[np.arange(m), np.arange(m) % k] = 1  # every class in every split
        return rng.integers(0, 256, (m, size, size, 3), dtype=np.uint8), y

    x_train, y_train = split(n)
    x_test, y_test = split(n // 2 + 2)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _write_npz(folder: Path, name: str, arrays) -> Path:
    file = folder / f"{name}.npz"
    np.savez(file, **arrays)
    return file


def test_npz_ml_round_trip(tmp_path: Path):
    arrays = _ml_arrays(np.random.default_rng(0))
    file = _write_npz(tmp_path, "ml", {**arrays, "class_names": np.array(list("abcde"))})
    stream = data.make(_cfg(name="npz_ml", path=str(file), classes_per_step=(2, 3)))
    assert (stream.name, stream.kind, stream.num_classes) == ("npz_ml", "multilabel", 5)
    assert stream.class_names == tuple("abcde")
    assert [(e.name, e.classes) for e in stream.experiences] == [
        ("a+b", (0, 1)),
        ("c+d+e", (2, 3, 4)),
    ]
    for exp in stream.experiences:
        for split, src in (("train", exp.train), ("test", exp.test)):
            y = arrays[f"y_{split}"]
            idx = np.flatnonzero(y[:, list(exp.classes)].any(axis=1))
            np.testing.assert_array_equal(src.images, arrays[f"x_{split}"][idx])
            np.testing.assert_array_equal(src.labels, y[idx])  # full labels
            assert src.labels.dtype == np.uint8 and src[0]["label"].shape == (5,)
    named = npz_ml.make_npz_ml(
        _cfg(path=str(file), classes_per_step=(5,), class_names=tuple("vwxyz"))
    )
    assert named.class_names == tuple("vwxyz") and named.experiences[0].name == "v..z"
    plain = _write_npz(tmp_path, "plain", {**arrays, "y_train": arrays["y_train"].astype(bool)})
    unnamed = npz_ml.make_npz_ml(_cfg(path=str(plain), classes_per_step=(1, 4)))
    assert unnamed.class_names == tuple(f"class_{c}" for c in range(5))
    cap = dict(path=str(file), classes_per_step=(2, 3), train_per_exp=3, test_per_exp=2)
    a, b = (npz_ml.make_npz_ml(_cfg(seed=5, **cap)) for _ in range(2))
    assert _sources_equal(a, b) and [len(e.train) for e in a.experiences] == [3, 3]


def test_npz_ml_errors(tmp_path: Path):
    build = npz_ml.make_npz_ml
    rng = np.random.default_rng(1)
    good = _ml_arrays(rng)
    steps = {"classes_per_step": (2, 3)}

    def case(name: str, arrays, *fragments: str, **cfg) -> None:
        file = _write_npz(tmp_path, name, arrays)
        _one_line_error(build, _cfg(path=str(file), **{**steps, **cfg}), f"{name}.npz", *fragments)

    _one_line_error(build, _cfg(), "config.path is empty")
    _one_line_error(build, _cfg(path=str(tmp_path / "nope.npz")), "nope.npz", "does not exist")
    (tmp_path / "junk.npz").write_bytes(b"not a zip archive")
    _one_line_error(build, _cfg(path=str(tmp_path / "junk.npz")), "junk.npz", "cannot be read")
    case("no_y_test", {k: v for k, v in good.items() if k != "y_test"}, "missing array 'y_test'")
    case("float_x", {**good, "x_test": good["x_test"].astype(np.float32)}, "x_test", "uint8")
    case("seg_y", {**good, "y_train": good["y_train"][:, 0]}, "y_train", "[N,K]")
    case("float_y", {**good, "y_test": good["y_test"].astype(np.float32)}, "y_test", "integer")
    two = good["y_train"].copy()
    two[0, 0] = 2
    case("two", {**good, "y_train": two}, "y_train", "0/1", "[2]")
    case("k", {**good, "y_test": good["y_test"][:, :4]}, "y_train has 5 classes but y_test has 4")
    case("size", {**good, "x_test": good["x_test"][:, :4]}, "one size")
    case("steps", good, "classes_per_step", "sum to 5", classes_per_step=(2, 2))
    case("no_steps", good, "classes_per_step is not set", "K = 5", classes_per_step=None)
    names = {**steps, "class_names": ("a", "b")}
    _one_line_error(build, _cfg(path=str(_write_npz(tmp_path, "n", good)), **names), "2 names")
    case("file_names", {**good, "class_names": np.array(["a"])}, "class_names has 1 names")
    empty = good["y_test"].copy()
    empty[:, 0:2] = 0
    case("empty", {**good, "y_test": empty}, "task 0", "class_0+class_1", "no y_test images")
