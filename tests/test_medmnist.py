"""MedMNIST loader (clseg_jax/data/medmnist.py) and configs/medmnist_ci.py on generated files.

The files are written with numpy in MedMNIST's own layout (``{split}_images`` uint8 [N,S,S] or
[N,S,S,3], ``{split}_labels`` [N,1] or [N,K]); every image is distinct, so an image found in a
source identifies the file row it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from clseg_jax import data, setup, train
from clseg_jax.data import medmnist
from configs import medmnist_ci

COUNTS = {"train": 40, "val": 16, "test": 24}


def _cfg(root: Path, **kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"root": str(root), **kw})


def _one_line_error(cfg: ml_collections.ConfigDict, *fragments: str) -> str:
    with pytest.raises(ValueError) as err:
        medmnist.make(cfg)
    msg = str(err.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def _arrays(
    k: int = 8, size: int = 28, rgb: bool = True, multilabel: bool = False, seed: int = 0
) -> dict[str, np.ndarray]:
    """MedMNIST-layout arrays; single-label splits hold every class, in a shuffled order."""
    rng = np.random.default_rng(seed)
    out = {}
    for s, n in COUNTS.items():
        shape = (n, size, size, 3) if rgb else (n, size, size)
        out[f"{s}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        if multilabel:
            y = (rng.random((n, k)) < 0.2).astype(np.uint8)
            y[np.arange(n), np.arange(n) % k] = 1  # every class in every split
        else:
            y = rng.permutation(np.arange(n) % k).astype(np.uint8)[:, None]
        out[f"{s}_labels"] = y
    return out


def _write(root: Path, flag: str, arrays: dict[str, np.ndarray], size: int = 28) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    file = medmnist.file_path(root, flag, size)
    np.savez(file, **arrays)
    return file


def _rows(images: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Row of ``pool`` that each of ``images`` is (images are distinct random arrays)."""
    where = {im.tobytes(): i for i, im in enumerate(pool)}
    return np.array([where[im.tobytes()] for im in images])


# --------------------------------------------------------------------------- streams


def test_bloodmnist_stream_ccsi_split(tmp_path: Path):
    arrays = _arrays()
    _write(tmp_path, "bloodmnist", arrays)
    stream = medmnist.make(_cfg(tmp_path, flag="bloodmnist"))
    assert (stream.name, stream.kind, stream.num_classes) == ("bloodmnist", "class", 8)
    assert stream.class_names == medmnist.INFO["bloodmnist"].class_names
    assert [e.classes for e in stream.experiences] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert stream.experiences[0].name == "basophil+eosinophil"
    for exp in stream.experiences:
        for src, split in ((exp.train, "train"), (exp.test, "test")):
            y = arrays[f"{split}_labels"][:, 0]
            want = np.flatnonzero(np.isin(y, exp.classes))
            assert src.images.shape == (len(want), 28, 28, 3) and src.images.dtype == np.uint8
            assert src.labels.shape == (len(want),) and src.labels.dtype == np.uint8
            rows = _rows(src.images, arrays[f"{split}_images"])
            assert sorted(rows.tolist()) == want.tolist()  # every image of the step, once
            np.testing.assert_array_equal(src.labels, y[rows])
            assert not np.array_equal(rows, np.sort(rows))  # shuffled, not in file order
            item = src[0]
            assert item["image"].shape == (28, 28, 3) and item["label"].shape == ()
        assert repr(exp.test).startswith(f"LabelSource('bloodmnist/{exp.name}/test'")


def test_grayscale_to_rgb_and_padding(tmp_path: Path):
    arrays = _arrays(k=11, rgb=False)
    _write(tmp_path, "organamnist", arrays)
    stream = medmnist.make(_cfg(tmp_path, flag="organamnist"))
    assert [len(e.classes) for e in stream.experiences] == [3, 3, 3, 2]  # CCSI's split
    src = stream.experiences[1].train
    grey = arrays["train_images"]
    rows = _rows(src.images[..., 0], grey)
    for c in range(3):
        np.testing.assert_array_equal(src.images[..., c], grey[rows])
    padded = medmnist.make(_cfg(tmp_path, flag="organamnist", image_size=32))
    src = padded.experiences[1].train
    assert src.images.shape[1:] == (32, 32, 3)
    # CCSI's Pad(4) + CenterCrop(32): two zero pixels on every side, the image in the middle.
    np.testing.assert_array_equal(src.images[:, 2:30, 2:30, 1], grey[rows])
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert src.images[:, border].max() == 0


