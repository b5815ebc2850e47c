"""MedMNIST v2 (Yang et al., Scientific Data 2023) and MedMNIST+ as class-incremental streams.

Reads the ``.npz`` files MedMNIST distributes, from a local folder (nothing is downloaded):
``<root>/<flag>.npz`` for the 28 px originals and ``<root>/<flag>_<size>.npz`` for the MedMNIST+
sizes 64, 128 and 224 (the ``medmnist`` package's own naming, ``{flag}{size_flag}.npz`` with an
empty size flag at 28). Each file holds ``{train,val,test}_images`` uint8 ``[N,S,S]``
(grayscale) or ``[N,S,S,3]`` (RGB) and ``{train,val,test}_labels`` integer ``[N,1]`` (single
label; ``[N]`` is accepted too) or ``[N,K]`` multi-hot (ChestMNIST, 14 findings). Grayscale is
repeated to 3 channels. 3D datasets (``*mnist3d``) are rejected with a one-line error.

Two kinds of stream, decided by the labels (and checked against ``INFO`` for known flags):

* single-label (every 2D dataset but ChestMNIST): kind ``"class"``, elements ``{"image": uint8
  [H,W,3], "label": uint8 []}``. Experience t holds the images of its step's classes: train
  images from ``train_splits`` (``train``, optionally ``+ val``) and test images from
  ``test_split`` (``test``). RetinaMNIST's ordinal grades are 5 classes (MedMNIST's reference
  ``train.py`` fits them with cross-entropy too).
* multi-label (ChestMNIST): kind ``"multilabel"``, elements ``{"image", "label": uint8 [K]}`` with
  full labels, partitioned as ``npz_ml`` does (``class_steps``: an image joins the task of
  every class it holds; images with no finding join none).

Class ids follow ``class_order`` (default MedMNIST's label order): the class ``class_order[i]``
becomes id ``i``, so each step's classes stay consecutive (``order_list.index(y)`` in the CCSI and
iCaRL code) and ``Stream.class_names`` is reordered with them.

Default ``classes_per_step`` exist for the four datasets of the CCSI code (Ayromlou et al.,
github.com/sanaAyrml/Class-Impresion-for-Data-free-Incremental-Learning, ``configs/<data>/
sweep_task_*.yaml``: ``nb_cl_fg`` classes first, then ``nb_cl`` per step): BloodMNIST and
TissueMNIST (2,2,2,2), PathMNIST (3,2,2,2), OrganAMNIST (3,3,3,2). Other datasets need
``config.classes_per_step``. That code also pads 28 px images to 32 (``Pad(4)`` then
``CenterCrop(32)``: 2 zero pixels a side); ``image_size=32`` does the same.

Config fields: ``root`` (folder, required), ``flag`` (e.g. "bloodmnist", required; ``name`` is
the registry key "medmnist"), ``size`` (28 | 64 | 128 | 224; default 28), ``classes_per_step``
(see above), ``class_order`` (empty = 0..K-1), ``num_classes`` (0 = from ``INFO``; for an unknown
flag, the labels' largest id + 1 or the multi-hot width), ``train_splits`` (("train",)),
``test_split`` ("test"), ``image_size`` (0 = the file's size; larger pads with zeros, centred),
``train_per_exp`` / ``test_per_exp`` (0 = all; else at most this many per experience, split evenly
over the step's classes for single-label streams), ``seed`` (0, for the caps). Every problem is a
one-line ``ValueError`` naming the file, array or field.

Memory: a split is loaded whole before its experiences are cut from it (``[N,S,S,3]`` uint8: 0.2 GB
for PathMNIST at 28 px, 13.5 GB at 224).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import ml_collections
import numpy as np

from clseg_jax.data import base, checks, class_steps

SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")


class Info(NamedTuple):
    """What MedMNIST's ``INFO`` (medmnist/info.py) says of a 2D dataset."""

    class_names: tuple[str, ...]
    multilabel: bool = False


