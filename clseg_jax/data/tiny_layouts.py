"""Tiny segmentation datasets written in the real Pascal VOC and ADE20K folder layouts.

For tests, behaviour tests and demos of the folder loaders (``data/voc.py``, ``data/ade.py``)
without the real data. Classes are the procedural shapes of ``data/shapes.py`` (1 circle,
2 square, 3 triangle, 4 cross; ``num_classes`` of them, 1..4) in its "plain" look, so a tiny
UNet learns them in seconds at 32-64 px.

Every image holds one or two shapes; the classes cycle so that each class gets images of its
own. A third of the images hold one class only, the rest two shapes of two different classes:
with the protocol ``2-2`` some images mix a class of step 0 with one of step 1, so the
``overlapped`` and ``disjoint`` settings select different images. Image sizes vary (square,
landscape 4:3, portrait 3:4, longer side ``size``), as real photos do, so the loaders' canvas
padding is exercised. Deterministic given ``seed``.

* ``write_voc``: ``JPEGImages/<id>.jpg`` (quality 95), ``SegmentationClass/<id>.png`` (palette
  PNG with VOC's colour map; optional 255 object borders as VOC draws them),
  optional ``SegmentationClassAug/<id>.png`` (grayscale, as the augmented set), and
  ``ImageSets/Segmentation/{train,val,trainaug}.txt`` (``trainaug`` lists the train ids).
* ``write_ade``: ``ADEChallengeData2016/images/{training,validation}/ADE_*.jpg`` and
  ``annotations/.../ADE_*.png`` (grayscale; 0 = "other", here the background).

Build streams from them with ``config.class_names = class_names(num_classes)`` (ADE:
``class_names(num_classes, "other")``) and ``config.image_size = size`` (the default 512-px
canvas would be mostly padding), or use ``make_voc`` / ``make_ade``: stream builders (the
``config.data`` of the "tiny_voc" / "tiny_ade" datasets) that write the folder on first use and
then read it with the real loaders.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import ml_collections
import numpy as np

from clseg_jax.data import ade, base, files, shapes, voc

MAX_CLASSES = shapes.NUM_CLASSES - 1  # foreground shapes available

# Stream id mixed into the seed: distinct from shapes.py (11, 12), digits (21, 22), digits_labels
# (31, 32) and class_steps (33), so no two generators share draws.
_TINY = 41
_VOC, _ADE = 0, 1


def class_names(num_classes: int = MAX_CLASSES, background: str = "background") -> tuple:
    """Names of the classes a tiny dataset with ``num_classes`` foreground classes uses."""
    _check_num_classes(num_classes)
    return (background, *shapes.CLASS_NAMES[1 : num_classes + 1])


def _check_num_classes(num_classes: int) -> None:
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(
            f"tiny datasets have 1..{MAX_CLASSES} foreground classes, got {num_classes}"
        )


def voc_palette() -> np.ndarray:
    """Pascal VOC's colour map, ``uint8 [256,3]`` (class c's colour from the bits of c)."""
    pal = np.zeros((256, 3), np.uint8)
    for c in range(256):
        v, r, g, b = c, 0, 0, 0
        for j in range(8):
            r |= ((v >> 0) & 1) << (7 - j)
            g |= ((v >> 1) & 1) << (7 - j)
            b |= ((v >> 2) & 1) << (7 - j)
            v >>= 3
        pal[c] = (r, g, b)
    return pal


def _borders(label: np.ndarray) -> np.ndarray:
    """``label`` with 255 on pixels next to a different label inside or around objects."""
    pad = np.pad(label, 1, mode="edge")
    h, w = label.shape
    edge = np.zeros_like(label, bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        edge |= pad[dy : dy + h, dx : dx + w] != label
    return np.where(edge, np.uint8(base.IGNORE), label)


def _images(
    n: int, num_classes: int, size: int, seed: int, dataset: int, split: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (image uint8 [h,w,3], label uint8 [h,w]) pairs with longer side ``size``."""
    rng = np.random.default_rng([seed, _TINY, dataset, split])
    pairs = list(zip(*np.triu_indices(num_classes, 1), strict=True))  # class pairs, 0-based
    out = []
    for i in range(n):
        if i % 3 == 0 or not pairs:
            classes = (1 + (i // 3) % num_classes,)  # each class gets single-class images
        else:
            a, b = pairs[int(rng.integers(len(pairs)))]
            classes = (int(a) + 1, int(b) + 1)
        # One shape per call (max_shapes=1, the class forced); the later one is drawn on top.
        label = np.zeros((1, size, size), np.uint8)
        inst = np.full((1, size, size), -1, np.int8)
        for slot, c in enumerate(classes):
            lab, _ = shapes._shape_masks(rng, 1, size, 1, top_classes=(c,))
            label = np.where(lab > 0, lab, label)
            inst = np.where(lab > 0, np.int8(slot), inst)
        image = shapes.render(rng, inst, shapes.DOMAINS[0], max_shapes=2)[0]
        label = label[0]
        # Landscape, portrait or square, cut around the objects' centre so they stay in view.
        form = (i // 3) % 3
        short = max(1, round(size * 3 / 4))
        ys, xs = np.nonzero(label)
        if form and ys.size:
            centre = (ys.mean(), xs.mean())[form - 1]
            start = int(np.clip(round(centre - short / 2), 0, size - short))
            cut = slice(start, start + short)
            image, label = (image[cut], label[cut]) if form == 1 else (image[:, cut], label[:, cut])
        out.append((np.ascontiguousarray(image), np.ascontiguousarray(label)))
    return out


def _write_jpeg(image: np.ndarray, jpg: Path, quality: int = 95) -> None:
    from PIL import Image

    Image.fromarray(image).save(jpg, quality=quality, subsampling=0)


def write_voc(
    root: str | os.PathLike,
    *,
    num_classes: int = MAX_CLASSES,
    n_train: int = 24,
    n_val: int = 12,
    size: int = 32,
    seed: int = 0,
    borders: bool = False,
    aug: bool = False,
) -> Path:
    """Writes a tiny Pascal VOC 2012 folder at ``root``; returns ``root`` (``config.root``).

    Args:
        num_classes: foreground classes (1..4), named by ``class_names(num_classes)``.
        n_train / n_val: images per split.
        size: longer image side in pixels.
        borders: draw 255 (ignore) borders around objects in the masks, as VOC does.
        aug: also write ``SegmentationClassAug`` (grayscale masks) for every image.
    """
    from PIL import Image

    _check_num_classes(num_classes)
    root = Path(root)
    folders = {
        "jpg": root / "JPEGImages",
        "png": root / "SegmentationClass",
        "aug": root / "SegmentationClassAug",
        "sets": root / "ImageSets" / "Segmentation",
    }
    for key, folder in folders.items():
        if key != "aug" or aug:
            folder.mkdir(parents=True, exist_ok=True)
    palette = voc_palette().reshape(-1).tolist()
    ids = {}
    for split, (name, n) in enumerate((("train", n_train), ("val", n_val))):
        ids[name] = []
        for i, (image, label) in enumerate(_images(n, num_classes, size, seed, _VOC, split)):
            # VOC ids are "<year>_<number>"; one year per split keeps them apart.
            iid = f"{2007 + split}_{i:06d}"
            ids[name].append(iid)
            if borders:
                label = _borders(label)
            _write_jpeg(image, folders["jpg"] / f"{iid}.jpg")
            # frombytes keeps the values as palette indices (VOC's masks are "P" images).
            mask = Image.frombytes("P", label.shape[::-1], label.tobytes())
            mask.putpalette(palette)
            mask.save(folders["png"] / f"{iid}.png")
            if aug:
                Image.fromarray(label).save(folders["aug"] / f"{iid}.png")
    for name, listed in (("train", ids["train"]), ("val", ids["val"]), ("trainaug", ids["train"])):
        (folders["sets"] / f"{name}.txt").write_text("".join(f"{i}\n" for i in listed))
    # The folder names its classes, so it is read with any class count (files.class_names).
    (root / files.LABELS_FILE).write_text("".join(f"{n}\n" for n in class_names(num_classes)))
    return root


def write_ade(
    root: str | os.PathLike,
    *,
    num_classes: int = MAX_CLASSES,
    n_train: int = 24,
    n_val: int = 12,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """Writes a tiny ADE20K (SceneParsing) folder; returns ``root/ADEChallengeData2016``.

    Masks are grayscale PNGs with 0 = "other" (here the background) and 1..num_classes.
    """
    from PIL import Image

    _check_num_classes(num_classes)
    ade = Path(root) / "ADEChallengeData2016"
    for split, (folder, stem, n) in enumerate(
        (("training", "train", n_train), ("validation", "val", n_val))
    ):
        images = ade / "images" / folder
        annotations = ade / "annotations" / folder
        images.mkdir(parents=True, exist_ok=True)
        annotations.mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(_images(n, num_classes, size, seed, _ADE, split)):
            name = f"ADE_{stem}_{i + 1:08d}"
            _write_jpeg(image, images / f"{name}.jpg")
            Image.fromarray(label).save(annotations / f"{name}.png")
    (ade / files.LABELS_FILE).write_text(
        "".join(f"{n}\n" for n in class_names(num_classes, background="other"))
    )
    return ade


def _cached(kind: str, cfg: ml_collections.ConfigDict, write) -> Path:
    """The folder of a tiny dataset, written once (atomically) under ``config.root``."""
    k = int(cfg.get("num_fg", MAX_CLASSES))
    n_train, n_val = int(cfg.get("n_train", 256)), int(cfg.get("n_val", 96))
    size, seed = int(cfg.get("image_size", 32)), int(cfg.get("layout_seed", 0))
    parent = Path(os.path.expanduser(str(cfg.get("root", None) or "~/.cache/clseg_jax/tiny")))
    folder = parent / f"{kind}-k{k}-n{n_train}-{n_val}-s{size}-seed{seed}"
    if not folder.is_dir():
        tmp = parent / f".{folder.name}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp, num_classes=k, n_train=n_train, n_val=n_val, size=size, seed=seed)
        try:
            os.rename(tmp, folder)  # atomic: a concurrent writer's copy wins, identical
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _stream_cfg(
    cfg: ml_collections.ConfigDict, root: Path, names: tuple
) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict(
        {
            "root": str(root),
            "class_names": names,
            "image_size": int(cfg.get("image_size", 32)),
            "protocol": str(cfg.get("protocol", "2-2")),
            "setting": str(cfg.get("setting", "overlapped")),
            "test_fit": str(cfg.get("test_fit", "pad") or "pad"),
        }
    )
    if cfg.get("cache_dir", None):
        out.cache_dir = str(cfg.cache_dir)
    return out


def make_voc(cfg: ml_collections.ConfigDict) -> base.Stream:
    """The "tiny_voc" stream: ``write_voc`` on first use, then ``voc.make``.

    Config fields: ``root`` (parent folder, ``~/.cache/clseg_jax/tiny``), ``num_fg`` (4),
    ``n_train`` (256), ``n_val`` (96), ``image_size`` (32: image side and canvas),
    ``layout_seed`` (0; the data, not the run, so runs with different seeds share it),
    ``protocol`` ("2-2"), ``setting`` ("overlapped"), ``test_fit``, ``cache_dir``.
    """
    root = _cached("voc", cfg, write_voc)
    names = class_names(int(cfg.get("num_fg", MAX_CLASSES)))
    stream_cfg = _stream_cfg(cfg, root, names)
    stream_cfg.train_split = "train"
    return voc.make(stream_cfg)


def make_ade(cfg: ml_collections.ConfigDict) -> base.Stream:
    """The "tiny_ade" stream: ``write_ade`` on first use, then ``ade.make`` (fields: ``make_voc``).

    ``test_other`` ("ignore") is read too: with "ignore" the tiny test sets score no background.
    """
    root = _cached("ade", cfg, lambda path, **kw: write_ade(path, **kw).parent)
    names = class_names(int(cfg.get("num_fg", MAX_CLASSES)), background="other")
    stream_cfg = _stream_cfg(cfg, root, names)
    stream_cfg.test_other = str(cfg.get("test_other", "ignore") or "ignore")
    return ade.make(stream_cfg)


def replay_images(class_id: int, n: int, size: tuple[int, int], rng: np.random.Generator):
    """``n`` new images of one shape class, uint8 ``[n,H,W,3]``: a replay source for RECALL.

    The tiny datasets' stand-in for RECALL's web-crawled or GAN images of a past class: freshly
    drawn pictures of the class (same look, other layouts than any training image), with no
    label (the old model labels them). Use as
    ``strategy.recall_source = "callable:clseg_jax.data.tiny_layouts:replay_images"``.
    """
    h, w = size
    side = max(h, w)
    label, _ = shapes._shape_masks(rng, n, side, 1, top_classes=(int(class_id),))
    inst = np.where(label > 0, np.int8(0), np.int8(-1))
    images = shapes.render(rng, inst, shapes.DOMAINS[0], max_shapes=1)
    return np.ascontiguousarray(images[:, :h, :w])
