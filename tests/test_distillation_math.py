"""Distillation losses against numpy: ``losses.distillation``, LwF and LFL inside the real
compiled step (0 before the first snapshot, the written formula after it, the frozen model
carrying no gradient), LFL's head freezing, and LwF chained with a parameter penalty.
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
from clseg_jax.strategies import base, lfl, lwf, snapshot
from tests import tiny

LR = 0.1
OLD_MASK = np.array([True, True, False])  # the classes the frozen model knew


def _np_kd(new: np.ndarray, old: np.ndarray, mask: np.ndarray, t: float) -> float:
    """T^2 * mean over pixels of KL(softmax(old/T) || softmax(new/T)) over ``mask``'s classes."""

    def log_softmax(z):
        z = np.asarray(z, np.float64)[..., mask] / t
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp_new, lp_old = log_softmax(new), log_softmax(old)
    return t**2 * float(np.mean(np.sum(np.exp(lp_old) * (lp_old - lp_new), -1)))


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_distillation_matches_numpy(t):
    rng = np.random.default_rng(0)
    new, old = rng.normal(size=(2, 2, 4, 4, 5)) * 3
    mask = np.array([True, False, True, True, False])
    value = float(losses.distillation(jnp.asarray(new), jnp.asarray(old), jnp.asarray(mask), t))
    np.testing.assert_allclose(value, _np_kd(new, old, mask, t), rtol=1e-5)
    assert value > 0.01
    # Classes outside the mask do not matter, be they random, huge or mask_logits' NEG.
    new2, old2 = new.copy(), old.copy()
    new2[..., ~mask] = losses.NEG
    old2[..., ~mask] = rng.normal(size=old2[..., ~mask].shape) * 100
    value2 = losses.distillation(jnp.asarray(new2), jnp.asarray(old2), jnp.asarray(mask), t)
    np.testing.assert_allclose(float(value2), value, rtol=1e-5)
    grad = jax.grad(losses.distillation)(
        jnp.asarray(new2, jnp.float32), jnp.asarray(old2), jnp.asarray(mask), t
    )
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[..., ~mask] == 0)
    # Identical logits on the known classes: no loss; an empty mask: 0, not NaN.
    same = losses.distillation(jnp.asarray(old), jnp.asarray(old2), jnp.asarray(mask), t)
    assert abs(float(same)) < 1e-6
    empty = losses.distillation(jnp.asarray(new), jnp.asarray(old), jnp.zeros(5, bool), t)
    assert float(empty) == 0.0


@pytest.fixture(scope="module")
def parts():
    graphdef, params, stats = tiny.tiny_unet()
    forward = step_lib.make_forward(graphdef)
    batch = tiny.batch()
    # A different "previous model": rescaled parameters and shifted running statistics.
    old = jax.tree.map(lambda p: 0.7 * p + 0.05, params)
    old_stats = jax.tree.map(lambda s: s + 0.1, stats)

    @jax.jit
    def reference(p):
        out, new_stats = forward(p, stats, batch["image"], True)
        old_out, _ = forward(old, old_stats, batch["image"], False)
        ce = losses.cross_entropy(out["logits"], batch["label"])
        return out, old_out, ce, new_stats

    return forward, params, stats, batch, snapshot.take(old, old_stats, OLD_MASK), reference


def _step(parts, strategy):
    forward, params, stats, batch, _, _ = parts

    def run(sstate):
        new_state, new_sstate, metrics, _ = tiny.one_step(
            forward, strategy, optax.sgd(LR), params, stats, sstate, batch
        )
        return new_state, new_sstate, float(metrics.compute()["loss"])

    return run


def _env(parts):
    return base.Env(parts[0], 3, 3)


