"""The strategy interface can express what later methods need (ARCHITECTURE.md's list).

Toy strategies, each checked against a direct computation: a frozen previous model inside the
step without a second BatchNorm update (LwF, MiB), the task-loss gradient alone (SI), gradient
transforms (GEM), replacing the task loss (MiB, BCE heads), preparing the batch (replay), and
``chain`` equal to the sum of its members.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from clseg_jax import losses
from clseg_jax import step as step_lib
from clseg_jax.models import unet
from clseg_jax.strategies import base
from tests import tiny


@pytest.fixture(scope="module")
def parts():
    model = unet.UNet(3, widths=(4, 8), rngs=nnx.Rngs(0))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    forward = step_lib.make_forward(graphdef)
    return forward, params.to_pure_dict(), stats.to_pure_dict(), tiny.batch()


def _run(strategy, parts, sstate=None, lr=0.1):
    forward, params, stats, batch = parts
    sstate = strategy.init(params, stats) if sstate is None else sstate
    return tiny.one_step(forward, strategy, optax.sgd(lr), params, stats, sstate, batch)


def _ce(forward, params, stats, batch):
    out, new_stats = forward(params, stats, batch["image"], True)
    return losses.cross_entropy(out["logits"], batch["label"]), new_stats


def test_frozen_model_in_step_updates_batchnorm_once(parts):
    forward, params, stats, batch = parts
    old = jax.tree.map(lambda p: p * 0.5, params)  # a different "previous model"

    def kd_loss(inputs, sstate, key):
        old_out, _ = forward(sstate["params"], sstate["stats"], inputs.batch["image"], False)
        return jnp.mean((inputs.outputs["logits"] - old_out["logits"]) ** 2), {}

    strategy = base.Strategy(init=lambda p, s: {"params": old, "stats": s}, loss=kd_loss)
    new_state, *_ = _run(strategy, parts)
    _, expected_stats = _ce(forward, params, stats, batch)  # one train-mode forward
    for a, b in zip(
        jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(expected_stats), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)

    def objective(p):
        ce, _ = _ce(forward, p, stats, batch)
        old_out, _ = forward(old, stats, batch["image"], False)
        new_out, _ = forward(p, stats, batch["image"], True)
        return ce + jnp.mean((new_out["logits"] - old_out["logits"]) ** 2)

    grads = jax.grad(objective)(params)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_task_grads_exclude_the_penalty(parts):
    forward, params, stats, batch = parts

    def penalty(inputs, sstate, key):
        return sum(jnp.sum(p**2) for p in jax.tree.leaves(inputs.params)), {}

    def on_step(sstate, task_grads, old, new):
        return task_grads  # record them

    zeros = jax.tree.map(jnp.zeros_like, params)
    strategy = base.Strategy(init=lambda p, s: zeros, loss=penalty, on_step=on_step)
    _, recorded, *_ = _run(strategy, parts)
    expected = jax.grad(lambda p: _ce(forward, p, stats, batch)[0])(params)
    for a, b in zip(jax.tree.leaves(recorded), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_parameter_penalty_adds_its_gradient_and_leaves_task_grads_alone(parts):
    forward, params, stats, batch = parts
    anchor = jax.tree.map(lambda p: p + 1.0, params)

    def penalty(p, sstate):
        return 0.5 * sum(
            jnp.sum((a - b) ** 2)
            for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(anchor), strict=True)
        ), {}

    strategy = base.Strategy(
        init=lambda p, s: jax.tree.map(jnp.zeros_like, p),
        penalty=penalty,
        on_step=lambda sstate, task_grads, old, new: task_grads,
    )
    assert not base.has_data_loss(strategy)  # so no second backward pass is compiled
    new_state, recorded, metrics, _ = _run(strategy, parts)
    task_grads = jax.grad(lambda p: _ce(forward, p, stats, batch)[0])(params)
    for a, b in zip(jax.tree.leaves(recorded), jax.tree.leaves(task_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    # The update used task gradient + penalty gradient (p - anchor = -1 everywhere).
    expected = jax.tree.map(lambda p, g: p - 0.1 * (g - 1.0), params, task_grads)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    ce, _ = _ce(forward, params, stats, batch)
    n = sum(x.size for x in jax.tree.leaves(params))
    np.testing.assert_allclose(float(metrics.compute()["loss"]), float(ce) + 0.5 * n, rtol=1e-5)


def test_transform_grads_controls_the_update(parts):
    _, params, _, _ = parts
    strategy = base.Strategy(
        transform_grads=lambda g, inputs, s, k: jax.tree.map(jnp.zeros_like, g)
    )
    new_state, *_ = _run(strategy, parts)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_replacing_the_task_loss(parts):
    forward, params, stats, batch = parts

    def only_logit_norm(inputs, sstate, key):
        return jnp.mean(inputs.outputs["logits"] ** 2), {}

    strategy = base.Strategy(loss=only_logit_norm, replaces_task_loss=True)
    _, _, metrics, _ = _run(strategy, parts)
    out, _ = forward(params, stats, batch["image"], True)
    np.testing.assert_allclose(
        float(metrics.compute()["loss"]), float(jnp.mean(out["logits"] ** 2)), rtol=1e-5
    )


def test_prepare_batch_changes_what_the_step_sees(parts):
    ignore_all = base.Strategy(
        prepare_batch=lambda b, s, k: {**b, "label": jnp.full_like(b["label"], 255)}
    )
    _, _, metrics, _ = _run(ignore_all, parts)
    assert float(metrics.compute()["task_loss"]) == 0.0  # every pixel ignored


def test_chain_adds_losses_and_tuples_states(parts):
    forward, params, stats, batch = parts
    a = base.Strategy(init=lambda p, s: jnp.ones(2), loss=lambda i, s, k: (jnp.sum(s), {"a": 1.0}))
    b = base.Strategy(init=lambda p, s: jnp.ones(3), loss=lambda i, s, k: (3.0 * jnp.sum(s), {}))
    chained = base.chain(a, b)
    sstate = chained.init(params, stats)
    assert [x.shape for x in sstate] == [(2,), (3,)]
    _, _, metrics, _ = _run(chained, parts)
    ce, _ = _ce(forward, params, stats, batch)
    np.testing.assert_allclose(float(metrics.compute()["loss"]), float(ce) + 2 + 9, rtol=1e-5)
    with pytest.raises(ValueError, match="at most one strategy may replace"):
        base.chain(base.Strategy(replaces_task_loss=True), base.Strategy(replaces_task_loss=True))
