"""Lazy file-backed segmentation sources: decode one image/mask pair per element read.

``SegFileSource`` reads a JPEG (or any PIL-readable image) and a class-index PNG mask per
``__getitem__`` and returns ``{"image": uint8 [S,S,3], "label": uint8 [S,S]}`` on a fixed
``S x S`` canvas (``fit_canvas``):

* masks are read as *indices*: a palette PNG (mode "P", VOC's ``SegmentationClass``) gives its
  palette indices, not the RGB colours; a grayscale PNG (mode "L", VOC's
  ``SegmentationClassAug``, ADE20K's annotations) its values. 255 = ignore.
* an optional ``label_map`` (uint8 LUT ``[256]``) renames values (ADE20K's 0 = "other" to
  ignore at test, tfds pets' 1/2/3 to 1/0/255).
* an image whose longer side exceeds ``S`` is downscaled to longer side ``S`` (image bilinear,
  mask nearest), then every image is padded bottom/right to ``S x S`` (image 0, label 255). With
  ``S = 512`` Pascal VOC (at most 500 px) is never resized: evaluation at full resolution, as
  MiB's code scores without ``--crop_val`` (batch size 1, uncropped); the padding counts for
  nothing. ``fit="resize_crop"`` gives that code's default instead (``resize_crop``).

``presence`` reads every mask once and records which classes each image holds (``bool [N,K]``),
cached on disk under a hash of the mask paths and modification times, because the incremental
settings (``data/incremental.py``) select images by it.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clseg_jax.data import base, checks

DEFAULT_CACHE = Path("~/.cache/clseg_jax/presence")


def dataset_root(cfg, what: str, layout: str) -> Path:
    """``config.root`` as an existing folder, or a one-line error naming the expected layout."""
    path = cfg.get("root", None)
    if not path:
        raise ValueError(f"{what}: config.root is empty; set it to the dataset folder ({layout})")
    root = Path(os.path.expanduser(str(path)))
    if not root.is_dir():
        raise ValueError(f"{what}: folder {str(root)!r} does not exist (config.root; {layout})")
    return root


LABELS_FILE = "labels.txt"


def class_names(cfg, root: Path, default: Sequence[str], where: str) -> tuple[str, ...]:
    """A dataset folder's class names, background first: ``config.class_names`` when given, else
    ``<root>/labels.txt`` (one name per line) when present, else ``default``; their count is
    the class count."""
    given = tuple(str(n) for n in (cfg.get("class_names", None) or ()))
    if given:
        names, origin = given, "config.class_names"
    elif (root / LABELS_FILE).is_file():
        lines = (root / LABELS_FILE).read_text().splitlines()
        names, origin = (
            tuple(line.strip() for line in lines if line.strip()),
            str(root / LABELS_FILE),
        )
    else:
        return tuple(default)
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(
            f"{where}: {origin} must name the background and at least one class, each once; "
            f"got {list(names)}"
        )
    return names


def check_lut(label_map: np.ndarray | Sequence[int] | None, where: str) -> np.ndarray | None:
    """Validates a label LUT: ``uint8 [256]`` (value v becomes ``label_map[v]``), or None."""
    if label_map is None:
        return None
    lut = np.asarray(label_map)
    if lut.shape != (256,) or lut.min() < 0 or lut.max() > 255:
        raise ValueError(
            f"{where}: label_map must be 256 values in 0..255 (a LUT), got {lut.shape}"
        )
    return lut.astype(np.uint8)


def lut_from_pairs(pairs: dict[int, int], default: str = "identity") -> np.ndarray:
    """A LUT ``uint8 [256]`` mapping ``value -> class`` for the given pairs.

    Args:
        pairs: e.g. ``{1: 1, 2: 0, 3: 255}``.
        default: other values stay themselves ("identity") or become ignore ("ignore").
    """
    lut = np.arange(256, dtype=np.uint8) if default == "identity" else np.full(256, 255, np.uint8)
    for value, cls in pairs.items():
        lut[int(value)] = int(cls)
    return lut


def read_mask(path: str | os.PathLike, where: str) -> np.ndarray:
    """Class indices ``uint8 [H,W]`` of a palette or grayscale mask (never palette colours)."""
    from PIL import Image  # only when a mask is read

    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("P", "L"):
                # np.asarray of a "P" image gives its palette indices: VOC's class ids.
                return np.array(im, np.uint8)
            if mode in ("I", "I;16", "I;16B", "I;16L"):
                wide = np.array(im)
            else:
                raise ValueError(
                    f"{where}: {path}: mask has mode {mode!r}; expected a palette ('P') or "
                    f"grayscale ('L') PNG of class indices (an RGB colour mask cannot be read)"
                )
    except OSError as err:  # missing, truncated, not an image
        raise ValueError(f"{where}: {path}: mask cannot be read ({checks.one_line(err)})") from None
    if wide.size and (wide.min() < 0 or wide.max() > 255):
        raise ValueError(f"{where}: {path}: mask values {int(wide.max())} exceed 255")
    return wide.astype(np.uint8)


def read_image(path: str | os.PathLike, where: str) -> np.ndarray:
    """RGB ``uint8 [H,W,3]``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), np.uint8)
    except OSError as err:
        raise ValueError(
            f"{where}: {path}: image cannot be read ({checks.one_line(err)})"
        ) from None