_ORGANS = (
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
)
# Names as in INFO's "label" maps; long ones shortened (BloodMNIST's "immature granulocytes
# (myelocytes, ...)", DermaMNIST's and PathMNIST's descriptions), since they name experiences.
INFO: dict[str, Info] = {
    "pathmnist": Info(
        (
            "adipose",
            "background",
            "debris",
            "lymphocytes",
            "mucus",
            "smooth muscle",
            "normal mucosa",
            "stroma",
            "adenocarcinoma",
        )
    ),
    "chestmnist": Info(
        (
            "atelectasis",
            "cardiomegaly",
            "effusion",
            "infiltration",
            "mass",
            "nodule",
            "pneumonia",
            "pneumothorax",
            "consolidation",
            "edema",
            "emphysema",
            "fibrosis",
            "pleural",
            "hernia",
        ),
        multilabel=True,
    ),
    "dermamnist": Info(
        (
            "actinic keratoses",
            "basal cell carcinoma",
            "benign keratosis",
            "dermatofibroma",
            "melanoma",
            "melanocytic nevi",
            "vascular lesions",
        )
    ),
    "octmnist": Info(("CNV", "DME", "drusen", "normal")),
    "pneumoniamnist": Info(("normal", "pneumonia")),
    "retinamnist": Info(("0", "1", "2", "3", "4")),
    "breastmnist": Info(("malignant", "normal/benign")),
    "bloodmnist": Info(
        (
            "basophil",
            "eosinophil",
            "erythroblast",
            "immature granulocytes",
            "lymphocyte",
            "monocyte",
            "neutrophil",
            "platelet",
        )
    ),
    "tissuemnist": Info(
        (
            "collecting duct",
            "distal convoluted tubule",
            "glomerular endothelial",
            "interstitial endothelial",
            "leukocytes",
            "podocytes",
            "proximal tubule",
            "thick ascending limb",
        )
    ),
    "organamnist": Info(_ORGANS),
    "organcmnist": Info(_ORGANS),
    "organsmnist": Info(_ORGANS),
}
# The CCSI code's splits (module docstring).
CCSI_STEPS: dict[str, tuple[int, ...]] = {
    "bloodmnist": (2, 2, 2, 2),
    "tissuemnist": (2, 2, 2, 2),
    "pathmnist": (3, 2, 2, 2),
    "organamnist": (3, 3, 3, 2),
}

_WHAT = "medmnist"
_CAP = 41  # stream id in the seed tuple, distinct from class_steps.CAP_STREAM and digits'


def file_path(root: str | os.PathLike, flag: str, size: int = 28) -> Path:
    """``<root>/<flag>.npz`` at 28 px, ``<root>/<flag>_<size>.npz`` otherwise (MedMNIST+)."""
    name = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
    return Path(os.path.expanduser(str(root))) / name


def _locate(cfg: ml_collections.ConfigDict) -> tuple[Path, str, int]:
    """The file to read, the flag and the size, with one-line errors for each bad field."""
    root = cfg.get("root", None)
    if not root:
        raise ValueError(f"{_WHAT}: config.root is empty; set it to the folder holding <flag>.npz")
    flag = str(cfg.get("flag", None) or "").strip().lower()
    if not flag:
        raise ValueError(
            f"{_WHAT}: config.flag is empty; set it to a MedMNIST dataset, e.g. 'bloodmnist' "
            f"(known: {sorted(INFO)})"
        )
    if flag.endswith("3d"):
        raise ValueError(
            f"{_WHAT}: {flag!r} is a 3D dataset (volumes); only the 2D datasets are supported"
        )
    size = checks.int_setting(cfg, "size", 28, 1, _WHAT)
    if size not in SIZES:
        raise ValueError(f"{_WHAT}: config.size must be one of {list(SIZES)}, got {size}")
    folder = Path(os.path.expanduser(str(root)))
    if not folder.is_dir():
        raise ValueError(f"{_WHAT}: folder {str(folder)!r} does not exist (config.root)")
    file = file_path(folder, flag, size)
    if not file.is_file():
        have = sorted(p.name for p in folder.glob("*.npz"))[:8]
        raise ValueError(
            f"{_WHAT}: file {str(file)!r} does not exist (config.flag={flag!r}, "
            f"config.size={size}); .npz files in the folder: {have}"
        )
    return file, flag, size


def _check_images(x: np.ndarray, n: int, where: str, size: int) -> None:
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] != 3):
        raise ValueError(
            f"{where} must be uint8 [N,H,W] (grayscale) or [N,H,W,3] (RGB), "
            f"got {x.dtype} {list(x.shape)}"
        )
    if len(x) != n:
        raise ValueError(f"{where} holds {len(x)} images but the labels hold {n}")
    if x.shape[1:3] != (size, size):
        raise ValueError(
            f"{where} images are {list(x.shape[1:3])} but config.size is {size} "
            f"(expected [{size}, {size}])"
        )


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    """Single-label ``[N,1]`` / ``[N]`` -> ``[N]``; multi-hot ``[N,K]`` (K > 1) unchanged."""
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        raise ValueError(f"{where} must have an integer dtype, got {y.dtype}")
    if y.ndim not in (1, 2):
        raise ValueError(f"{where} must be [N,1] class ids or [N,K] multi-hot, got {list(y.shape)}")
    return y.reshape(len(y)) if y.ndim == 1 or y.shape[1] == 1 else y


