"""External image sources for replay of past classes (RECALL, Maracani et al., ICCV 2021).

RECALL replays no stored training images: the images of a past class come from outside the
stream, web-crawled (Flickr, searched by class name) or sampled from a class-conditional GAN
(BigGAN-deep), and are labelled afterwards. Here the source is pluggable; every source answers

    source.images(class_id, n, rng) -> uint8 [n,H,W,3]        at the size it was built for

with ``rng`` a ``np.random.Generator`` (the caller fixes it per class, so a class gets the same
images in every phase, like RECALL's data generated once offline).

- ``FolderSource``: a folder per class under a root, ``<root>/<name>/*.jpg|jpeg|png``, the folder
  named by the class name or by its id (``7``, or zero-padded ``07`` as the official Flickr
  script writes). Images are resized so that they cover the target size, then center-cropped.
- ``CallableSource``: a user function ``fn(class_id, n, size, rng) -> images``, given directly or
  as an import path ``"package.module:function"`` (a GAN sampler, a retrieval service).
- ``noise``: uniform noise as a callable source, for smoke tests (and a replay-of-nothing
  baseline).

``from_spec("folder:<path>" | "callable:<module:function>", size)`` builds one from a config
string. Every problem (no folder, no class, no image, a bad return value) is a one-line error.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# fn(class_id, n, (H, W), rng) -> uint8 [n,H,W,3]
ImageFn = Callable[[int, int, tuple[int, int], np.random.Generator], np.ndarray]


class ReplaySource(Protocol):
    """Where replay images of a past class come from (host side, between phases)."""

    size: tuple[int, int]

    def images(self, class_id: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` images of class ``class_id``: uint8 ``[n,H,W,3]`` with ``(H, W) = size``."""
        ...


def fit(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Resizes ``image`` (bilinear) to cover ``size = (H, W)``, then center-crops: uint8 [H,W,3].

    Scaling by the larger of the two ratios keeps the aspect ratio and leaves no padding; the
    crop then drops the overhang of the longer side equally on both ends.
    """
    h, w = size
    image = image.convert("RGB")
    scale = max(h / image.height, w / image.width)
    new_w = max(w, math.ceil(image.width * scale - 1e-6))
    new_h = max(h, math.ceil(image.height * scale - 1e-6))
    image = image.resize((new_w, new_h), Image.BILINEAR)
    top, left = (new_h - h) // 2, (new_w - w) // 2
    return np.asarray(image.crop((left, top, left + w, top + h)), np.uint8)


def _draw(count: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices into ``count`` items: distinct while ``n <= count``; beyond that every item
    is used once per round before any is used again."""
    rounds = [rng.permutation(count) for _ in range(-(-n // count))]
    return np.concatenate(rounds)[:n]


class FolderSource:
    """Images from ``<root>/<class folder>/*.jpg|jpeg|png`` (see the module docstring).

    Args:
      root: the folder holding one sub-folder per class.
      size: ``(H, W)`` of the returned images (the model's training input size).
      class_names: optional names by class id; a folder named like the class is then found too.
    """

    def __init__(self, root: str, size: tuple[int, int], class_names: Sequence[str] | None = None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"replay source: folder {root!r} does not exist")
        self.root = root
        self.size = (int(size[0]), int(size[1]))
        self.class_names = tuple(class_names or ())
        self._folders = sorted(
            e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
        )

    def folder(self, class_id: int) -> str | None:
        """The folder of ``class_id`` (by name first, then by id), or None."""
        if class_id < len(self.class_names) and self.class_names[class_id] in self._folders:
            return os.path.join(self.root, self.class_names[class_id])
        for name in self._folders:
            if name.isdigit() and int(name) == class_id:
                return os.path.join(self.root, name)
        return None

    def missing(self, class_ids: Sequence[int]) -> list[int]:
        """The classes among ``class_ids`` that have no folder."""
        return [c for c in class_ids if self.folder(c) is None]

    def files(self, class_id: int) -> list[str]:
        """The image files of ``class_id``, sorted (so a seeded draw is reproducible)."""
        folder = self.folder(class_id)
        if folder is None:
            named = (
                f" or {self.class_names[class_id]!r}" if class_id < len(self.class_names) else ""
            )
            raise FileNotFoundError(
                f"replay source: no folder for class {class_id} under {self.root!r} "
                f"(looked for {str(class_id)!r}{named}; found {self._folders[:10]})"
            )
        found = sorted(
            os.path.join(folder, f)
            for f in os.listdir(folder)
            if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not found:
            raise FileNotFoundError(
                f"replay source: no {'/'.join(IMAGE_EXTENSIONS)} image in {folder!r} "
                f"(class {class_id})"
            )
        return found

    def images(self, class_id: int, n: int, rng: np.random.Generator) -> np.ndarray:
        files = self.files(class_id)
        out = np.empty((n, *self.size, 3), np.uint8)
        for i, k in enumerate(_draw(len(files), n, rng)):
            try:
                with Image.open(files[k]) as image:
                    out[i] = fit(image, self.size)
            except OSError as e:
                raise OSError(f"replay source: cannot read {files[k]!r}: {e}") from e
        return out


def load_callable(path: str) -> Callable:
    """``"package.module:function"`` -> the function; one-line errors otherwise.

    Import errors inside the user's module are not swallowed: they propagate, chained.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"replay source: expected 'package.module:function', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name + ".").startswith(e.name + "."):
            raise ValueError(f"replay source: no module {module_name!r} (from {path!r})") from e
        raise  # the module exists but one of its own imports failed: show that error
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"replay source: module {module_name!r} has no {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"replay source: {path!r} is not callable")
    return fn


class CallableSource:
    """Images from ``fn(class_id, n, size, rng) -> uint8 [n,H,W,3]`` (a function or an import
    path ``"package.module:function"``); the returned array is checked."""

    def __init__(self, fn: ImageFn | str, size: tuple[int, int]):
        self.name = fn if isinstance(fn, str) else getattr(fn, "__qualname__", repr(fn))
        self.fn = load_callable(fn) if isinstance(fn, str) else fn
        if not callable(self.fn):
            raise ValueError(f"replay source: {self.name!r} is not callable")
        self.size = (int(size[0]), int(size[1]))

    def images(self, class_id: int, n: int, rng: np.random.Generator) -> np.ndarray:
        out = np.asarray(self.fn(class_id, n, self.size, rng))
        want = (n, *self.size, 3)
        if out.shape != want or out.dtype != np.uint8:
            raise ValueError(
                f"replay source {self.name}: class {class_id} must give uint8 {list(want)}, "
                f"got {out.dtype} {list(out.shape)}"
            )
        return out


def noise(class_id: int, n: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Uniform noise images, whatever the class: uint8 ``[n,H,W,3]``."""
    del class_id
    return rng.integers(0, 256, (n, *size, 3), dtype=np.uint8)


def from_spec(
    spec: str, size: tuple[int, int], class_names: Sequence[str] | None = None
) -> ReplaySource:
    """``"folder:<path>"`` -> ``FolderSource``; ``"callable:<module:function>"`` ->
    ``CallableSource``."""
    kind, sep, arg = (spec or "").partition(":")
    if not sep or not arg:
        raise ValueError(
            f"replay source: expected 'folder:<path>' or 'callable:<module:function>', got {spec!r}"
        )
    if kind == "folder":
        return FolderSource(arg, size, class_names)
    if kind == "callable":
        return CallableSource(arg, size)
    raise ValueError(f"replay source: unknown kind {kind!r} in {spec!r}; valid: folder, callable")
