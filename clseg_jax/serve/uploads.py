"""One experience's data uploaded over HTTP: a ``.zip`` of PNG/JPEG files or an ``.npz``.

Segmentation zip layout (names are case-sensitive, extensions are not)::

    train/images/<name>.png|.jpg|.jpeg   RGB image (grayscale, RGBA, palette: converted to RGB)
    train/masks/<name>.png               single-channel 8-bit PNG (mode L or P: the stored value or
                                         palette index IS the class id), 255 = ignore
    test/images/<name>.png|.jpg|.jpeg    same for the test split
    test/masks/<name>.png

- Everything may sit under ONE top-level folder (what zipping a folder gives); it is stripped.
- Every image needs a mask with the same ``<name>`` and vice versa; rows are sorted by name; each
  split needs at least one pair. All images share one size, and a mask has its image's size.

Classification zip layout (a classification lineage's uploads: a class id per image)::

    train/<class id>/<name>.png|.jpg|.jpeg   an image of class <class id> (0, 1, ...: decimal)
    test/<class id>/<name>.png|.jpg|.jpeg

- Rows are sorted by class id, then name; each split needs at least one image, not every class.

For both layouts:
- ``__MACOSX/`` entries, ``.DS_Store`` files and directory entries are ignored; any other path is
  an error. Mask values must be ``0..num_classes-1`` or 255.
- Members are only read into memory, never extracted; still, absolute paths, ``..``, backslashes,
  drive letters, symlinks and encrypted members are refused, and so are archives over the
  ``Limits`` (entries, declared and actually decompressed bytes, compression ratio, pixels).

``.npz``: arrays ``x_train`` uint8 ``[N,H,W,3]``, ``y_train`` integer ``[N,H,W]`` masks or ``[N]``
class ids, ``x_test`` and ``y_test`` likewise, as read by ``clseg_jax.data.npz``; pickled
(object) arrays are refused.

Every problem raises ``UploadError``, a one-line ``ValueError`` naming the file and what is valid.
"""

from __future__ import annotations

import io
import math
import re
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from clseg_jax.data import npz
from clseg_jax.data.base import IGNORE
from clseg_jax.data.npz import ARRAYS

LAYOUT = (
    "train/images/<name>.png|.jpg|.jpeg, train/masks/<name>.png, test/images/..., "
    "test/masks/... (segmentation) or train/<class id>/<name>.png|.jpg|.jpeg, "
    "test/<class id>/... (classification), optionally under one top-level folder"
)
_IMAGE_EXT = (".png", ".jpg", ".jpeg")
_RATIO_MIN_SIZE = 2**20  # small members legitimately compress well (flat masks, headers)
_CHUNK = 2**20
# Errors PIL / zipfile / numpy raise on malformed input (PIL's DecompressionBombError included).
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
    zipfile.BadZipFile,
    NotImplementedError,
)


