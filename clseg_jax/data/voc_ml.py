"""Multi-label Pascal VOC (``voc_ml``): whole-image labels from the VOCdevkit annotations.

The image-level counterpart of ``voc.py`` (segmentation, same 20 classes ``voc.VOC_CLASSES``
without background). Labels come from ``Annotations/<id>.xml`` alone; JPEGs are decoded lazily,
one per element read (``ImageFileSource``). The multi-label protocol is ``class_steps``'s.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np

from clseg_jax.data import base, checks, class_steps
from clseg_jax.data.voc import VOC_CLASSES


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
            raise ValueError(
                f"{self.name}: {path}: cannot be decoded ({checks.one_line(err)})"
            ) from None
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
    size = checks.int_setting(cfg, "image_size", 224, 8, what)
    caps = (
        checks.int_setting(cfg, "train_per_exp", 0, 0, what),
        checks.int_setting(cfg, "test_per_exp", 0, 0, what),
    )
    seed = checks.int_setting(cfg, "seed", 0, 0, what)
    steps = cfg.get("classes_per_step", (7, 7, 6))
    tasks = class_steps.split_classes(steps, len(VOC_CLASSES), what, first=0)
    include_difficult = bool(cfg.get("include_difficult", True))
    fulls, parts = [], []
    for field, default in (("train_split", "train"), ("test_split", "val")):
        split = str(cfg.get(field, default) or default)
        full = _voc_split(root, split, field, size, include_difficult)
        part = class_steps.partition(full.labels, tasks)
        class_steps.check_partition(part, tasks, VOC_CLASSES, what, f"{split!r}")
        fulls.append(full)
        parts.append(part)
    exps = class_steps.capped_experiences(
        what, VOC_CLASSES, tasks, parts, caps, seed, lambda s, idx, name: fulls[s].subset(idx, name)
    )
    return base.Stream(what, "multilabel", len(VOC_CLASSES), VOC_CLASSES, exps)