def _check_labels(y: np.ndarray, k: int, where: str) -> None:
    """One-line error if single-label ids leave ``0..k-1`` or multi-hot ones leave 0/1."""
    if y.ndim == 2:
        if y.shape[1] != k:
            raise ValueError(f"{where} has {y.shape[1]} columns but the class set has K = {k}")
        checks.multi_hot(y, where)
        return
    bad = np.unique(y[(y < 0) | (y >= k)])
    if bad.size:
        raise ValueError(f"{where} has labels {bad[:5].tolist()} outside the class set 0..{k - 1}")


def _order(cfg: ml_collections.ConfigDict, k: int) -> np.ndarray:
    """``class_order`` as an int array, checked to be a permutation of ``0..k-1``."""
    order = cfg.get("class_order", None)
    if order is None or len(order) == 0:
        return np.arange(k)
    out = np.asarray([int(c) for c in order])
    if sorted(out.tolist()) != list(range(k)):
        raise ValueError(
            f"{_WHAT}: config.class_order must be a permutation of 0..{k - 1}, "
            f"got {tuple(out.tolist())}"
        )
    return out


def _fit(x: np.ndarray, image_size: int) -> np.ndarray:
    """``[M,S,S]`` or ``[M,S,S,3]`` uint8 -> ``[M,T,T,3]``: grey repeated, zero border to T."""
    if x.ndim == 3:
        x = np.repeat(x[..., None], 3, axis=-1)
    pad = image_size - x.shape[1]
    if pad > 0:
        lo = pad // 2
        x = np.pad(x, ((0, 0), (lo, pad - lo), (lo, pad - lo), (0, 0)))
    return np.ascontiguousarray(x)


def _splits(cfg: ml_collections.ConfigDict) -> tuple[tuple[str, ...], str]:
    train = cfg.get("train_splits", None) or ("train",)
    train = (train,) if isinstance(train, str) else tuple(str(s) for s in train)
    test = str(cfg.get("test_split", None) or "test")
    for field, value in [*(("train_splits", s) for s in train), ("test_split", test)]:
        if value not in SPLITS:
            raise ValueError(f"{_WHAT}: config.{field}: unknown split {value!r}; valid: {SPLITS}")
    if test in train:
        raise ValueError(f"{_WHAT}: config.test_split {test!r} is also in config.train_splits")
    return train, test


def _load_labels(
    file: Path, flag: str, splits: Sequence[str]
) -> tuple[dict[str, np.ndarray], bool]:
    """Every split's labels (``[N]`` ids or ``[N,K]`` multi-hot) and whether they are multi-hot.

    Checks that the images are there too, without loading them.
    """
    labels = [f"{s}_labels" for s in splits]
    arrays = checks.read_npz(file, labels, _WHAT, require=[f"{s}_images" for s in splits])
    ys = {s: _labels(arrays[f"{s}_labels"], f"{_WHAT}: {file}: {s}_labels") for s in splits}
    multilabel = ys[splits[-1]].ndim == 2
    if any((y.ndim == 2) != multilabel for y in ys.values()):
        raise ValueError(f"{_WHAT}: {file}: some splits are multi-hot [N,K], others class ids")
    info = INFO.get(flag)
    if info is not None and info.multilabel != multilabel:
        want, got = ("multi-hot [N,K]", "[N,1]") if info.multilabel else ("[N,1]", "[N,K]")
        raise ValueError(
            f"{_WHAT}: {file}: {flag} labels should be {want}, got {got} "
            f"({list(ys[splits[-1]].shape)})"
        )
    return ys, multilabel


def _class_set(
    cfg: ml_collections.ConfigDict, flag: str, ys: dict[str, np.ndarray], file: Path
) -> tuple[int, tuple[str, ...]]:
    """K and the class names: ``config.num_classes``, else ``INFO``'s, else what labels show."""
    info = INFO.get(flag)
    k = checks.int_setting(cfg, "num_classes", 0, 0, _WHAT)
    if not k and info is not None:
        k = len(info.class_names)
    if not k:
        any_y = next(iter(ys.values()))
        top = max((int(y.max()) for y in ys.values() if y.size), default=0)
        k = any_y.shape[1] if any_y.ndim == 2 else top + 1
    for s, y in ys.items():
        _check_labels(y, k, f"{_WHAT}: {file}: {s}_labels")
    if info is not None and len(info.class_names) == k:
        return k, info.class_names
    return k, tuple(f"class_{c}" for c in range(k))