class UploadError(ValueError):
    """A rejected upload; the message is always one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class Limits:
    """Caps on what one upload may cost to parse."""

    max_bytes: int = 512 * 2**20  # the upload itself
    max_files: int = 20_000  # entries in a zip
    max_uncompressed: int = 2 * 2**30  # decompressed bytes, declared and actually read
    max_ratio: int = 200  # per-member compression ratio, for members over 1 MiB
    max_image_pixels: int = 4096 * 4096  # per image, checked from the header before decoding
    max_images: int = 20_000  # per split
    # Decoded arrays of a zip upload (images and masks, 4 bytes a pixel): small PNGs can
    # decode to far more memory than the upload and its decompressed bytes.
    max_decoded_bytes: int = 4 * 2**30


def _q(text: str, limit: int = 120) -> str:
    """User-controlled text made safe for a one-line message (escaped, shortened)."""
    s = text if text.isprintable() else ascii(text)
    return s if len(s) <= limit else s[:limit] + "..."


def _line(err: BaseException) -> str:
    text = str(err).strip()
    return _q(text.splitlines()[0], 200) if text else type(err).__name__


def _unsafe(name: str) -> str | None:
    """Why a member name could escape an extraction folder, if it could (we never extract, but
    such a name only comes from a broken or hostile tool)."""
    if name.startswith("/"):
        return "absolute path"
    if "\\" in name:
        return "backslash in path"
    if re.match(r"[A-Za-z]:", name):
        return "drive letter in path"
    if ".." in name.split("/"):
        return "path traversal ('..')"
    return None


def _open_zip(data: bytes, where: str, limits: Limits, ratio: bool) -> zipfile.ZipFile:
    """Opens ``data`` as a zip after the checks that need no decompression."""
    # Counting central-directory signatures bounds the entries before zipfile builds a ZipInfo
    # for each (millions of tiny entries would cost GBs); it can only over-count.
    if data.count(b"PK\x01\x02") > limits.max_files:
        raise UploadError(f"{where}: zip holds more than {limits.max_files} entries")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as err:
        raise UploadError(f"{where}: not a valid zip archive ({_line(err)})") from None
    infos = zf.infolist()
    if len(infos) > limits.max_files:
        raise UploadError(f"{where}: zip holds {len(infos)} entries, over {limits.max_files}")
    declared = 0
    for info in infos:
        name = info.filename
        reason = _unsafe(name)
        if reason:
            raise UploadError(
                f"{where}: entry {_q(name)} rejected: {reason}; zip paths must be relative, "
                f"'/'-separated and without '..'"
            )
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UploadError(f"{where}: entry {_q(name)} is a symlink; only regular files")
        if info.flag_bits & 0x1:
            raise UploadError(f"{where}: entry {_q(name)} is encrypted; upload an unencrypted zip")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise UploadError(
                f"{where}: entry {_q(name)} uses compression method {info.compress_type}; "
                f"only stored or deflate"
            )
        declared += info.file_size
        if (
            ratio
            and info.file_size > _RATIO_MIN_SIZE
            and (info.file_size > limits.max_ratio * max(info.compress_size, 1))
        ):
            raise UploadError(
                f"{where}: entry {_q(name)} compresses {info.file_size} bytes into "
                f"{info.compress_size} (ratio over {limits.max_ratio}): refused as a zip bomb"
            )
    if declared > limits.max_uncompressed:
        raise UploadError(
            f"{where}: zip declares {declared} uncompressed bytes, over the limit of "
            f"{limits.max_uncompressed}"
        )
    return zf


class _Reader:
    """Reads members with a running budget on the bytes actually decompressed."""

    def __init__(self, zf: zipfile.ZipFile, where: str, budget: int):
        self.zf, self.where, self.budget = zf, where, budget

    def read(self, info: zipfile.ZipInfo) -> bytearray:
        cap = min(info.file_size, self.budget)
        out = bytearray()
        try:
            with self.zf.open(info) as f:
                while chunk := f.read(_CHUNK):
                    out += chunk
                    if len(out) > cap:  # headers may lie: stop before the bomb goes off
                        over = "its declared size" if cap == info.file_size else "the limit"
                        raise UploadError(
                            f"{self.where}: {_q(info.filename)} decompresses to more than {over}"
                        )
        except UploadError:
            raise
        except (*_DECODE_ERRORS, RuntimeError) as err:
            # zipfile stops at the declared size, so a size lie surfaces as a CRC mismatch.
            raise UploadError(
                f"{self.where}: {_q(info.filename)}: member data does not match its header "
                f"(size or CRC-32; {_line(err)})"
            ) from None
        self.budget -= len(out)
        return out


def _members(zf: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, list[str]]]:
    """The files that count, each with its path parts below the optional top-level folder."""
    files = [
        i
        for i in zf.infolist()
        if not i.is_dir()
        and i.filename.split("/")[0] != "__MACOSX"
        and i.filename.rsplit("/", 1)[-1] != ".DS_Store"
    ]
    parts = [i.filename.split("/") for i in files]
    strip = (
        bool(parts)
        and len({p[0] for p in parts}) == 1
        and all(len(p) > 2 and p[1] in ("train", "test") for p in parts)
    )
    return [(i, p[1:] if strip else p) for i, p in zip(files, parts, strict=True)]


def _is_class_id(folder: str) -> bool:
    return folder.isdigit() and folder.isascii() and int(folder) < IGNORE


def _layout(
    members: list[tuple[zipfile.ZipInfo, list[str]]], where: str
) -> dict[str, dict[str, dict[str, zipfile.ZipInfo]]]:
    """-> {split: {group: {stem: info}}}: groups are "images" and "masks" (segmentation) or
    class ids (classification, every folder below a split a class id)."""
    found: dict[str, dict[str, dict[str, zipfile.ZipInfo]]] = {"train": {}, "test": {}}
    classify = any(len(p) > 1 and _is_class_id(p[1]) for _, p in members)
    if classify and any(len(p) > 1 and p[1] in ("images", "masks") for _, p in members):
        raise UploadError(
            f"{where}: holds both images/masks folders (segmentation) and class-id folders "
            f"(classification); one experience is one or the other: {LAYOUT}"
        )
    groups = _is_class_id if classify else ("images", "masks").__contains__
    for info, p in members:
        stem, dot, ext = p[-1].rpartition(".")
        is_mask = not classify and len(p) > 1 and p[1] == "masks"
        ok = (
            len(p) == 3
            and p[0] in found
            and groups(p[1])
            and dot
            and stem
            and "." + ext.lower() in ((".png",) if is_mask else _IMAGE_EXT)
        )
        if not ok:
            raise UploadError(
                f"{where}: unexpected path {_q(info.filename)}; valid layouts: {LAYOUT}"
            )
        group = found[p[0]].setdefault(p[1], {})
        if stem in group:
            raise UploadError(
                f"{where}: {_q(info.filename)} and {_q(group[stem].filename)} share the name "
                f"{_q(stem)}; names must be unique per folder"
            )
        group[stem] = info
    if not classify:
        for split in found.values():
            split.setdefault("images", {})
            split.setdefault("masks", {})
    return found


def _open_image(raw: bytes, where: str, mask: bool, limits: Limits) -> Image.Image:
    """Decodes one PNG/JPEG after checking its header's pixel count."""
    formats = ["PNG"] if mask else ["PNG", "JPEG"]
    try:
        im = Image.open(io.BytesIO(raw), formats=formats)
    except Image.DecompressionBombError as err:
        raise UploadError(f"{where}: image too large to decode ({_line(err)})") from None
    except _DECODE_ERRORS as err:
        raise UploadError(f"{where}: not a {' or '.join(formats)} image ({_line(err)})") from None
    w, h = im.size
    if w * h > limits.max_image_pixels:
        raise UploadError(
            f"{where}: image too large: {h}x{w} (HxW) = {w * h} pixels, "
            f"over {limits.max_image_pixels}"
        )
    if mask and im.mode not in ("L", "P"):
        raise UploadError(
            f"{where}: masks must be single-channel 8-bit PNG holding class ids "
            f"(mode L or P), got mode {im.mode}"
        )
    try:
        im.load()
        return im if mask else im.convert("RGB")
    except _DECODE_ERRORS as err:
        raise UploadError(f"{where}: corrupt or truncated image ({_line(err)})") from None


