"""PPI: its constraints against gradients computed one task at a time, and its objective."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from clseg_jax import losses, models, tasks
from clseg_jax import step as step_lib
from clseg_jax.strategies import base, ppi, snapshot

K, T, B = 6, 3, 4
TASK_OF_CLASS = np.array([0, 0, 1, 1, 2, 2])


@pytest.fixture(scope="module")
def model():
    cfg = ml_collections.ConfigDict(
        {"name": "resnet18", "kwargs": {"small_input": True, "widths": (4, 8, 8, 8)}}
    )
    graphdef, params, stats = models.init(cfg, K, seed=0)
    return step_lib.make_forward(graphdef), params, stats


def _setup(model, **cfg):
    forward, params, stats = model
    env = base.Env(forward, K, T, image_shape=(16, 16, 3), label_shape=(K,), task=tasks.MULTILABEL)
    c = ml_collections.ConfigDict({**ppi.DEFAULTS, **cfg})
    strategy = ppi.make(c, env)
    # The old model: the current one with shifted head biases, so distillation targets differ.
    old = jax.tree.map(jnp.array, params)
    old["head"]["bias"] = old["head"]["bias"] + jnp.linspace(-1.0, 1.0, K)
    st = ppi.PPIState(
        snapshot.take(old, stats, np.arange(K) < 4),
        jnp.asarray(TASK_OF_CLASS, jnp.int32),
        jnp.asarray(2, jnp.int32),  # training task 2; tasks 0 and 1 are past
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.integers(0, 256, (B, 16, 16, 3), dtype=np.uint8)),
        "label": jnp.asarray(rng.integers(0, 2, (B, K)), jnp.uint8),
    }
    inputs = base.LossInputs(params, stats, batch, None, None, jnp.ones(K, bool))
    return forward, params, stats, strategy, st, batch, inputs


def _task_grad(forward, params, stats, st, images, k) -> np.ndarray:
    """Independent g_k: BCE of task k's classes against the old model's sigmoid outputs."""
    old = forward(st.snap.params, st.snap.batch_stats, images, False)[0]["logits"]
    target = jax.nn.sigmoid(old)
    cols = np.flatnonzero(TASK_OF_CLASS == k)

    def loss(p):
        x = forward(p, stats, images, True)[0]["logits"][:, cols]
        t = target[:, cols]
        return jnp.mean(jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x))))

    return np.asarray(ravel_pytree(jax.grad(loss)(params))[0], np.float64)


def test_ppi_projection_keeps_every_past_task_from_rising(model):
    forward, params, stats, strategy, st, batch, inputs = _setup(model, ppi_eps=0.0)
    G = np.stack([_task_grad(forward, params, stats, st, batch["image"], k) for k in (0, 1)])
    head = np.asarray(ravel_pytree(ppi.head_mask(params))[0])
    _, unravel = ravel_pytree(params)
    # An update that opposes task 0 on the shared parameters.
    g = np.where(head, 0.0, -G[0] + 0.2 * G[1])
    out = jax.jit(lambda gr: strategy.transform_grads(gr, inputs, st, None))(
        unravel(jnp.asarray(g, jnp.float32))
    )
    out = np.asarray(ravel_pytree(out)[0], np.float64)
    shared = ~head
    dots = G[:, shared] @ out[shared]
    scale = np.linalg.norm(G[:, shared], axis=1) * np.linalg.norm(out[shared])
    assert np.all(dots >= -1e-5 * scale), dots / scale
    # Dual feasibility with the margin: out = g + G^T v, v >= 1 on the shared part.
    v, *_ = np.linalg.lstsq(G[:, shared].T, out[shared] - g[shared], rcond=None)
    assert np.all(v >= 1.0 - 1e-3), v
    # Head: each past task's columns follow its own loss; the current task's get g (zero here).
    np.testing.assert_allclose(out[head], G[0, head] + G[1, head], rtol=1e-4, atol=1e-7)


def test_ppi_objective_is_the_current_tasks_bce(model):
    forward, params, stats, strategy, st, batch, _ = _setup(model)
    out = forward(params, stats, batch["image"], True)[0]
    inputs = base.LossInputs(params, stats, batch, out, None, jnp.ones(K, bool))
    value, _ = strategy.loss(inputs, st, None)
    want = losses.binary_cross_entropy(out["logits"], batch["label"], TASK_OF_CLASS == 2)
    np.testing.assert_allclose(float(value), float(want), rtol=1e-6)


def test_ppi_rejects_non_multilabel_streams(model):
    forward = model[0]
    env = base.Env(forward, K, T, task=tasks.CLASSIFICATION)
    with pytest.raises(ValueError, match="ppi needs a multi-label stream"):
        ppi.make(ml_collections.ConfigDict(ppi.DEFAULTS), env)