def test_medmnist_plus_size(tmp_path: Path):
    assert medmnist.file_path(tmp_path, "pathmnist").name == "pathmnist.npz"
    assert medmnist.file_path(tmp_path, "pathmnist", 224).name == "pathmnist_224.npz"
    _write(tmp_path, "pathmnist", _arrays(k=9, size=16), size=64)
    # The file's name says 64 px; its images are not.
    _one_line_error(_cfg(tmp_path, flag="pathmnist", size=64), "pathmnist_64.npz", "[16, 16]", "64")
    _write(tmp_path, "pathmnist", _arrays(k=9, size=64), size=64)
    stream = medmnist.make(_cfg(tmp_path, flag="pathmnist", size=64))
    assert stream.name == "pathmnist_64"
    assert [e.classes for e in stream.experiences] == [(0, 1, 2), (3, 4), (5, 6), (7, 8)]
    assert stream.experiences[0].train.images.shape[1:] == (64, 64, 3)


def test_class_order_relabels(tmp_path: Path):
    arrays = _arrays()
    _write(tmp_path, "bloodmnist", arrays)
    order = (5, 2, 7, 0, 1, 6, 3, 4)
    stream = medmnist.make(
        _cfg(tmp_path, flag="bloodmnist", class_order=order, classes_per_step=(4, 4))
    )
    names = medmnist.INFO["bloodmnist"].class_names
    assert stream.class_names == tuple(names[c] for c in order)
    y = arrays["train_labels"][:, 0]
    for exp in stream.experiences:
        rows = _rows(exp.train.images, arrays["train_images"])
        # The image of original class order[i] carries id i.
        np.testing.assert_array_equal(np.asarray(order)[exp.train.labels], y[rows])
        assert set(y[rows].tolist()) == {order[i] for i in exp.classes}
    assert stream.experiences[0].name == "+".join(names[c] for c in order[:4])


def test_train_on_train_and_val_and_caps(tmp_path: Path):
    arrays = _arrays()
    _write(tmp_path, "bloodmnist", arrays)
    both = medmnist.make(_cfg(tmp_path, flag="bloodmnist", train_splits=("train", "val")))
    exp = both.experiences[2]
    n_train = np.isin(arrays["train_labels"], exp.classes).sum()
    n_val = np.isin(arrays["val_labels"], exp.classes).sum()
    assert len(exp.train) == n_train + n_val
    pool = np.concatenate([arrays["train_images"], arrays["val_images"]])
    assert (_rows(exp.train.images, pool) >= COUNTS["train"]).sum() == n_val
    on_val = medmnist.make(_cfg(tmp_path, flag="bloodmnist", test_split="val"))
    _rows(on_val.experiences[0].test.images, arrays["val_images"])  # all from val

    capped = dict(flag="bloodmnist", train_per_exp=5, test_per_exp=3)
    a = medmnist.make(_cfg(tmp_path, seed=1, **capped))
    b = medmnist.make(_cfg(tmp_path, seed=1, **capped))
    c = medmnist.make(_cfg(tmp_path, seed=2, **capped))
    for exp in a.experiences:
        assert len(exp.train) == 5 and len(exp.test) == 3
        assert sorted(np.bincount(exp.train.labels)[list(exp.classes)].tolist()) == [2, 3]
    same = lambda s, t: all(
        np.array_equal(e.train.images, f.train.images)
        for e, f in zip(s.experiences, t.experiences, strict=True)
    )
    assert same(a, b) and not same(a, c)


def test_multilabel_chestmnist(tmp_path: Path):
    arrays = _arrays(k=14, rgb=False, multilabel=True)
    _write(tmp_path, "chestmnist", arrays)
    _one_line_error(_cfg(tmp_path, flag="chestmnist"), "classes_per_step is not set", "K = 14")
    stream = medmnist.make(_cfg(tmp_path, flag="chestmnist", classes_per_step=(7, 7)))
    assert (stream.kind, stream.num_classes) == ("multilabel", 14)
    assert stream.experiences[0].name == "atelectasis..pneumonia"
    for exp in stream.experiences:
        for src, split in ((exp.train, "train"), (exp.test, "test")):
            y = arrays[f"{split}_labels"]
            want = np.flatnonzero(y[:, list(exp.classes)].any(axis=1))
            rows = _rows(src.images[..., 0], arrays[f"{split}_images"])
            assert rows.tolist() == want.tolist()
            np.testing.assert_array_equal(src.labels, y[rows])  # full labels
            assert src[0]["label"].shape == (14,)
    capped = medmnist.make(
        _cfg(tmp_path, flag="chestmnist", classes_per_step=(7, 7), train_per_exp=4)
    )
    assert [len(e.train) for e in capped.experiences] == [4, 4]


