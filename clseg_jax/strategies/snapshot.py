"""A frozen copy of the model from the end of the previous phase (LwF, LFL, MiB, PLOP, ...).

Lives in the strategy state, so its shapes are fixed from the start: before the first phase ends
it holds a copy of the initial model with ``active = 0``, and penalties that use it are multiplied
by ``active`` instead of being switched off by Python control flow (which would recompile).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Snapshot(NamedTuple):
    params: Any
    batch_stats: Any
    class_mask: jax.Array  # bool [K]: the classes the frozen model knew
    active: jax.Array  # float32 []: 1 once a phase has finished


def empty(params, batch_stats, num_classes: int) -> Snapshot:
    """An inactive snapshot with the right shapes (a copy of the initial model)."""
    copy = lambda t: jax.tree.map(jnp.array, t)
    return Snapshot(
        copy(params), copy(batch_stats), jnp.zeros(num_classes, bool), jnp.zeros((), jnp.float32)
    )


def take(params, batch_stats, class_mask: np.ndarray) -> Snapshot:
    """Freezes the current model; ``class_mask`` = the classes it has seen."""
    copy = lambda t: jax.tree.map(jnp.array, t)
    return Snapshot(
        copy(params),
        copy(batch_stats),
        jnp.asarray(class_mask, bool),
        jnp.ones((), jnp.float32),
    )


def outputs(forward, snap: Snapshot, images: jax.Array) -> dict[str, jax.Array]:
    """The frozen model's eval-mode outputs (running statistics; updates nothing), no gradient."""
    out, _ = forward(snap.params, snap.batch_stats, images, False)
    return jax.tree.map(jax.lax.stop_gradient, out)


def initializer(num_classes: int):
    """``init`` hook of a strategy whose whole state is one snapshot (LwF, LFL, ILT)."""

    def init(params, batch_stats) -> Snapshot:
        return empty(params, batch_stats, num_classes)

    return init


def after_phase(params, batch_stats, snap: Snapshot, phase) -> Snapshot:
    """``after_phase`` hook of such a strategy: freeze the model that just finished ``phase``."""
    del snap
    return take(params, batch_stats, phase.class_mask)