def _load_images(file: Path, ys: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Every split's images, checked against its labels, ``config.size`` and the other splits."""
    arrays = checks.read_npz(file, [f"{s}_images" for s in ys], _WHAT)
    xs = {s: arrays[f"{s}_images"] for s in ys}
    for s, x in xs.items():
        _check_images(x, len(ys[s]), f"{_WHAT}: {file}: {s}_images", size)
    shapes = {s: list(x.shape[1:]) for s, x in xs.items()}
    if len({tuple(v) for v in shapes.values()}) > 1:
        raise ValueError(f"{_WHAT}: {file}: splits differ in image shape: {shapes}")
    return xs


def _join(parts: dict[str, np.ndarray], splits: Sequence[str]) -> np.ndarray:
    return parts[splits[0]] if len(splits) == 1 else np.concatenate([parts[s] for s in splits])


def make(cfg: ml_collections.ConfigDict) -> base.Stream:
    """Class-incremental stream of one MedMNIST dataset (fields: module docstring).

    Returns:
        kind "class" (elements ``{"image": uint8 [T,T,3], "label": uint8 []}``) or "multilabel"
        (``"label": uint8 [K]``, full labels); class ids and names in ``class_order``; stream name
        the file's stem (``bloodmnist``, ``bloodmnist_64``).
    """
    file, flag, size = _locate(cfg)
    train_splits, test_split = _splits(cfg)
    image_size = checks.int_setting(cfg, "image_size", 0, 0, _WHAT) or size
    if image_size < size:
        raise ValueError(
            f"{_WHAT}: config.image_size {image_size} is below the file's size {size}; "
            f"images are only padded, never shrunk"
        )
    caps = (
        checks.int_setting(cfg, "train_per_exp", 0, 0, _WHAT),
        checks.int_setting(cfg, "test_per_exp", 0, 0, _WHAT),
    )
    seed = checks.int_setting(cfg, "seed", 0, 0, _WHAT)

    # Labels first: label, class-set and step problems are reported before any image loads.
    ys, multilabel = _load_labels(file, flag, (*train_splits, test_split))
    k, names = _class_set(cfg, flag, ys, file)
    steps = cfg.get("classes_per_step", None) or CCSI_STEPS.get(flag)
    if not steps:
        raise ValueError(
            f"{_WHAT}: config.classes_per_step is not set and {flag!r} has no default "
            f"(defaults: {CCSI_STEPS}); give task sizes summing to K = {k}"
        )
    tasks = class_steps.split_classes(steps, k, f"{_WHAT}: {flag}", first=0)
    order = _order(cfg, k)  # class order[i] becomes id i
    names = tuple(names[c] for c in order)
    rank = np.argsort(order)
    ys = {s: y[:, order] if multilabel else rank[y] for s, y in ys.items()}
    xs = _load_images(file, ys, size)
    # (images, labels, split names, role): the training side (train_splits joined), the test.
    sides = (
        (_join(xs, train_splits), _join(ys, train_splits), "+".join(train_splits), "train"),
        (xs[test_split], ys[test_split], test_split, "test"),
    )
    del xs, ys

    exps = []
    for t, task in enumerate(tasks):
        name = class_steps.step_name(names, task)
        sources = []
        for i, (x, y, split, role) in enumerate(sides):
            rng = np.random.default_rng([seed, _CAP, t, i])
            if multilabel:
                idx = class_steps.cap(class_steps.holding(y, task), caps[i], rng)
            else:
                idx = class_steps.balanced(y, task, caps[i], rng)
            if len(idx) == 0:
                raise ValueError(
                    f"{_WHAT}: {file}: task {t} (classes {name}) has no images in {split!r}; "
                    f"every task needs {role} images"
                )
            src_name = f"{file.stem}/{name}/{role}"
            sources.append(base.LabelSource(_fit(x[idx], image_size), y[idx], src_name))
        exps.append(base.Experience(t, name, task, sources[0], sources[1]))
    kind = "multilabel" if multilabel else "class"
    return base.Stream(file.stem, kind, k, names, tuple(exps))
