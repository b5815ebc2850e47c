"""grain pipelines: seeded, augmented, checkpointable training batches and padded eval batches.

Training: ``source -> shuffle (reseeded per epoch) -> repeat(epochs) -> paired augmentation
-> this process's rows -> batch`` (drop remainder: a step's shape never changes). Evaluation
keeps every example: the last batch is padded with ignore labels (255) so the compiled eval step
is reused and padding counts for nothing.

Segmentation augmentation with ``scale=(0.5, 2.0)`` is DeepLab's, which the continual
segmentation papers cite: scale the image by a random factor (image bilinear, mask nearest),
take a random ``crop x crop`` window, padding bottom/right with image 0 and mask 255 where the
scaled image is smaller, then flip horizontally with probability 1/2. MiB's and PLOP's official
code instead use ``RandomResizedCrop(crop, scale=(0.5, 2.0))``: a window of 0.5-2x the image
*area* (torchvision's sampler: 10 tries at aspect ratio 3/4-4/3, then a central crop) resized to
``crop x crop``; RECALL's code scales by 0.5-1.5 before a padded crop.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import numpy as np

from clseg_jax.data import base


def rescale(image: np.ndarray, label: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Scales ``image [H,W,3]`` (bilinear) and ``label [H,W]`` (nearest: no new label values)."""
    from PIL import Image

    h, w = label.shape
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    return image, label


def padded_crop(
    image: np.ndarray, label: np.ndarray, crop: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A random ``crop = (ch, cw)`` window; image 0 / label 255 bottom/right where too small."""
    ch, cw = crop
    h, w = label.shape
    if h < ch or w < cw:
        ph, pw = max(ch, h), max(cw, w)
        padded_image = np.zeros((ph, pw, 3), np.uint8)
        padded_label = np.full((ph, pw), base.IGNORE, np.uint8)
        padded_image[:h, :w] = image
        padded_label[:h, :w] = label
        image, label, h, w = padded_image, padded_label, ph, pw
    top = rng.integers(0, h - ch + 1)
    left = rng.integers(0, w - cw + 1)
    return image[top : top + ch, left : left + cw], label[top : top + ch, left : left + cw]


class Augment(grain.transforms.RandomMap):
    """Paired image+mask augmentation: random scale, random crop to ``crop``, horizontal flip.

    Also applies the class visibility (background shift) to the label. Whole-image labels (class
    ids, multi-hot vectors) are not spatial: only the image is cropped and flipped (and never
    scaled). With ``scale`` off, images smaller than ``crop`` are left as they are; with it on,
    the output is always ``crop x crop`` (the input's size when ``crop`` is None), padded.
    """

    def __init__(
        self,
        visible: np.ndarray,
        crop: int | None,
        flip: bool,
        scale: tuple[float, float] | None = None,
    ):
        self.visible = visible
        self.crop = crop
        self.flip = flip
        self.scale = None if scale is None else (float(scale[0]), float(scale[1]))

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image, label = element["image"], element["label"]
        dense = label.ndim == 2
        h, w = image.shape[:2]
        if self.scale is not None and dense:
            image, label = rescale(image, label, rng.uniform(*self.scale))
            crop = (self.crop, self.crop) if self.crop else (h, w)
            image, label = padded_crop(image, label, crop, rng)
        elif self.crop and (self.crop < h or self.crop < w):
            top = rng.integers(0, h - self.crop + 1)
            left = rng.integers(0, w - self.crop + 1)
            image = image[top : top + self.crop, left : left + self.crop]
            if dense:
                label = label[top : top + self.crop, left : left + self.crop]
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
            label = label[:, ::-1] if dense else label
        label = base.visible_labels(label, self.visible)
        # ascontiguousarray would turn a 0-d class id into shape [1].
        label = np.ascontiguousarray(label) if dense else label
        return {"image": np.ascontiguousarray(image), "label": label}


def train_dataset(
    source,
    visible: np.ndarray,
    *,
    global_batch: int,
    epochs: int,
    seed: int,
    crop: int | None = None,
    flip: bool = False,
    scale: tuple[float, float] | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Batches of this process's rows: ``image [b,H,W,3] uint8``, ``label [b,H,W] uint8``.

    ``scale=(lo, hi)`` turns on the random scale of the papers' augmentation (module docstring):
    the rows are then ``crop x crop`` (the source's size when ``crop`` is None).

    ``len(result)`` is the number of steps; iterate ``iter(result.to_iter_dataset())`` and use its
    ``get_state()``/``set_state()`` to resume mid-epoch.
    """
    if global_batch % process_count:
        raise ValueError(f"batch size {global_batch} not divisible by {process_count} processes")
    if len(source) < global_batch:
        raise ValueError(
            f"{source!r}: {len(source)} training examples, fewer than one batch of {global_batch}"
        )
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(epochs)
    if scale is not None and not 0 < scale[0] <= scale[1]:
        raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi, got {tuple(scale)}")
    ds = ds.random_map(Augment(visible, crop, flip, scale))
    # Drop the global remainder first so that every process gets the same number of batches.
    usable = len(ds) // global_batch * global_batch
    # Process i's rows of global batch b are the contiguous block [b*G + i*L, b*G + (i+1)*L):
    # the global array (process 0's devices first) then holds the rows in the order one
    # process would see them, so row-order-dependent work (a memory's reservoir) is the same
    # whatever the process count.
    local = global_batch // process_count
    return ds[:usable].batch(local)[process_index::process_count]


def eval_batches(
    source,
    visible: np.ndarray,
    *,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Every example once, in order, as this process's rows of fixed-size padded batches (a
    grain dataset: batches are read by grain's threads, ``data.feed``)."""
    local = global_batch // process_count
    n = len(source)
    like = source[0]

    def batch(b: int) -> dict[str, np.ndarray]:
        start = b * global_batch + process_index * local
        rows = [source[i] for i in range(start, min(start + local, n))]
        return pad_batch(rows, local, visible, like=like)

    return grain.MapDataset.range(-(-n // global_batch)).map(batch)


def pad_batch(rows: list[dict], size: int, visible: np.ndarray, like: dict) -> dict:
    """Stacks rows and pads to ``size`` with zero images and ignore labels."""
    images = np.zeros((size, *like["image"].shape), np.uint8)
    labels = np.full((size, *like["label"].shape), base.IGNORE, np.uint8)
    for i, r in enumerate(rows):
        images[i] = r["image"]
        labels[i] = base.visible_labels(r["label"], visible)
    return {"image": images, "label": labels}


def host_batches(source, visible: np.ndarray, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Full passes for between-phase work (Fisher, memory): no augmentation, last batch kept."""
    n = len(source)
    for start in range(0, n, batch_size):
        rows = [source[i] for i in range(start, min(start + batch_size, n))]
        yield {
            "image": np.stack([r["image"] for r in rows]),
            "label": np.stack([base.visible_labels(r["label"], visible) for r in rows]),
        }