def test_unknown_flag_reads_class_count_from_labels(tmp_path: Path):
    _write(tmp_path, "mymnist", _arrays(k=6))
    _one_line_error(_cfg(tmp_path, flag="mymnist"), "'mymnist' has no default", "K = 6")
    stream = medmnist.make(_cfg(tmp_path, flag="mymnist", classes_per_step=(3, 3)))
    assert stream.num_classes == 6 and stream.class_names[5] == "class_5"
    wider = medmnist.make(_cfg(tmp_path, flag="mymnist", num_classes=7, classes_per_step=(4, 3)))
    assert wider.num_classes == 7
    assert len(wider.experiences[1].train) == np.isin(_arrays(k=6)["train_labels"], (4, 5)).sum()


# --------------------------------------------------------------------------- errors


def test_errors_on_fields_and_files(tmp_path: Path):
    _write(tmp_path, "bloodmnist", _arrays())
    blood = dict(flag="bloodmnist")
    _one_line_error(ml_collections.ConfigDict({"flag": "bloodmnist"}), "config.root is empty")
    _one_line_error(_cfg(tmp_path), "config.flag is empty", "bloodmnist")
    _one_line_error(_cfg(tmp_path / "nope", **blood), "nope", "does not exist", "config.root")
    msg = _one_line_error(_cfg(tmp_path, flag="pathmnist"), "pathmnist.npz", "does not exist")
    assert "bloodmnist.npz" in msg  # lists what the folder has
    _one_line_error(_cfg(tmp_path, flag="bloodmnist", size=64), "bloodmnist_64.npz")
    _one_line_error(_cfg(tmp_path, flag="organmnist3d"), "3D dataset")
    _one_line_error(_cfg(tmp_path, size=32, **blood), "config.size", "[28, 64, 128, 224]")
    _one_line_error(_cfg(tmp_path, classes_per_step=(2, 2, 2), **blood), "sum to 8", "(2, 2, 2)")
    _one_line_error(_cfg(tmp_path, class_order=(0, 1, 2), **blood), "permutation of 0..7")
    _one_line_error(_cfg(tmp_path, image_size=24, **blood), "config.image_size 24", "padded")
    _one_line_error(_cfg(tmp_path, train_per_exp=-1, **blood), "config.train_per_exp", ">= 0")
    _one_line_error(_cfg(tmp_path, test_split="dev", **blood), "config.test_split", "'dev'")
    _one_line_error(
        _cfg(tmp_path, train_splits=("train", "test"), **blood), "'test' is also in config.train"
    )
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "bloodmnist.npz").write_bytes(b"not a zip")
    _one_line_error(_cfg(tmp_path / "junk", **blood), "cannot be read as .npz")


def test_errors_on_arrays(tmp_path: Path):
    good = _arrays()

    def case(name: str, arrays: dict, *fragments: str, **cfg) -> None:
        _write(tmp_path / name, "bloodmnist", arrays)
        _one_line_error(_cfg(tmp_path / name, flag="bloodmnist", **cfg), *fragments)

    case("no_test_labels", {k: v for k, v in good.items() if k != "test_labels"}, "'test_labels'")
    case("no_val", {k: v for k, v in good.items() if not k.startswith("val")}, "'val_images'",
         train_splits=("train", "val"))  # fmt: skip
    case("float_x", {**good, "train_images": good["train_images"] / 255}, "train_images", "uint8")
    case("rgba", {**good, "test_images": np.zeros((24, 28, 28, 4), np.uint8)}, "[N,H,W,3]")
    case("short_x", {**good, "test_images": good["test_images"][:-1]}, "23 images", "hold 24")
    case("float_y", {**good, "train_labels": good["train_labels"] * 1.0}, "integer dtype")
    case("cube_y", {**good, "test_labels": good["test_labels"][:, :, None]}, "[N,1] class ids")
    nine = good["train_labels"].copy()
    nine[3] = 9
    case("outside", {**good, "train_labels": nine}, "train_labels", "[9]", "0..7")
    case("multi", {**good, "test_labels": np.eye(24, 8, dtype=np.uint8)}, "multi-hot", "class ids")
    multi = {**good, **{f"{s}_labels": np.eye(COUNTS[s], 8, dtype=np.uint8) for s in COUNTS}}
    case("blood_ml", multi, "bloodmnist labels should be [N,1]")
    grey = {**good, "test_images": good["test_images"][..., 0]}
    case("mixed", grey, "splits differ in image shape")
    # Labels are checked before any image is loaded: bad labels win over bad images.
    case("both", {**good, "train_images": good["train_images"] * 1.0, "train_labels": nine}, "[9]")
    no_test = good["test_labels"].copy()
    no_test[np.isin(no_test, (2, 3))] = 0
    case("empty_task", {**good, "test_labels": no_test}, "task 1", "no images in 'test'")
    ml = _arrays(k=14, multilabel=True)
    ml["test_labels"][0, 0] = 2
    _write(tmp_path / "ml", "chestmnist", ml)
    _one_line_error(
        _cfg(tmp_path / "ml", flag="chestmnist", classes_per_step=(14,)), "multi-hot (0/1)", "[2]"
    )