def _check_labels(y: np.ndarray, num_classes: int, where: str) -> None:
    bad = (y != IGNORE) & (y >= num_classes)
    if bad.any():
        pos = np.unravel_index(int(np.argmax(bad)), y.shape)
        raise UploadError(
            f"{where}: label {int(y[pos])} at index {[int(i) for i in pos]} is not a class id "
            f"0..{num_classes - 1} or {IGNORE} (ignore)"
        )


def _pairs(
    found: dict[str, dict[str, dict[str, zipfile.ZipInfo]]], where: str, limits: Limits
) -> dict[str, list[tuple[zipfile.ZipInfo, zipfile.ZipInfo | int]]]:
    """Each split's rows in order: ``(image, mask)`` (segmentation) or ``(image, class id)``
    (classification), after every structure check and before any decoding."""
    classify = any(g not in ("images", "masks") for split in found.values() for g in split)
    pairs: dict[str, list[tuple[zipfile.ZipInfo, zipfile.ZipInfo | int]]] = {}
    for split, groups in found.items():
        if classify:
            rows = [
                (groups[c][stem], int(c))
                for c in sorted(groups, key=int)
                for stem in sorted(groups[c])
            ]
        else:
            images, masks = groups["images"], groups["masks"]
            for stem in sorted(images.keys() ^ masks.keys()):
                kind, other = ("image", "mask") if stem in images else ("mask", "image")
                info = (images if stem in images else masks)[stem]
                raise UploadError(
                    f"{where}: {kind} {_q(info.filename)} has no {other} with the same name "
                    f"in {split}/{other}s/"
                )
            rows = [(images[stem], masks[stem]) for stem in sorted(images)]
        if not rows:
            what = "images" if classify else "image/mask pairs"
            raise UploadError(f"{where}: split {split!r} has no {what}; layouts: {LAYOUT}")
        if len(rows) > limits.max_images:
            raise UploadError(f"{where}: {split} has {len(rows)} images, over {limits.max_images}")
        pairs[split] = rows
    return pairs


