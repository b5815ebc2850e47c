"""From a stream and a strategy's schedule to training phases and their grain datasets.

A phase trains on one experience, or on a union of experiences (cumulative, joint). Classes seen
accumulate over phases; in training, pixels (or entries) of classes outside the phase's
experiences are background or ignored (``base.visible_labels``).
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import ml_collections

from clseg_jax import members
from clseg_jax.data import base as data_base
from clseg_jax.data import loader
from clseg_jax.strategies import base


def labelled(stream: data_base.Stream, experiences: Sequence[int]) -> set[int]:
    """Classes labelled in the union of these experiences' training data."""
    return set().union(*(stream.experiences[e].classes for e in experiences))


def source(stream: data_base.Stream, experiences: Sequence[int]):
    """The training source of one experience, or the concatenation of several."""
    sources = [stream.experiences[e].train for e in experiences]
    return sources[0] if len(sources) == 1 else data_base.ConcatSource(sources)


def make(
    stream: data_base.Stream, schedule: Sequence[Sequence[int]], task_incremental: bool = False
) -> list[base.Phase]:
    """Phase descriptions for a schedule (tuples of experience indices, one per phase).

    ``task_incremental``: the task id is known in training too, so a phase's step may predict
    only its own experiences' classes (a per-task head by masking); otherwise every class seen
    so far (class-incremental).
    """
    out, seen = [], set()
    for i, exps in enumerate(schedule):
        classes = labelled(stream, exps)
        new = tuple(sorted(classes - seen))
        seen |= classes
        src = source(stream, exps)
        visible = stream.class_mask(sorted(classes))

        def batches(batch_size, src=src, visible=visible):
            return loader.host_batches(src, visible, batch_size)

        mask = stream.class_mask(sorted(classes) if task_incremental else sorted(seen))
        out.append(base.Phase(i, tuple(exps), new, tuple(sorted(seen)), mask, batches))
    return out


def train_dataset(
    stream: data_base.Stream,
    phase: base.Phase,
    config: ml_collections.ConfigDict,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """The phase's shuffled, augmented training batches for ``config.epochs`` epochs.

    Seeded by the data-order seed (``config.seed`` unless ``config.ensemble.data_order_seed``
    is set) and the phase index, so a resumed run sees the same batches.
    """
    aug = config.augment
    return loader.train_dataset(
        source(stream, phase.experiences),
        stream.class_mask(sorted(labelled(stream, phase.experiences))),
        global_batch=config.batch_size,
        epochs=config.epochs,
        seed=members.order_seed(config) * 1000 + phase.index,
        crop=aug.crop or None,
        flip=aug.flip,
        scale=tuple(aug.scale) if aug.get("scale") else None,
        process_index=process_index,
        process_count=process_count,
    )
