"""ILT against numpy written from the equations: output distillation over the old classes
(averaged over them), feature distillation (mean squared error), and both inside the real
compiled step (the task loss alone before a snapshot, CE + weighted terms after it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from clseg_jax import losses, tasks
from clseg_jax import step as step_lib
from clseg_jax.strategies import base, ilt, snapshot
from tests import tiny


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_output_kd(new, old, old_classes):
    """mean_pixels (1/|old|) sum_{c in old} q(c) (log q(c) - log p(c)), both softmaxes over old."""
    lq = _log_softmax(np.asarray(old)[..., old_classes])
    lp = _log_softmax(np.asarray(new)[..., old_classes])
    return float(np.mean(np.sum(np.exp(lq) * (lq - lp), -1)) / len(old_classes))


def test_output_distillation_matches_numpy():
    rng = np.random.default_rng(0)
    new, old = rng.normal(size=(2, 2, 3, 4, 5)) * 2
    old_classes = [0, 1, 3]
    mask = np.zeros(5, bool)
    mask[old_classes] = True
    new_j, old_j, mask_j = jnp.asarray(new, jnp.float32), jnp.asarray(old), jnp.asarray(mask)
    value = float(ilt.output_distillation(new_j, old_j, mask_j))
    np.testing.assert_allclose(value, _np_output_kd(new, old, old_classes), rtol=1e-5)
    assert value > 1e-3

    # MiB's form, -mean_pixels mean_{c in old} q(c) log p(c), has the same gradient.
    def mib_form(z):
        logp = jax.nn.log_softmax(z[..., jnp.asarray(old_classes)], axis=-1)
        q = jax.nn.softmax(old_j[..., jnp.asarray(old_classes)], axis=-1)
        return -jnp.mean(jnp.mean(q * logp, axis=-1))

    grad = jax.grad(ilt.output_distillation)(new_j, old_j, mask_j)
    np.testing.assert_allclose(grad, jax.grad(mib_form)(new_j), rtol=1e-4, atol=1e-9)
    assert float(ilt.output_distillation(new_j, old_j, jnp.zeros(5, bool))) == 0.0


def test_feature_distillation_matches_numpy():
    rng = np.random.default_rng(1)
    new, old = rng.normal(size=(2, 2, 3, 3, 4))
    value = float(ilt.feature_distillation(jnp.asarray(new), jnp.asarray(old)))
    diff = (new - old).ravel()
    np.testing.assert_allclose(value, float(diff @ diff) / diff.size, rtol=1e-5)


def test_ilt_loss_in_the_step():
    graphdef, params, stats = tiny.tiny_unet()
    forward = step_lib.make_forward(graphdef)
    batch = tiny.batch()
    old = jax.tree.map(lambda p: 0.7 * p + 0.05, params)
    old_stats = jax.tree.map(lambda s: s + 0.1, stats)
    out, _ = jax.jit(lambda p: forward(p, stats, batch["image"], True))(params)
    old_out, _ = jax.jit(lambda p: forward(p, old_stats, batch["image"], False))(old)
    ce = float(losses.cross_entropy(out["logits"], batch["label"]))

    kd_w, de_w = 3.0, 5.0
    cfg = ml_collections.ConfigDict({"ilt_kd": kd_w, "ilt_de": de_w})
    strategy = ilt.make(cfg, base.Env(forward, 3, 2))

    def loss_of(sstate):
        _, _, metrics, _ = tiny.one_step(
            forward, strategy, optax.sgd(0.0), params, stats, sstate, batch
        )
        return float(metrics.compute()["loss"])

    np.testing.assert_allclose(loss_of(strategy.init(params, stats)), ce, rtol=1e-5)

    old_classes = [0, 1]
    snap = snapshot.take(old, old_stats, np.array([True, True, False]))
    kd = _np_output_kd(np.asarray(out["logits"]), np.asarray(old_out["logits"]), old_classes)
    diff = np.asarray(out["features"], np.float64) - np.asarray(old_out["features"], np.float64)
    de = float(np.mean(diff**2))
    assert kd > 1e-4 and de > 1e-4
    np.testing.assert_allclose(loss_of(snap), ce + kd_w * kd + de_w * de, rtol=1e-4)

    with pytest.raises(ValueError, match="multilabel"):
        ilt.make(cfg, base.Env(forward, 3, 2, task=tasks.MULTILABEL))