def _parse_zip(
    data: bytes, where: str, num_classes: int, limits: Limits, size: tuple[int, int] | None
) -> dict[str, np.ndarray]:
    zf = _open_zip(data, where, limits, ratio=True)
    reader = _Reader(zf, where, limits.max_uncompressed)
    pairs = _pairs(_layout(_members(zf), where), where, limits)
    out: dict[str, np.ndarray] = {}
    first = ""  # the file that fixed the size, for messages
    for split, rows in pairs.items():
        for n, (img_info, label) in enumerate(rows):
            img_name = img_info.filename
            img = _open_image(reader.read(img_info), f"{where}: {_q(img_name)}", False, limits)
            hw = (img.size[1], img.size[0])
            if not out:  # the first image fixes the size, hence the decoded total
                rows_all = sum(len(r) for r in pairs.values())
                total = rows_all * hw[0] * hw[1] * 4
                if total > limits.max_decoded_bytes:
                    raise UploadError(
                        f"{where}: {rows_all} images of {hw[0]}x{hw[1]} decode to {total} "
                        f"bytes, over the limit of {limits.max_decoded_bytes}"
                    )
            if size is None:
                size, first = hw, img_name
            elif hw != tuple(size):
                ref = f"{_q(first)} is" if first else "this lineage's images are"
                raise UploadError(
                    f"{where}: {_q(img_name)} is {hw[0]}x{hw[1]} (HxW) but {ref} "
                    f"{size[0]}x{size[1]}; all images must share one size"
                )
            if isinstance(label, int):  # classification: the folder's class id
                y = np.uint8(label)
                _check_labels(np.asarray([label]), num_classes, f"{where}: {_q(img_name)}")
            else:
                m_where = f"{where}: {_q(label.filename)}"
                mask = _open_image(reader.read(label), m_where, True, limits)
                if mask.size != img.size:
                    raise UploadError(
                        f"{m_where}: mask is {mask.size[1]}x{mask.size[0]} (HxW) but its image "
                        f"is {hw[0]}x{hw[1]}"
                    )
                y = np.asarray(mask)  # mode P: the palette index, i.e. the class id
                _check_labels(y, num_classes, m_where)
            if n == 0:  # preallocated: stacking would hold every image twice
                out[f"x_{split}"] = np.empty((len(rows), *hw, 3), np.uint8)
                out[f"y_{split}"] = np.empty((len(rows), *np.shape(y)), np.uint8)
            out[f"x_{split}"][n] = np.asarray(img)
            out[f"y_{split}"][n] = y
    return {a: out[a] for a in ARRAYS}