# --------------------------------------------------------------------------- config


def test_config_fields():
    c = medmnist_ci.get_config(
        "name=pathmnist,root=/data/mm,strategy=lwf,seed=3,steps=3-3-3,norm=continual"
    )
    assert (c.data.name, c.data.flag, c.data.root, c.data.size) == (
        "medmnist",
        "pathmnist",
        "/data/mm",
        28,
    )
    assert c.data.classes_per_step == (3, 3, 3) and c.data.image_size == 32
    assert (c.seed, c.data.seed, c.strategy.name) == (3, 3, "lwf")
    assert c.model.name == "resnet18" and c.model.kwargs.small_input
    assert c.model.kwargs.norm == "continual"
    assert (c.batch_size, c.epochs, c.optimizer.lr, c.optimizer.momentum) == (40, 100, 0.1, 0.0)
    big = medmnist_ci.get_config("size=224,compare")
    assert big.data.image_size == 0 and not big.model.kwargs.small_input
    assert big.data.classes_per_step == () and "replay" in big.compare
    with pytest.raises(ValueError, match="steps must look like 3-2-2-2"):
        medmnist_ci.get_config("steps=3+2")
    # CCSI brings its model (cosine head, Continual Normalization unless norm= says otherwise);
    # quick scales synthesis like the epochs, 3 of 100.
    plain = medmnist_ci.get_config("strategy=naive")
    assert (plain.model.kwargs.norm, plain.model.kwargs.head) == ("batch", "linear")
    ccsi = medmnist_ci.get_config("strategy=ccsi")
    assert (ccsi.model.kwargs.head, ccsi.model.kwargs.norm) == ("cosine", "continual")
    assert ccsi.strategy.ccsi_iterations == 5000
    assert medmnist_ci.get_config("strategy=ccsi,norm=batch").model.kwargs.norm == "batch"
    quick = medmnist_ci.get_config("quick,strategy=ccsi")
    assert (quick.strategy.ccsi_iterations, quick.strategy.di_iterations) == (150, 6)
    assert quick.model.kwargs.sigma_init == 10.0 and quick.strategy.ccsi_mem_size == 400
    for arg in medmnist_ci.EXAMPLE_ARGS:
        setup.validate_names(_registered(medmnist_ci.get_config(arg)))


def _registered(cfg):
    # Until the lead registers "medmnist" in data.DATASETS, validate_names would stop on it.
    if "medmnist" in data.DATASETS:
        return cfg
    other = ml_collections.ConfigDict(cfg.to_dict())
    other.data.name = "digits_cls"
    return other


def test_config_runs_end_to_end(tmp_path: Path, monkeypatch):
    """The quick config through ``train.run`` on a generated BloodMNIST: 4 steps, 32 px."""
    monkeypatch.setitem(data.DATASETS, "medmnist", medmnist.make)
    _write(tmp_path / "mm", "bloodmnist", _arrays())
    c = medmnist_ci.get_config(f"name=bloodmnist,root={tmp_path / 'mm'},quick")
    c.model.kwargs.widths = (4, 8, 8, 8)
    c.data.train_per_exp = 8
    c.data.test_per_exp = 4
    c.batch_size = 4
    c.eval_batch_size = 8
    c.epochs = 1
    c.progress = False
    c.log.tensorboard = False
    results = train.run(c, str(tmp_path / "run"))
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["accuracy_matrix"] == results["accuracy_matrix"]
    matrix = np.asarray(results["accuracy_matrix"], float)
    assert matrix.shape == (4, 4) and ((matrix >= 0) & (matrix <= 1)).all()
    assert np.asarray(results["task_il"]["accuracy_matrix"]).shape == (4, 4)
    assert results["stream"]["name"] == "bloodmnist" and results["stream"]["kind"] == "class"
    assert results["stream"]["experiences"][0] == "basophil+eosinophil"
