"""Atomic checkpoints with orbax: arrays (train state, strategy state, RNG) plus JSON metadata.

Metadata holds everything needed to resume where the run stopped: the phase and step within it,
the grain iterator state, the rows of R evaluated so far, the initial row and the timings. Orbax
writes to ``<n>.orbax-checkpoint-tmp`` and renames when complete, so a run killed mid-save resumes
from the previous checkpoint. Checkpoints are numbered by save (not by training step) because the
end-of-phase save may fall on the same training step as a periodic one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves/restores ``(arrays pytree, meta dict)`` pairs under ``directory``."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self._directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("arrays", "meta"),
        )

    def latest(self) -> int | None:
        return self._manager.latest_step()

    def save(self, arrays: Any, meta: dict) -> int:
        """Saves a new checkpoint and waits until it is complete on disk."""
        n = (self.latest() or 0) + 1
        self._manager.save(
            n,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)
            ),
        )
        self._manager.wait_until_finished()
        return n

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
        return os.path.join(self._directory, str(step))

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
