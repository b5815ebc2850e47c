"""Atomic checkpoints with orbax: arrays (train state, strategy state, RNG) plus JSON metadata.

Metadata holds everything needed to resume where the run stopped: the phase and step within it,
the grain iterator state, the rows of R evaluated so far, the initial row and the timings. Orbax
writes to ``<n>.orbax-checkpoint-tmp`` and renames when complete, so a run killed mid-save resumes
from the previous checkpoint. Checkpoints are numbered by save (not by training step) because the
end-of-phase save may fall on the same training step as a periodic one.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.serialization import type_handler_registry

from clseg_jax import paths

# Replicated arrays at least this large are written in parts by several processes' replicas;
# smaller ones whole by one replica.
REPLICA_SLICE_BYTES = 1 << 20


class _SlowJsonHandler(ocp.JsonCheckpointHandler):
    """The metadata writer with a delay before it writes: a test's way to have a save in flight
    when the process is killed (``config.debug.save_delay_s``)."""

    def __init__(self, delay_s: float):
        super().__init__()
        self._delay_s = delay_s

    async def _save_fn(self, x, directory):
        await asyncio.sleep(self._delay_s)
        await super()._save_fn(x, directory)


class _ArraysHandler(ocp.StandardCheckpointHandler):
    """Orbax's standard array handler with replica-parallel writes only where they pay.

    By default orbax (0.12) splits every replicated array into one slice per replica on a CPU or
    TPU, each an eager ``slice`` dispatched before the copy to the host. Within one process
    every replica's slice is written by the same process, so that is pure overhead: measured
    here, 672 slices per save of a tiny UNet's state on 4 CPU devices, 5 of a 15 s run's seconds
    (``tests/test_multihost.py``). Across processes it shares the writing of large arrays, so it
    stays on there for arrays of at least ``REPLICA_SLICE_BYTES``.
    """

    def __init__(self):
        super().__init__()
        default = type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY
        arrays = ocp.type_handlers.ArrayHandler(
            use_replica_parallel=jax.process_count() > 1,
            min_slice_bytes_for_replica_parallel=REPLICA_SLICE_BYTES,
            # The default handler's store: the same per-array metadata on disk.
            array_metadata_store=default.get(jax.Array)._array_metadata_store,
        )
        others = (int, float, bytes, np.number, np.ndarray, str, type(Ellipsis))
        registry = type_handler_registry.create_type_handler_registry(
            *[(ty, default.get(ty)) for ty in others], (jax.Array, arrays)
        )
        # StandardCheckpointHandler takes no registry; the PyTree handler it wraps does (with
        # StandardCheckpointHandler's own defaults otherwise).
        self._impl = ocp.PyTreeCheckpointHandler(
            save_concurrent_gb=96, restore_concurrent_gb=96, type_handler_registry=registry
        )


class Checkpointer:
    """Saves/restores ``(arrays pytree, meta dict)`` pairs under ``directory``.

    ``save(..., wait=False)`` returns once the arrays are copied off the devices; orbax writes
    them in a background thread (training goes on) and renames the folder when complete, so a
    kill mid-write leaves the previous checkpoint as the latest. ``committed()`` lists the saves
    that have completed since it was last asked. ``delay_s``: tests only (above).
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2, delay_s: float = 0.0):
        self._directory = paths.resolve(directory)  # local or gs://
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        arrays = _ArraysHandler()
        meta = _SlowJsonHandler(delay_s) if delay_s else ocp.JsonCheckpointHandler()
        for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
            registry.add("arrays", args, arrays)
        for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
            registry.add("meta", args, meta)
        self._manager = ocp.CheckpointManager(
            self._directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            handler_registry=registry,
        )
        self._next = (self.latest() or 0) + 1
        self._pending: tuple[int, dict] | None = None
        self._done: list[tuple[int, dict]] = []

    def latest(self) -> int | None:
        """The newest complete checkpoint (one still being written does not count)."""
        return self._manager.latest_step()

    def save(self, arrays: Any, meta: dict, wait: bool = True) -> int:
        """Saves a new checkpoint; ``wait``: until it is complete on disk."""
        # Orbax keeps one save in flight: the previous one completes before this one starts.
        self.wait()
        # A copy: the metadata is written in the background while the trainer's dicts move on.
        meta = json.loads(json.dumps(meta))
        n, self._next = self._next, self._next + 1
        self._manager.save(
            n,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
            ),
        )
        self._pending = (n, meta)
        if wait:
            self.wait()
        return n

    def wait(self) -> None:
        """Blocks until the save in flight (if any) is complete."""
        self._manager.wait_until_finished()
        self._settle()

    def committed(self) -> list[tuple[int, dict]]:
        """``(number, meta)`` of the saves completed since the last call, oldest first."""
        self._settle()
        out, self._done = self._done, []
        return out

    def _settle(self) -> None:
        if self._pending is not None and not self._manager.is_saving_in_progress():
            self._manager.check_for_errors()
            self._done.append(self._pending)
            self._pending = None

    def restore(self, abstract_arrays: Any) -> tuple[Any, dict]:
        """Restores the latest checkpoint into the structure/shardings of ``abstract_arrays``."""
        step = self.latest()
        if step is None:
            raise FileNotFoundError("no checkpoint to restore")
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardRestore(abstract_arrays), meta=ocp.args.JsonRestore()
            ),
        )
        return out["arrays"], dict(out["meta"])

    def directory(self, step: int) -> str:
        """The folder of one finished checkpoint (a copy of it restores elsewhere)."""
        return str(self._directory / str(step))

    def steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def read(self, step: int | None = None) -> tuple[Any, dict]:
        """Reads a checkpoint (default: the latest) as saved, without a target structure; arrays
        saved on devices this process does not have (another host count or topology: a TPU
        VM's checkpoint on a laptop) land whole on its first device."""
        step = self.latest() if step is None else step
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        arrays = ocp.args.StandardRestore(fallback_sharding=here)
        out = self._manager.restore(
            step, args=ocp.args.Composite(arrays=arrays, meta=ocp.args.JsonRestore())
        )
        return out["arrays"], dict(out["meta"])

    def close(self) -> None:
        self._manager.close()