def fit_canvas(image: np.ndarray, label: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Downscales to longer side ``size`` if larger, then pads bottom/right to ``size x size``.

    Args:
        image: ``uint8 [H,W,3]``.
        label: ``uint8 [H,W]`` class indices.
        size: canvas side S.

    Returns:
        ``{"image": uint8 [S,S,3] (padding 0), "label": uint8 [S,S] (padding 255)}``.
    """
    h, w = label.shape
    if max(h, w) > size:
        from PIL import Image

        scale = size / max(h, w)
        new = (max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale))))
        image = np.asarray(Image.fromarray(image).resize(new, Image.BILINEAR))
        label = np.asarray(Image.fromarray(label).resize(new, Image.NEAREST))
        h, w = label.shape
    out_image = np.zeros((size, size, 3), np.uint8)
    out_label = np.full((size, size), base.IGNORE, np.uint8)
    out_image[:h, :w] = image
    out_label[:h, :w] = label
    return {"image": out_image, "label": out_label}


def resize_crop(image: np.ndarray, label: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Shorter side resized to ``size`` (image bilinear, mask nearest), then a centred square.

    MiB's reference evaluation default (``--crop_val``: torchvision ``Resize(size)`` then
    ``CenterCrop(size)``): the longer side becomes ``int(size * long / short)``, and the crop
    starts at ``round((long - size) / 2)``. Parts of wide images are not scored.

    Returns:
        ``{"image": uint8 [S,S,3], "label": uint8 [S,S]}``.
    """
    from PIL import Image

    h, w = label.shape
    if (h, w) != (size, size):
        new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        image = np.asarray(Image.fromarray(image).resize(new, Image.BILINEAR))
        label = np.asarray(Image.fromarray(label).resize(new, Image.NEAREST))
        h, w = label.shape
    top, left = round((h - size) / 2), round((w - size) / 2)
    return {
        "image": np.ascontiguousarray(image[top : top + size, left : left + size]),
        "label": np.ascontiguousarray(label[top : top + size, left : left + size]),
    }


FITS = {"pad": fit_canvas, "resize_crop": resize_crop}


class SegFileSource:
    """Random-access source over image/mask file pairs, decoded on ``__getitem__``.

    Elements: ``{"image": uint8 [S,S,3], "label": uint8 [S,S]}`` (see ``fit_canvas``), full
    labels. ``__repr__`` is stable (no memory address) because grain keys iterator state by it.

    Args:
        image_paths: one image file per element.
        label_paths: one mask file per element (palette or grayscale PNG of class indices).
        size: canvas side S.
        name: used in errors and the repr.
        label_map: optional uint8 LUT ``[256]`` applied to mask values before anything else.
        num_classes: when given, labels outside ``0..num_classes-1`` (255 excepted) are an error.
        fit: "pad" (``fit_canvas``, the default) or "resize_crop" (``resize_crop``).
    """

    def __init__(
        self,
        image_paths: Sequence[str | os.PathLike],
        label_paths: Sequence[str | os.PathLike],
        size: int,
        name: str,
        label_map: np.ndarray | Sequence[int] | None = None,
        num_classes: int | None = None,
        fit: str = "pad",
    ):
        if fit not in FITS:
            raise ValueError(f"{name}: fit {fit!r} unknown; valid: {list(FITS)}")
        if len(image_paths) != len(label_paths):
            raise ValueError(f"{name}: {len(image_paths)} images but {len(label_paths)} masks")
        if int(size) < 1:
            raise ValueError(f"{name}: canvas size must be >= 1, got {size}")
        self.image_paths = tuple(str(p) for p in image_paths)
        self.label_paths = tuple(str(p) for p in label_paths)
        self.size = int(size)
        self.name = name
        self.label_map = check_lut(label_map, name)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.fit = fit

    def __len__(self) -> int:
        return len(self.image_paths)

    def label(self, i: int) -> np.ndarray:
        """Element i's mask at its own resolution, mapped and checked: ``uint8 [H,W]``."""
        path = self.label_paths[i]
        mask = read_mask(path, self.name)
        if self.label_map is not None:
            mask = self.label_map[mask]
        if self.num_classes is not None:
            base.check_labels(mask, self.num_classes, f"{self.name}: {path}")
        return mask

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        image = read_image(self.image_paths[i], self.name)
        label = self.label(i)
        if image.shape[:2] != label.shape:
            raise ValueError(
                f"{self.name}: mask {self.label_paths[i]} is {list(label.shape)} but image "
                f"{self.image_paths[i]} is {list(image.shape[:2])} (height, width)"
            )
        return FITS[self.fit](image, label, self.size)

    def fingerprint(self) -> str:
        """Hash of the mask paths, their modification times and the label mapping."""
        digest = hashlib.sha256()
        for path in self.label_paths:
            try:
                mtime = os.stat(path).st_mtime_ns
            except OSError:
                raise ValueError(f"{self.name}: mask {path} does not exist") from None
            digest.update(f"{path}\0{mtime}\0".encode())
        if self.label_map is not None:
            digest.update(self.label_map.tobytes())
        return digest.hexdigest()[:32]

    def __repr__(self) -> str:
        fit = "" if self.fit == "pad" else f", fit={self.fit!r}"
        return f"SegFileSource({self.name!r}, n={len(self)}, size={self.size}{fit})"


class Subset:
    """The elements ``indices`` of ``source``, as a source (an experience's share of a split).

    The repr names the parent and a checksum of the indices, so two subsets of one split never
    share a grain state key.
    """

    def __init__(self, source, indices: Sequence[int] | np.ndarray, name: str | None = None):
        idx = np.asarray(indices, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(source)):
            raise ValueError(
                f"Subset of {source!r}: indices must be in 0..{len(source) - 1}, "
                f"got {int(idx.min())}..{int(idx.max())}"
            )
        self.source = source
        self.indices = idx
        self.name = name

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.source[int(self.indices[i])]

    def label(self, i: int) -> np.ndarray:
        """Element i's mask, through the parent's ``label`` when it has one (no image decoding)."""
        j = int(self.indices[i])
        return self.source.label(j) if hasattr(self.source, "label") else self.source[j]["label"]

    def __repr__(self) -> str:
        crc = zlib.crc32(self.indices.tobytes()) & 0xFFFFFFFF
        tag = f"{self.name!r}, " if self.name else ""
        return f"Subset({tag}{self.source!r}, n={len(self)}, crc={crc:08x})"


def _label_counts(labels: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    base.check_labels(labels, num_classes, where)
    counts = np.bincount(labels.reshape(-1), minlength=256)
    return counts[:num_classes] > 0


def presence(
    source_or_label_paths,
    num_classes: int,
    *,
    label_map: np.ndarray | Sequence[int] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> np.ndarray:
    """Which classes each image holds: ``bool [N,K]`` (255 ignored).

    Args:
        source_or_label_paths: mask paths, or a source. A source with a ``label(i)`` method is
            read through it (masks only, no image decoding); otherwise ``source[i]["label"]``.
        num_classes: K; a mask value outside ``0..K-1`` that is not 255 is an error.
        label_map: LUT applied to mask *paths* (a source applies its own).
        cache_dir: where the result is cached, ``~/.cache/clseg_jax/presence`` by default; the
            key hashes the mask paths, their modification times, the LUT and K, so an edited
            mask is read again. Sources without a ``fingerprint()`` are not cached.
    """
    k = int(num_classes)
    if isinstance(source_or_label_paths, (list, tuple)):
        lut = check_lut(label_map, "presence")
        src = SegFileSource(source_or_label_paths, source_or_label_paths, 1, "presence", lut)
    else:
        src = source_or_label_paths
    key = None
    if hasattr(src, "fingerprint"):
        key = hashlib.sha256(f"{src.fingerprint()}\0{k}".encode()).hexdigest()[:32]
    folder = Path(os.path.expanduser(str(cache_dir or DEFAULT_CACHE)))
    file = folder / f"{key}.npy"
    if key is not None and file.is_file():
        try:
            cached = np.load(file, allow_pickle=False)
            if cached.shape == (len(src), k) and cached.dtype == bool:
                return cached
        except (OSError, ValueError):  # a torn write: recompute
            pass
    out = np.zeros((len(src), k), bool)
    where = getattr(src, "name", repr(src))
    for i in range(len(src)):
        label = src.label(i) if hasattr(src, "label") else np.asarray(src[i]["label"])
        out[i] = _label_counts(label, k, f"{where}: element {i}")
    if key is not None:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{key}.{os.getpid()}.tmp.npy"
        np.save(tmp, out)
        os.replace(tmp, file)  # atomic: concurrent builders never read half a file
    return out
