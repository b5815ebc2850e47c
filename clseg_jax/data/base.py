"""Stream vocabulary (Avalanche's words): a Stream is a sequence of Experiences.

An experience carries random-access train/test sources (``Source``: grain
``RandomAccessDataSource``s with a stable repr) whose elements are ``{"image": uint8 [H,W,3],
"label": uint8 [H,W]}`` with *full* labels: class ids ``0..num_classes-1`` (0 = background) and
255 = ignore. What a training step or an evaluation may see is decided later by a visibility mask
over classes (``visible_labels``), so one source serves class-incremental training (unseen
classes -> background), cumulative and joint training alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from clseg_jax.data import checks

IGNORE = 255


@runtime_checkable
class Source(Protocol):
    """What an experience's train/test data is: a grain ``RandomAccessDataSource``.

    Rows are ``{"image": uint8 [H,W,3], "label": ...}`` (a mask ``uint8 [H,W]``, a class id
    ``uint8 []`` or a multi-hot ``uint8 [K]``). ``__repr__`` must be stable (the same in every
    process and build, no memory address): grain keys checkpointed iterator state by it.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> dict[str, np.ndarray]: ...

    def __repr__(self) -> str: ...


class _InMemory:
    """Images ``[N,H,W,3] uint8`` and per-image labels held in memory; subclasses check labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str):
        checks.rgb_images(images, f"{name}: images")
        self._check_labels(images, labels, name)
        self.images = images
        self.labels = labels.astype(np.uint8, copy=False)
        self.name = name

    @staticmethod
    def _check_labels(images: np.ndarray, labels: np.ndarray, name: str) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"image": self.images[i], "label": self.labels[i]}


class ArraySource(_InMemory):
    """In-memory random-access source over ``images [N,H,W,3] uint8`` and ``labels [N,H,W]``.

    ``__repr__`` is stable (no memory address) so grain iterator state restores across processes.
    """

    @staticmethod
    def _check_labels(images: np.ndarray, labels: np.ndarray, name: str) -> None:
        if labels.shape != images.shape[:3]:
            raise ValueError(
                f"{name}: labels must be [N,H,W] = {list(images.shape[:3])}, "
                f"got {list(labels.shape)}"
            )

    def __repr__(self) -> str:
        return f"ArraySource({self.name!r}, n={len(self)}, shape={self.images.shape[1:3]})"


class LabelSource(_InMemory):
    """In-memory random-access source of whole-image labels (classification).

    ``images [N,H,W,3] uint8`` with either ``labels [N]`` (single-label: one class id per image)
    or ``labels [N,K]`` (multi-label: multi-hot, 0/1). Elements are ``{"image": uint8 [H,W,3],
    "label": uint8 []}`` or ``{"image": ..., "label": uint8 [K]}``. ``__repr__`` is stable (no
    memory address) so grain iterator state restores across processes.
    """

    @staticmethod
    def _check_labels(images: np.ndarray, labels: np.ndarray, name: str) -> None:
        if labels.ndim not in (1, 2) or len(labels) != len(images):
            raise ValueError(
                f"{name}: labels must be [N] class ids or [N,K] multi-hot with N = {len(images)}, "
                f"got {list(labels.shape)}"
            )
        if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
            raise ValueError(f"{name}: labels must have an integer dtype, got {labels.dtype}")
        # 255 stays free as the ignore/padding value, as for segmentation labels.
        top = 1 if labels.ndim == 2 else IGNORE - 1
        if labels.size and (labels.min() < 0 or labels.max() > top):
            valid = "0/1 (multi-hot)" if labels.ndim == 2 else f"class ids 0..{top}"
            raise ValueError(
                f"{name}: labels must be {valid}, "
                f"got values {int(labels.min())}..{int(labels.max())}"
            )

    def __repr__(self) -> str:
        return (
            f"LabelSource({self.name!r}, n={len(self)}, shape={self.images.shape[1:3]}, "
            f"label={self.labels.shape[1:]})"
        )


class ConcatSource:
    """Several sources read as one (cumulative and joint training)."""

    def __init__(self, sources: Sequence[Source]):
        self.sources = tuple(sources)
        self._offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        k = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return self.sources[k][i - int(self._offsets[k])]

    def __repr__(self) -> str:
        return f"ConcatSource({', '.join(repr(s) for s in self.sources)})"


class Experience(NamedTuple):
    """One step of a stream.

    Attributes:
        index: position in the stream.
        name: human-readable name (domain name, or the classes it introduces).
        classes: class ids whose pixels are labelled in this experience's *training* data
            (background 0 included). For a domain-incremental stream: all classes.
        train: training source with full labels.
        test: test source with full labels.
    """

    index: int
    name: str
    classes: tuple[int, ...]
    train: Source
    test: Source


class Stream(NamedTuple):
    """A scenario's sequence of experiences.

    Attributes:
        name: dataset name.
        kind: "domain" (same classes, new looks) or "class" (classes arrive over steps).
        num_classes: size of the label set, background included (the model head's size).
        class_names: one name per class id.
        experiences: the experiences in order.
        test: optional full test set (every test image once), evaluated after each phase with
            the classes seen so far: the MiB/PLOP tables' mIoU and old/new/all. Experience test
            sets may overlap (an image holding classes of two steps), so their sum cannot stand
            in for it.
    """

    name: str
    kind: str
    num_classes: int
    class_names: tuple[str, ...]
    experiences: tuple[Experience, ...]
    test: Source | None = None

    def seen_classes(self, upto: int) -> tuple[int, ...]:
        """Classes labelled in experiences ``0..upto`` (inclusive)."""
        seen = set()
        for e in self.experiences[: upto + 1]:
            seen.update(e.classes)
        return tuple(sorted(seen))

    def class_mask(self, classes: Sequence[int]) -> np.ndarray:
        """``bool [num_classes]``, True for the given classes."""
        mask = np.zeros(self.num_classes, bool)
        mask[list(classes)] = True
        return mask


def visible_labels(label: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """What a label shows when only the classes in ``visible`` (``bool [K]``) are labelled.

    - masks ``[H,W]``: pixels of other classes become background (0), 255 stays: the
      class-incremental background shift (in training, classes outside the current step are
      background; at test, classes not yet seen are).
    - multi-hot ``[K]``: other classes become absent (0); 255 entries stay.
    - class ids ``[]``: unchanged. There is no background to fall into: an image of a class that
      is not visible keeps its label (and a model that may not predict it gets it wrong).
    """
    if label.ndim == 0:
        return label
    if label.ndim == 1:
        return np.where((label == IGNORE) | visible, label, 0).astype(label.dtype)
    keep = np.append(visible, True)  # index K stands for "ignore"
    idx = np.where(label == IGNORE, len(visible), label)
    return np.where(keep[idx], label, 0).astype(label.dtype)


def visible_multi_hot(label: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Zeroes the classes not in ``visible`` (``bool [K]``) of multi-hot ``label [..., K]``.

    The multi-label form of ``visible_labels`` for whole arrays of labels: while training task t,
    objects of other tasks are unlabelled, hence negatives.
    """
    return (label * visible.astype(label.dtype)).astype(label.dtype)


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Raises a one-line ValueError if a label is outside ``0..num_classes-1`` and not 255."""
    bad = (labels != IGNORE) & (labels >= num_classes)
    if bad.any():
        found = sorted(set(np.unique(labels[bad]).tolist()))[:5]
        raise ValueError(
            f"{where}: labels {found} outside the class set 0..{num_classes - 1} (255 = ignore)"
        )
