"""Between-phase passes with a batch's rows split over the data devices and the processes.

A pass between phases (EWC's Fisher, MAS's importances, PLOP's entropy histogram, herding's
features, DER++'s stored logits, iCaRL's class means) runs one compiled function over padded
batches of a phase. When the parameters live on a mesh whose data axis has several devices, each
device computes its own block of a batch's rows and each process feeds only its block, as training
batches are fed (``feed``). Sums over rows are added with a ``psum`` (``Sum``); per-row outputs are
gathered with an ``all_gather`` so that every process holds all of them (``Map``): host-side
choices made from them (memory selection) come out the same on every process.

Written with ``jax.shard_map`` rather than left to XLA's partitioner: that split a per-sample
convolution's weight gradient (a ``batch_group_count`` convolution) wrongly on XLA:CPU (jax
0.10.2), and EWC's Fisher of conv kernels came out 6.5x too small. One program per mesh, cached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clseg_jax import sharding

PyTree = Any


def mesh_for(tree: PyTree, batch_size: int) -> Mesh | None:
    """The mesh whose data axis a pass's batches of ``batch_size`` split over: ``tree``'s (the
    parameters'), if its data axis has several devices and the batch divides evenly over them and
    over the processes; else None (the pass runs whole, as on one device)."""
    leaves = jax.tree.leaves(tree)
    sh = getattr(leaves[0], "sharding", None) if leaves else None
    if not isinstance(sh, NamedSharding) or sharding.DATA not in sh.mesh.axis_names:
        return None
    devices = sh.mesh.shape[sharding.DATA]
    if devices == 1 or batch_size % devices or batch_size % jax.process_count():
        return None
    return sh.mesh


def feed(x: np.ndarray, mesh: Mesh | None) -> np.ndarray | jax.Array:
    """``x [B,...]`` (the whole batch, as every process reads it) as the pass's input: unchanged
    without a mesh, else a global array built from this process's block of rows only."""
    if mesh is None:
        return x
    rows = len(x) // jax.process_count()
    first = jax.process_index() * rows
    return jax.make_array_from_process_local_data(
        sharding.batch_sharding(mesh), x[first : first + rows]
    )


def _split(fn: Callable, mesh: Mesh, whole: int, nargs: int, rows_out: bool) -> Callable:
    specs = (PartitionSpec(),) * whole + (PartitionSpec(sharding.DATA),) * (nargs - whole)
    if rows_out:
        body = lambda *a: jax.tree.map(
            lambda y: jax.lax.all_gather(y, sharding.DATA, tiled=True), fn(*a)
        )
    else:
        body = lambda *a: jax.lax.psum(fn(*a), sharding.DATA)
    return jax.shard_map(
        body, mesh=mesh, in_specs=specs, out_specs=PartitionSpec(), check_vma=False
    )


class Sum:
    """``sum(acc, *whole, *rows, mesh=None)`` = ``acc + finalize(fn(*whole, *rows))``, compiled,
    ``acc`` donated.

    ``fn`` sums over the rows of its last ``len(args) - whole`` arguments (each ``[B,...]``), so
    row blocks' results add up to the batch's; ``finalize`` (default: none) is applied after the
    blocks are added, for what is not a sum over rows (a transform of a batch's mean gradient).
    """

    def __init__(
        self,
        fn: Callable[..., PyTree],
        whole: int,
        finalize: Callable[[PyTree], PyTree] | None = None,
    ):
        self._fn, self._whole = fn, whole
        self._finalize = finalize or (lambda x: x)
        self._programs: dict = {}

    def __call__(self, acc: PyTree, *args, mesh: Mesh | None = None) -> PyTree:
        if mesh not in self._programs:
            fn = self._fn if mesh is None else _split(self._fn, mesh, self._whole, len(args), False)
            add = lambda acc, *a: jax.tree.map(jnp.add, acc, self._finalize(fn(*a)))
            self._programs[mesh] = jax.jit(add, donate_argnums=0)
        return self._programs[mesh](acc, *args)


class Map:
    """``map(*whole, *rows, mesh=None)`` = ``fn(*whole, *rows)``, compiled: per-row outputs
    (leaves ``[B,...]``), whole on every process whether or not the rows were split."""

    def __init__(self, fn: Callable[..., PyTree], whole: int):
        self._fn, self._whole = fn, whole
        self._programs: dict = {}

    def __call__(self, *args, mesh: Mesh | None = None) -> PyTree:
        if mesh not in self._programs:
            fn = self._fn if mesh is None else _split(self._fn, mesh, self._whole, len(args), True)
            self._programs[mesh] = jax.jit(fn)
        return self._programs[mesh](*args)