def test_lwf_loss_in_the_step(parts):
    forward, params, stats, batch, snap, reference = parts
    alpha, t = 0.7, 2.0
    cfg = ml_collections.ConfigDict({"lwf_alpha": alpha, "lwf_temperature": t})
    strategy = lwf.make(cfg, _env(parts))
    run = _step(parts, strategy)
    out, old_out, ce, new_stats = reference(params)

    _, _, loss = run(strategy.init(params, stats))  # no snapshot yet: the task loss alone
    np.testing.assert_allclose(loss, float(ce), rtol=1e-5)

    new_state, _, loss = run(snap)
    kd = _np_kd(np.asarray(out["logits"]), np.asarray(old_out["logits"]), OLD_MASK, t)
    assert kd > 1e-3
    np.testing.assert_allclose(loss, float(ce) + alpha * kd, rtol=1e-4)
    # One BatchNorm update (the current model's); the frozen model's targets are constants.
    for a, b in zip(
        jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(new_stats), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    target = old_out["logits"]

    def objective(p):
        out, _ = forward(p, stats, batch["image"], True)
        kd = losses.distillation(out["logits"], target, jnp.asarray(OLD_MASK), t)
        return losses.cross_entropy(out["logits"], batch["label"]) + alpha * kd

    grads = jax.jit(jax.grad(objective))(params)
    for a, p, g in zip(
        jax.tree.leaves(new_state.params),
        jax.tree.leaves(params),
        jax.tree.leaves(grads),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(p - LR * g), rtol=1e-4, atol=1e-6)

    # Chained with an EWC-like parameter penalty: the losses and the gradients add.
    anchor = jax.tree.map(lambda p: p + 0.01, params)

    def toy_penalty(p, sstate):
        sq = jax.tree.map(lambda x, a: jnp.sum((x - a) ** 2), p, sstate)
        return 0.5 * sum(jax.tree.leaves(sq)), {}

    toy = base.Strategy(init=lambda p, s: anchor, penalty=toy_penalty)
    chained_state, _, chained_loss = _step(parts, base.chain(strategy, toy))((snap, anchor))
    n = sum(x.size for x in jax.tree.leaves(params))
    np.testing.assert_allclose(chained_loss, loss + 0.5 * n * 1e-4, rtol=1e-4)
    for a, b in zip(
        jax.tree.leaves(chained_state.params), jax.tree.leaves(new_state.params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b) + LR * 0.01, rtol=1e-4, atol=1e-6)


def test_lfl_loss_and_head_freezing_in_the_step(parts):
    _, params, stats, _, snap, reference = parts
    lam = 0.3
    cfg = ml_collections.ConfigDict({"lfl_lambda": lam, "lfl_freeze_head": True})
    strategy = lfl.make(cfg, _env(parts))
    run = _step(parts, strategy)
    out, old_out, ce, _ = reference(params)

    def moved(a, b):
        return [
            not np.array_equal(x, y)
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        ]

    # Before the first snapshot: the task loss alone, and the head trains.
    first, _, loss = run(strategy.init(params, stats))
    np.testing.assert_allclose(loss, float(ce), rtol=1e-5)
    assert all(moved(first.params["head"], params["head"]))

    new_state, _, loss = run(snap)
    diff = np.asarray(out["features"], np.float64) - np.asarray(old_out["features"], np.float64)
    distance = float(np.mean(np.sum(diff**2, axis=-1)))
    assert distance > 1e-3
    np.testing.assert_allclose(loss, float(ce) + lam * distance, rtol=1e-4)
    # Once active: the head is frozen, everything else still trains.
    assert not any(moved(new_state.params["head"], params["head"]))
    others = {k: v for k, v in params.items() if k != "head"}
    new_others = {k: v for k, v in new_state.params.items() if k != "head"}
    assert all(moved(new_others, others))


def test_lfl_penultimate_layer_distance(parts):
    _, params, _, _, snap, reference = parts
    lam = 0.3
    cfg = ml_collections.ConfigDict(
        {"lfl_lambda": lam, "lfl_freeze_head": False, "lfl_layer": "penultimate"}
    )
    _, _, loss = _step(parts, lfl.make(cfg, _env(parts)))(snap)
    out, old_out, ce, _ = reference(params)
    diff = np.asarray(out["penultimate"], np.float64) - np.asarray(
        old_out["penultimate"], np.float64
    )
    distance = float(np.mean(np.sum(diff**2, axis=-1)))
    assert distance > 1e-3
    np.testing.assert_allclose(loss, float(ce) + lam * distance, rtol=1e-4)
    with pytest.raises(ValueError, match="lfl_layer must be one of"):
        lfl.make(ml_collections.ConfigDict({**cfg, "lfl_layer": "decoder"}), _env(parts))