def _parse_npz(
    data: bytes, where: str, num_classes: int, limits: Limits, size: tuple[int, int] | None
) -> dict[str, np.ndarray]:
    # No ratio cap: mostly-background label arrays legitimately compress far beyond 200:1.
    zf = _open_zip(data, where, limits, ratio=False)
    members = {i.filename: i for i in zf.infolist()}
    for a in ARRAYS:
        info = members.get(f"{a}.npy")
        if info is None:
            raise UploadError(f"{where}: missing array {a!r} (needs {list(ARRAYS)})")
        # np.load allocates the header's shape before reading: check it against the member size.
        try:
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"unsupported .npy format version {version}")
                read = getattr(np.lib.format, f"read_array_header_{version[0]}_0")
                shape, _, dtype = read(f)
        except _DECODE_ERRORS as err:
            raise UploadError(f"{where}: {a} cannot be read ({_line(err)})") from None
        if dtype.hasobject:
            raise UploadError(f"{where}: {a} holds Python objects (pickle); only numeric arrays")
        if math.prod(shape) * dtype.itemsize > info.file_size:  # Python ints: no overflow
            raise UploadError(f"{where}: {a} header claims shape {list(shape)} beyond its data")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {a: np.asarray(z[a]) for a in ARRAYS}
    except _DECODE_ERRORS as err:
        raise UploadError(f"{where}: cannot be read as .npz ({_line(err)})") from None
    try:
        npz.check_arrays(arrays, where)
    except ValueError as err:
        raise UploadError(str(err)) from None
    first = size
    for split in ("train", "test"):
        y = arrays[f"y_{split}"]
        n, h, w = arrays[f"x_{split}"].shape[:3]
        if not 1 <= n <= limits.max_images:
            raise UploadError(f"{where}: x_{split} has {n} images; need 1..{limits.max_images}")
        if h * w > limits.max_image_pixels:
            raise UploadError(f"{where}: images are {h}x{w}, over {limits.max_image_pixels} pixels")
        if first is not None and (h, w) != tuple(first):
            raise UploadError(
                f"{where}: x_{split} images are {h}x{w} (HxW) but must be "
                f"{first[0]}x{first[1]}; all images must share one size"
            )
        first = (h, w)
        _check_labels(y, num_classes, f"{where}: y_{split}")
        arrays[f"y_{split}"] = y.astype(np.uint8)
    return arrays


def parse_upload(
    data: bytes,
    filename: str,
    num_classes: int,
    limits: Limits = Limits(),  # frozen: sharing the default is safe
    image_size: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """Validates one uploaded experience and returns its arrays.

    Returns ``{"x_train": uint8 [N,H,W,3], "y_train": uint8 [N,H,W] masks or [N] class ids,
    "x_test": uint8 [M,H,W,3], "y_test": uint8 [M,H,W] or [M]}``. ``filename``'s extension
    picks the format (``.zip`` laid out as in the module docstring, or ``.npz``). Labels must be
    ``0..num_classes-1`` or 255 (ignore). ``image_size`` ``(H, W)``, if given, is the size
    every image must have (the lineage's).
    Raises ``UploadError`` on anything else.
    """
    where = _q(filename)
    if not 1 <= num_classes <= IGNORE:
        raise UploadError(f"{where}: num_classes must be 1..{IGNORE}, got {num_classes}")
    if len(data) > limits.max_bytes:
        raise UploadError(f"{where}: upload is {len(data)} bytes, over {limits.max_bytes}")
    suffix = filename.lower().rpartition(".")[2]
    if suffix == "zip":
        return _parse_zip(data, where, num_classes, limits, image_size)
    if suffix == "npz":
        return _parse_npz(data, where, num_classes, limits, image_size)
    raise UploadError(
        f"{where}: unsupported file type; upload a .zip ({LAYOUT}) or a .npz "
        f"(arrays {', '.join(ARRAYS)})"
    )


def to_npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """The arrays as a compressed ``.npz`` (readable by ``np.load``), byte-for-byte the same for
    equal arrays: members are sorted and dated 1980-01-01, unlike ``np.savez_compressed``, which
    stamps the current time (and so would break content addressing)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:  # size unknown up front
                # C order always: equal arrays in another memory layout give the same bytes.
                np.lib.format.write_array(f, np.ascontiguousarray(arrays[key]), allow_pickle=False)
    return buf.getvalue()


def summary(arrays: dict[str, np.ndarray]) -> dict:
    """``{"n_train", "n_test", "height", "width", "classes", "max_label", "labels"}``; classes:
    label values present in ``y_train`` (255 excluded), sorted; max_label: the largest label of
    either split (255 excluded; -1 if none), what a lineage's class count must exceed; labels:
    ``"masks"`` or ``"classes"`` (``npz.label_form``)."""
    x, y = arrays["x_train"], arrays["y_train"]
    present = np.unique(y)
    both = np.union1d(present, np.unique(arrays["y_test"]))
    return {
        "n_train": len(x),
        "n_test": len(arrays["x_test"]),
        "height": int(x.shape[1]),
        "width": int(x.shape[2]),
        "classes": [int(c) for c in present if c != IGNORE],
        "max_label": max((int(c) for c in both if c != IGNORE), default=-1),
        "labels": npz.label_form(arrays),
    }
