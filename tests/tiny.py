"""Tiny configs, models, batches and a one-step runner shared by the tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from clseg_jax import step as step_lib
from clseg_jax.models import unet
from configs import shapes_di


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


class CompileCounter:
    """Counts XLA backend compilations through ``jax.monitoring`` while active."""

    def __enter__(self):
        self.count = 0

        def listener(name, _secs, **_):
            if name == "/jax/core/compile/backend_compile_duration":
                self.count += 1

        self._listener = listener
        jax.monitoring.register_event_duration_secs_listener(listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)


def signature(tree) -> tuple:
    """A pytree's structure with each leaf's shape and dtype (what must not change)."""
    return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]
