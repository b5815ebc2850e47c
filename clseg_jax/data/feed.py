"""What the devices eat: grain batches as global arrays, read and placed ahead of the step.

``iterate(dataset, batch_sharding, workers=, prefetch=)`` turns a grain ``MapDataset`` of this
process's rows into an iterator of global batches (``sharding.global_batch``):
- ``workers > 0``: grain worker processes read, decode and augment (``config.data.workers``;
  JPEG decoding and the papers' random scale are the CPU-heavy part of the VOC / ADE recipes);
- ``prefetch > 0``: a thread puts the next ``prefetch`` batches on the devices while the current
  step runs (2: double buffering; ``config.data.device_prefetch``).
The iterator's ``get_state()`` / ``set_state()`` describe the batches the trainer has taken, not
those read ahead, so a checkpoint taken mid-phase resumes at the right batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
from absl import flags
from jax.sharding import NamedSharding

from clseg_jax import sharding


def iterate(
    dataset: grain.MapDataset,
    batch_sharding: NamedSharding,
    *,
    workers: int = 0,
    prefetch: int = 2,
    threads: int = 0,
) -> Iterator[dict]:
    """Global batches of ``dataset`` (module docstring); ``threads``: grain's reading threads
    for a dataset whose elements are built on access (evaluation batches)."""
    if workers < 0 or prefetch < 0:
        raise ValueError(
            f"data.workers and data.device_prefetch must be >= 0, got {workers}, {prefetch}"
        )
    options = (
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
        if threads
        else None
    )
    ds = dataset.to_iter_dataset(options)
    if workers:
        # Grain's worker processes read absl flags; a library caller (tests, the service) may
        # never have parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    ds = ds.map(lambda local: sharding.global_batch(local, batch_sharding))
    if prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return iter(ds)
