"""grain pipelines: seeded, augmented, checkpointable training batches and padded eval batches.

Training: ``source -> shuffle (reseeded per epoch) -> repeat(epochs) -> paired augmentation
-> this process's rows -> batch`` (drop remainder: a step's shape never changes). Evaluation
keeps every example: the last batch is padded with ignore labels (255) so the compiled eval step
is reused and padding counts for nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import numpy as np

from clseg_jax.data import base


class Augment(grain.transforms.RandomMap):
    """Paired image+mask augmentation: random crop to ``crop`` and horizontal flip.

    Also applies the class visibility (background shift) to the label. Whole-image labels (class
    ids, multi-hot vectors) are not spatial: only the image is cropped and flipped.
    """

    def __init__(self, visible: np.ndarray, crop: int | None, flip: bool):
        self.visible = visible
        self.crop = crop
        self.flip = flip

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image, label = element["image"], element["label"]
        dense = label.ndim == 2
        h, w = image.shape[:2]
        if self.crop and (self.crop < h or self.crop < w):
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
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Batches of this process's rows: ``image [b,H,W,3] uint8``, ``label [b,H,W] uint8``.

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
    ds = ds.random_map(Augment(visible, crop, flip))
    # Drop the global remainder first so that every process gets the same number of batches.
    usable = len(ds) // global_batch * global_batch
    ds = ds[:usable][process_index::process_count]
    return ds.batch(global_batch // process_count, drop_remainder=True)


def eval_batches(
    source,
    visible: np.ndarray,
    *,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order, as this process's rows of fixed-size padded batches."""
    local = global_batch // process_count
    n = len(source)
    for start in range(0, n, global_batch):
        idx = range(start + process_index * local, min(start + (process_index + 1) * local, n))
        rows = [source[i] for i in idx]
        yield pad_batch(rows, local, visible, like=source[0])


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
