"""SI (Zenke et al. 2017) against hand computations.

The path integral and the importance on a quadratic optimised by hand-unrolled SGD over two
phases (the second with the SI penalty, so some contributions are negative and the relu acts),
the penalty and its gradient against the written formula, and, inside the real compiled step,
that ``on_step`` receives the task-loss gradient alone (SI alone, and chained with LwF, whose
data loss makes the step take a second backward pass).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from clseg_jax import losses
from clseg_jax import step as step_lib
from clseg_jax.strategies import base, lwf, si, snapshot
from tests import tiny

LR, C, XI = 0.1, 5.0, 1e-3


def _phase(index: int) -> base.Phase:
    mask = np.array([True, True, index > 0])
    seen = tuple(int(i) for i in np.flatnonzero(mask))
    return base.Phase(index, (index,), seen, seen, mask, lambda bs: iter(()))


def _strategy(c: float = C, xi: float = XI) -> base.Strategy:
    cfg = ml_collections.ConfigDict({"si_c": c, "si_xi": xi})
    return si.make(cfg, base.Env(None, 3, 2))


def test_path_integral_and_importance_on_a_quadratic():
    # Seed and c chosen so that the second phase's heavy-ball steps go uphill on f2 enough for
    # one coordinate's Omega + omega / (...) to be negative: the relu then matters.
    c, momentum = 1.0, 0.9
    rng = np.random.default_rng(17)
    m1, m2 = rng.normal(size=(2, 3, 3))
    a1, a2 = m1 @ m1.T + np.eye(3), m2 @ m2.T + np.eye(3)
    b1, b2 = rng.normal(size=(2, 3))
    theta0 = rng.normal(size=3)
    strategy = _strategy(c=c)
    sstate = strategy.init({"w": jnp.asarray(theta0, jnp.float32)}, {})
    np.testing.assert_allclose(np.asarray(sstate.anchor["w"]), theta0, rtol=1e-6)

    # Phase 1: plain SGD on f1 = 0.5 theta^T A1 theta - b1^T theta (Omega = 0: no penalty).
    theta, omega = theta0.copy(), np.zeros(3)
    for _ in range(3):
        g = a1 @ theta - b1
        new = theta - LR * g
        omega += -g * (new - theta)
        sstate = strategy.on_step(
            sstate, {"w": jnp.asarray(g)}, {"w": jnp.asarray(theta)}, {"w": jnp.asarray(new)}
        )
        theta = new
    np.testing.assert_allclose(np.asarray(sstate.omega["w"]), omega, rtol=1e-5)
    sstate = strategy.after_phase({"w": jnp.asarray(theta, jnp.float32)}, {}, sstate, _phase(0))
    big1 = np.maximum(omega / ((theta - theta0) ** 2 + XI), 0.0)
    np.testing.assert_allclose(np.asarray(sstate.importance["w"]), big1, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(sstate.omega["w"]), 0.0)
    np.testing.assert_allclose(np.asarray(sstate.anchor["w"]), theta, rtol=1e-6)
    assert np.all(big1 > 0)

    # Phase 2: SGD with momentum on f2 + c * sum Omega (theta - theta*)^2; omega sees grad f2
    # alone, and delta is the optimizer's actual step (not -lr * g).
    anchor, omega, velocity = theta.copy(), np.zeros(3), np.zeros(3)
    for _ in range(3):
        g = a2 @ theta - b2
        total = g + 2 * c * big1 * (theta - anchor)
        pen_grad = jax.grad(lambda p, s: strategy.penalty(p, s)[0])(
            {"w": jnp.asarray(theta)}, sstate
        )
        np.testing.assert_allclose(np.asarray(pen_grad["w"]), total - g, rtol=1e-4, atol=1e-6)
        velocity = momentum * velocity + total
        new = theta - LR * velocity
        omega += -g * (new - theta)
        sstate = strategy.on_step(
            sstate, {"w": jnp.asarray(g)}, {"w": jnp.asarray(theta)}, {"w": jnp.asarray(new)}
        )
        theta = new
    np.testing.assert_allclose(np.asarray(sstate.omega["w"]), omega, rtol=1e-4, atol=1e-6)
    pre_relu = big1 + omega / ((theta - anchor) ** 2 + XI)
    assert np.any(pre_relu < 0) and np.any(pre_relu > 0), pre_relu  # the relu must matter
    sstate = strategy.after_phase({"w": jnp.asarray(theta, jnp.float32)}, {}, sstate, _phase(1))
    np.testing.assert_allclose(
        np.asarray(sstate.importance["w"]), np.maximum(pre_relu, 0.0), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_array_equal(np.asarray(sstate.omega["w"]), 0.0)
    np.testing.assert_allclose(np.asarray(sstate.anchor["w"]), theta, rtol=1e-6)


def test_penalty_and_gradient_match_the_formula():
    rng = np.random.default_rng(1)
    shapes = {"a": (2, 3), "b": {"c": (4,)}}
    draw = lambda: jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s), jnp.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    params, anchor, big = draw(), draw(), jax.tree.map(jnp.abs, draw())
    sstate = si.SIState(jax.tree.map(jnp.zeros_like, params), big, anchor)
    strategy = _strategy(c=0.3)
    value, grads = jax.value_and_grad(lambda p: strategy.penalty(p, sstate)[0])(params)
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
    p, a, o = flat(params), flat(anchor), flat(big)
    np.testing.assert_allclose(float(value), 0.3 * np.sum(o * (p - a) ** 2), rtol=1e-5)
    np.testing.assert_allclose(flat(grads), 2 * 0.3 * o * (p - a), rtol=1e-5, atol=1e-7)
    assert float(value) > 0


@pytest.fixture(scope="module")
def parts():
    graphdef, params, stats = tiny.tiny_unet()
    return step_lib.make_forward(graphdef), params, stats, tiny.batch()


@pytest.mark.parametrize("with_lwf", [False, True])
def test_compiled_step_gives_si_the_task_gradient_alone(parts, with_lwf):
    forward, params, stats, batch = parts
    rng = np.random.default_rng(2)
    # A non-zero Omega and a displaced anchor, so the penalty moves the update.
    importance = jax.tree.map(lambda p: jnp.asarray(rng.uniform(0.5, 1.5, p.shape)), params)
    anchor = jax.tree.map(lambda p: p + 0.1, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    si_state = si.SIState(zeros, importance, anchor)
    strategy, sstate = _strategy(c=C), si_state
    if with_lwf:
        env = base.Env(forward, 3, 2)
        cfg = ml_collections.ConfigDict(lwf.DEFAULTS)
        old = jax.tree.map(lambda p: 0.5 * p, params)
        strategy = base.chain(strategy, lwf.make(cfg, env))
        sstate = (si_state, snapshot.take(old, stats, np.array([True, True, False])))
    new_state, new_sstate, metrics, _ = tiny.one_step(
        forward, strategy, optax.sgd(LR), params, stats, sstate, batch
    )
    omega = (new_sstate[0] if with_lwf else new_sstate).omega

    def ce(p):
        out, _ = forward(p, stats, batch["image"], True)
        return losses.cross_entropy(out["logits"], batch["label"])

    # Jitted: op-by-op evaluation of the UNet's backward pass is slower than compiling it.
    task_loss, task_grads = jax.jit(jax.value_and_grad(ce))(params)
    for g, old, new, w in zip(
        jax.tree.leaves(task_grads),
        jax.tree.leaves(params),
        jax.tree.leaves(new_state.params),
        jax.tree.leaves(omega),
        strict=True,
    ):
        expected = -np.asarray(g) * (np.asarray(new) - np.asarray(old))
        np.testing.assert_allclose(np.asarray(w), expected, rtol=2e-3, atol=1e-9)
    if not with_lwf:
        # The update itself used task gradient + penalty gradient 2c Omega (theta - theta*).
        for g, old, new, o in zip(
            jax.tree.leaves(task_grads),
            jax.tree.leaves(params),
            jax.tree.leaves(new_state.params),
            jax.tree.leaves(importance),
            strict=True,
        ):
            expected = np.asarray(old) - LR * (np.asarray(g) - 2 * C * np.asarray(o) * 0.1)
            np.testing.assert_allclose(np.asarray(new), expected, rtol=1e-4, atol=1e-5)
        pen = C * sum(float(jnp.sum(o * 0.01)) for o in jax.tree.leaves(importance))
        np.testing.assert_allclose(
            float(metrics.compute()["loss"]), float(task_loss) + pen, rtol=1e-4
        )
