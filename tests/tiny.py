"""Tiny configs, models, batches and a one-step runner shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from clseg_jax import compiles, setup, sharding
from clseg_jax import step as step_lib
from clseg_jax.data import phases as phases_lib
from clseg_jax.models import unet
from configs import shapes_di

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m clseg_jax.main *args`` from the repository root, unbuffered, pipes for
    stdout/stderr (text); ``env``: variables set on top of this process's."""
    return subprocess.Popen(
        [sys.executable, "-m", "clseg_jax.main", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def config(**overrides) -> ml_collections.ConfigDict:
    """The demo config shrunk to seconds per run; ``overrides`` use dotted names.

    Keep ``tests/test_train.py``'s ``TINY_FLAGS`` (the same config through the CLI) in step.
    """
    c = shapes_di.get_config()
    c.data.image_size = 32
    c.data.train_per_exp = 64
    c.data.test_per_exp = 16
    c.model.kwargs.widths = (8, 16)
    c.batch_size = 8
    c.eval_batch_size = 16
    # 32 Adam steps per experience (the demo's optimizer): enough to learn visibly.
    c.epochs = 4
    c.log_every_steps = 1
    c.progress = False
    c.log.tensorboard = False
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


def tiny_unet() -> tuple[nnx.GraphDef, dict, dict]:
    """``unet.UNet(3, widths=(4, 8))`` with numpy-drawn parameters and running statistics.

    ``nnx.eval_shape`` skips the eager initialisers, each compiled once per shape, which on two
    shared cores cost more than the tests themselves.
    """
    abstract = nnx.eval_shape(lambda: unet.UNet(3, widths=(4, 8), rngs=nnx.Rngs(0)))
    graphdef, params, stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
    rng = np.random.default_rng(0)

    def draw(path, x):
        name = path[-1].key
        if name == "kernel":
            scale = np.sqrt(2.0 / np.prod(x.shape[:-1]))
            return jnp.asarray(rng.normal(size=x.shape) * scale, x.dtype)
        if name in ("scale", "var"):
            return jnp.asarray(1.0 + 0.1 * np.abs(rng.normal(size=x.shape)), x.dtype)
        return jnp.asarray(0.1 * rng.normal(size=x.shape), x.dtype)  # bias, mean

    draw_all = lambda t: jax.tree_util.tree_map_with_path(draw, t.to_pure_dict())
    return graphdef, draw_all(params), draw_all(stats)


def batch(n: int = 4, size: int = 16, classes: int = 3) -> dict[str, jax.Array]:
    """A fixed random batch: ``image`` uint8 ``[n,size,size,3]``, ``label`` ``[n,size,size]``."""
    rng = np.random.default_rng(0)
    return {
        "image": jnp.asarray(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)),
        "label": jnp.asarray(rng.integers(0, classes, (n, size, size), dtype=np.uint8)),
    }


def one_step(forward, strategy, tx, params, stats, sstate, batch, num_classes: int = 3):
    """One compiled train step from fresh optimizer state, all classes visible.

    Returns ``(state, sstate, metrics, monitor)`` as the step does.
    """

    state = step_lib.TrainState(params, stats, tx.init(params), jnp.array(0, jnp.int32))
    step = jax.jit(step_lib.make_train_step(forward, strategy, tx))
    return step(
        state,
        sstate,
        step_lib.TrainMetrics.empty(),
        step_lib.new_monitor(),
        batch,
        jax.random.PRNGKey(0),
        jnp.ones(num_classes, bool),
    )


class Driven(NamedTuple):
    """What ``drive`` returns: the final arrays and, per phase, what was seen."""

    state: step_lib.TrainState
    sstate: Any
    compiles: list[int]  # XLA compiles per phase (hooks, steps, evaluation)
    metrics: list[dict[str, float]]  # train metrics averaged over each phase
    first_bad_step: list[int]  # the step monitor after each phase (-1: all finite)
    rows: list[list[np.ndarray]]  # one accuracy-matrix row of statistics per phase


def drive(
    parts: setup.Parts,
    phases: list | None = None,
    evaluate: bool = True,
    on_begin: Callable[[Any, Any, Any], None] | None = None,
    on_end: Callable[[Any, Any, Any], None] | None = None,
) -> Driven:
    """Runs phases the way ``train.run`` does (``setup.begin_phase``, the trainer's jitted step
    over the phase's batches, ``setup.end_phase``, one row of evaluation), without checkpoints.

    ``phases``: defaults to the strategy's schedule; pass ``data.phases.make(stream, schedule)``
    to drive another. The step is jitted, not compiled ahead of time, so a changed shape or
    placement recompiles and shows in ``compiles``. ``on_begin(phase, state, sstate)`` sees
    what ``begin_phase`` made (before the step donates it), ``on_end(phase, state, sstate)`` each
    phase's end; neither counts towards ``compiles``.
    """
    phases = parts.phases if phases is None else phases
    step = setup.jit_step(parts)
    state, sstate, key = parts.arrays["state"], parts.arrays["sstate"], parts.arrays["rng"]
    repl = sharding.replicated(parts.mesh)
    batch_sh = sharding.batch_sharding(parts.mesh)
    out = Driven(state, sstate, [], [], [], [])
    for phase in phases:
        dataset = phases_lib.train_dataset(parts.stream, phase, parts.config)
        with compiles.Counter() as counter:
            state, sstate = setup.begin_phase(parts, state, sstate, phase, steps=len(dataset))
        count = counter.count
        if on_begin is not None:
            on_begin(phase, state, sstate)
        with compiles.Counter() as counter:
            metrics, monitor = step_lib.fresh_accumulators(parts.mesh)
            mask = jax.device_put(jnp.asarray(phase.class_mask), repl)
            for local in dataset:
                batch = sharding.global_batch(local, batch_sh)
                state, sstate, metrics, monitor = step(
                    state, sstate, metrics, monitor, batch, key, mask
                )
            sstate = setup.end_phase(parts, state, sstate, phase)
            if evaluate:
                row = parts.evaluator.row(state.params, state.batch_stats, phase.class_mask, sstate)
                out.rows.append(row)
            jax.block_until_ready((state, sstate))
        out.compiles.append(count + counter.count)
        out.metrics.append({k: float(v) for k, v in metrics.compute().items()})
        out.first_bad_step.append(int(monitor.first_bad_step))
        if on_end is not None:
            on_end(phase, state, sstate)
    return out._replace(state=state, sstate=sstate)


def signature(tree) -> tuple:
    """A pytree's structure with each leaf's shape and dtype (what must not change)."""
    return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]
