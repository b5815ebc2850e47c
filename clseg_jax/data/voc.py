"""Class-incremental Pascal VOC 2012 segmentation from a folder (MiB / PLOP / RECALL protocols).

Layout (the VOCdevkit one, plus the augmented masks if present)::

    <root>/JPEGImages/<id>.jpg
    <root>/SegmentationClass/<id>.png       palette PNG: palette index = class id, 255 = border
    <root>/SegmentationClassAug/<id>.png    grayscale PNG (the SBD-augmented set, 10,582 train)
    <root>/ImageSets/Segmentation/<split>.txt

A split list holds one id per line. The MiB / PLOP / DeepLab list files (``train_aug.txt`` in
``<root>/splits/`` or ``<root>/list/``, lines ``/JPEGImages/<id>.jpg
/SegmentationClassAug/<id>.png``) are read too: the id is the first column's file stem.
``trainaug`` and ``train_aug`` name the same list; where neither exists (VOC2012 without SBD's
masks) ``train`` is read instead, with a warning in the log. The papers train on the augmented set
(``train_aug``, 10,582 images) and test on ``val`` (1,449 images), the defaults here.

21 classes: 0 background, 1..20 ``VOC_CLASSES``; 255 (object borders) is ignored. The multi-label
(image-level) VOC stream is ``voc_ml.py``.
Protocols: ``19-1``, ``15-5``, ``15-1`` (= ``15-5s``), ``10-1``, ``10-10``, ``10-2x5``, ...;
settings: ``overlapped`` (MiB's default), ``disjoint``, ``sequential`` (``data/incremental.py``).

Config fields (``make``): ``root`` (required), ``protocol`` ("15-5"), ``setting`` ("overlapped"),
``image_size`` (512: the canvas, see ``files.fit_canvas``; VOC images are <= 500 px so nothing is
resized), ``train_split`` ("trainaug"), ``test_split`` ("val"), ``masks`` ("auto": the
augmented masks if ``SegmentationClassAug/`` exists, else ``SegmentationClass/``),
``test_fit`` ("pad": the whole test image on the canvas, scored at full resolution;
"resize_crop": shorter side resized to ``image_size`` and a centred square, MiB's reference-code
default ``--crop_val``, see ``files.resize_crop``), ``class_names`` (overrides the 21 names;
without it a ``labels.txt`` in the root, one name per line with the background first, does; their
count is the class count), ``cache_dir`` (the presence cache, ``~/.cache/clseg_jax/presence``).
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
from absl import logging

from clseg_jax.data import base, checks, files, incremental

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
CLASS_NAMES = ("background", *VOC_CLASSES)
MASKS = ("auto", "SegmentationClass", "SegmentationClassAug")
_LAYOUT = "JPEGImages/, SegmentationClass/ or SegmentationClassAug/, ImageSets/Segmentation/"
_LIST_DIRS = (Path("ImageSets") / "Segmentation", Path("splits"), Path("list"))
_ALIASES = {"trainaug": ("trainaug", "train_aug"), "train_aug": ("train_aug", "trainaug")}


def _split_file(root: Path, split: str) -> Path:
    tried = []
    names = _ALIASES.get(split, (split,))
    # The augmented list is the papers' default; a plain VOC2012 folder has only "train".
    fallback = ("train",) if split in _ALIASES else ()
    for name in (*names, *fallback):
        for folder in _LIST_DIRS:
            file = root / folder / f"{name}.txt"
            if file.is_file():
                if name in fallback:
                    logging.warning(
                        "voc: no %r list under %s: training on 'train' (VOC2012 without SBD's "
                        "augmented set: 1,464 images instead of 10,582)",
                        split,
                        root,
                    )
                return file
            tried.append(str(folder / f"{name}.txt"))
    raise ValueError(
        f"voc: split {split!r} not found under {str(root)!r} (tried {', '.join(tried[:3])}, ...); "
        f"expected <root>/ImageSets/Segmentation/<split>.txt with one image id per line"
    )


def _ids(file: Path) -> list[str]:
    ids = []
    for line in file.read_text().splitlines():
        if not line.strip():
            continue
        first = line.split()[0]
        # DeepLab-style lists give paths ("/JPEGImages/<id>.jpg ..."): the stem is the id.
        ids.append(Path(first).stem if "/" in first or first.endswith(".jpg") else first)
    if not ids:
        raise ValueError(f"voc: split file {str(file)!r} lists no image ids")
    return ids


def _mask_dir(root: Path, masks: str) -> Path:
    if masks not in MASKS:
        raise ValueError(f"voc: config.masks = {masks!r}; valid: {list(MASKS)}")
    if masks == "auto":
        masks = (
            "SegmentationClassAug"
            if (root / "SegmentationClassAug").is_dir()
            else ("SegmentationClass")
        )
    folder = root / masks
    if not folder.is_dir():
        raise ValueError(
            f"voc: folder {str(folder)!r} does not exist; config.root must hold {_LAYOUT}"
        )
    return folder


def split_source(
    root: Path, split: str, size: int, num_classes: int, masks: str = "auto", fit: str = "pad"
) -> files.SegFileSource:
    """One VOC split as a lazy source with full labels (``files.SegFileSource``)."""
    if not (root / "JPEGImages").is_dir():
        raise ValueError(
            f"voc: folder {str(root / 'JPEGImages')!r} does not exist; config.root must hold "
            f"{_LAYOUT}"
        )
    mask_dir = _mask_dir(root, masks)
    ids = _ids(_split_file(root, split))
    images = [root / "JPEGImages" / f"{i}.jpg" for i in ids]
    labels = [mask_dir / f"{i}.png" for i in ids]
    for kind, paths in (("image", images), ("mask", labels)):
        checks.files_exist(
            paths,
            lambda p, kind=kind: (
                f"voc: {kind} {str(p)!r} is listed in split {split!r} but does not exist"
            ),
        )
    return files.SegFileSource(
        images, labels, size, f"voc/{split}", num_classes=num_classes, fit=fit
    )


def make(cfg: ml_collections.ConfigDict) -> base.Stream:
    """Class-incremental VOC stream; config fields in the module docstring."""
    root = files.dataset_root(cfg, "voc", f"a VOC2012 folder with {_LAYOUT}")
    names = files.class_names(cfg, root, CLASS_NAMES, "voc")
    size = int(cfg.get("image_size", 512) or 512)
    masks = str(cfg.get("masks", "auto") or "auto")
    splits = [
        str(cfg.get(field, default) or default)
        for field, default in (("train_split", "trainaug"), ("test_split", "val"))
    ]
    test_fit = str(cfg.get("test_fit", "pad") or "pad")
    sources = [
        split_source(root, s, size, len(names), masks, fit)
        for s, fit in zip(splits, ("pad", test_fit), strict=True)
    ]
    cache = cfg.get("cache_dir", None)
    present = [files.presence(s, len(names), cache_dir=cache) for s in sources]
    return incremental.make_stream(
        "voc",
        sources[0],
        sources[1],
        present[0],
        present[1],
        names,
        str(cfg.get("protocol", "15-5")),
        str(cfg.get("setting", "overlapped")),
    )
