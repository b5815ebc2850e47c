"""MiB against numpy written from the paper's equations: unbiased cross-entropy (ignored
pixels, new-class pixels, background pixels with old classes), unbiased distillation, the
background-based classifier initialisation, the loss inside the real compiled step (plain CE in
the first phase, CE + KD after a snapshot), and one compilation across phases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from clseg_jax import compiles as compiles_lib
from clseg_jax import losses
from clseg_jax import step as step_lib
from clseg_jax.strategies import base, mib, snapshot
from tests import tiny


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_unbiased_ce(logits, labels, seen, old, mean_over="valid"):
    """Per pixel: softmax over ``seen``; label 0 scores p(0) + sum of p(old); others p(label)."""
    group = sorted({0} | set(old))
    p = np.zeros(logits.shape, np.float64)
    p[..., seen] = _softmax(logits[..., seen])
    total, count = 0.0, 0
    for idx in np.ndindex(labels.shape):
        y = int(labels[idx])
        if y == 255:
            continue
        count += 1
        prob = p[idx][group].sum() if y == 0 else p[idx][y]
        total -= np.log(prob)
    return total / (count if mean_over == "valid" else labels.size)


def _np_unbiased_kd(new, old_logits, seen, old, alpha=1.0):
    """-(1/|old|) mean_pixels [q(0) log(p(0) + sum_{new} p) + sum_{c in old, c>0} q(c) log p(c)]."""
    fresh = [c for c in seen if c not in old]
    p = np.zeros(new.shape, np.float64)
    p[..., seen] = _softmax(new[..., seen])
    q = _softmax(alpha * np.asarray(old_logits, np.float64)[..., old])  # order of ``old``
    per = np.zeros(new.shape[:-1])
    for j, c in enumerate(old):
        logp = np.log(p[..., 0] + p[..., fresh].sum(-1)) if c == 0 else np.log(p[..., c])
        per += q[..., j] * logp
    return -per.mean() / len(old)


def _mask(classes, k):
    m = np.zeros(k, bool)
    m[list(classes)] = True
    return m


K = 6
SEEN, OLD = [0, 1, 2, 3, 4], [0, 1, 2]  # new = 3, 4; class 5 not seen yet


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 5, K)) * 2
    old_logits = rng.normal(size=(2, 4, 5, K)) * 2
    labels = rng.choice([0, 0, 0, 1, 3, 4, 255], size=(2, 4, 5))
    return logits, old_logits, labels


@pytest.mark.parametrize("mean_over", ["valid", "all"])
def test_unbiased_cross_entropy_matches_numpy(data, mean_over):
    logits, _, labels = data
    masked = losses.mask_logits(jnp.asarray(logits, jnp.float32), jnp.asarray(_mask(SEEN, K)))
    old = jnp.asarray(_mask(OLD, K))
    value = float(losses.unbiased_cross_entropy(masked, jnp.asarray(labels), old, mean_over))
    want = _np_unbiased_ce(logits, labels, SEEN, OLD, mean_over)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    # The background pixels really are scored differently from the plain cross-entropy.
    if mean_over == "valid":
        plain = float(losses.cross_entropy(masked, jnp.asarray(labels)))
        assert plain - value > 0.05
    grad = jax.grad(losses.unbiased_cross_entropy)(masked, jnp.asarray(labels), old, mean_over)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[..., 5] == 0)
    # Ignored pixels play no part; an all-ignored batch gives 0, not NaN.
    moved = np.where(labels[..., None] == 255, logits * 7 + 3, logits)
    moved = losses.mask_logits(jnp.asarray(moved, jnp.float32), jnp.asarray(_mask(SEEN, K)))
    again = losses.unbiased_cross_entropy(moved, jnp.asarray(labels), old, mean_over)
    np.testing.assert_allclose(float(again), value, rtol=1e-6)
    ignored = jnp.full(labels.shape, 255)
    assert float(losses.unbiased_cross_entropy(masked, ignored, old, mean_over)) == 0.0
    with pytest.raises(ValueError, match="mean_over"):
        losses.unbiased_cross_entropy(masked, jnp.asarray(labels), old, "sum")


def test_unbiased_cross_entropy_without_old_classes_is_plain(data):
    logits, _, labels = data
    masked = losses.mask_logits(jnp.asarray(logits, jnp.float32), jnp.asarray(_mask(SEEN, K)))
    value = losses.unbiased_cross_entropy(masked, jnp.asarray(labels), jnp.zeros(K, bool))
    np.testing.assert_allclose(
        float(value), float(losses.cross_entropy(masked, jnp.asarray(labels))), rtol=1e-6
    )
    np.testing.assert_allclose(float(value), _np_unbiased_ce(logits, labels, SEEN, []), rtol=1e-5)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_unbiased_distillation_matches_numpy(data, alpha):
    logits, old_logits, _ = data
    seen, old = jnp.asarray(_mask(SEEN, K)), jnp.asarray(_mask(OLD, K))
    masked = losses.mask_logits(jnp.asarray(logits, jnp.float32), seen)
    value = float(losses.unbiased_distillation(masked, jnp.asarray(old_logits), old, seen, alpha))
    np.testing.assert_allclose(
        value, _np_unbiased_kd(logits, old_logits, SEEN, OLD, alpha), rtol=1e-5
    )
    # Only the old model's old-class logits and the current model's seen ones matter.
    old2 = old_logits.copy()
    old2[..., 3:] = 100.0
    new2 = np.asarray(masked).copy()
    new2[..., 5] = 50.0
    again = losses.unbiased_distillation(jnp.asarray(new2), jnp.asarray(old2), old, seen, alpha)
    np.testing.assert_allclose(float(again), value, rtol=1e-6)
    grad = jax.grad(losses.unbiased_distillation)(masked, jnp.asarray(old_logits), old, seen, alpha)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[..., 5] == 0)
    empty = losses.unbiased_distillation(masked, jnp.asarray(old_logits), jnp.zeros(K, bool), seen)
    assert float(empty) == 0.0


def _phase(index, new, seen, k):
    return base.Phase(index, (index,), tuple(new), tuple(seen), _mask(seen, k), lambda b: iter(()))


def test_init_classifier_before_phase():
    k, c = 5, 3
    rng = np.random.default_rng(1)
    head = {
        "kernel": rng.normal(size=(1, 1, c, k)).astype(np.float32),
        "bias": rng.normal(size=k).astype(np.float32),
    }
    params = {"head": jax.tree.map(jnp.asarray, head), "body": {"w": jnp.ones(2)}}
    env = base.Env(None, k, 3)
    strategy = mib.make(ml_collections.ConfigDict(mib.DEFAULTS), env)
    state = strategy.init(params, {})

    # First phase: nothing old, the head is left alone; masks say what is new.
    p0, s0 = strategy.before_phase(params, {}, state, _phase(0, [0, 1, 2], [0, 1, 2], k))
    np.testing.assert_array_equal(p0["head"]["bias"], head["bias"])
    np.testing.assert_array_equal(s0.new, [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(s0.old, [0, 0, 0, 0, 0])

    p1, s1 = strategy.before_phase(params, {}, s0, _phase(1, [3, 4], range(5), k))
    np.testing.assert_array_equal(s1.old, [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(s1.new, [0, 0, 0, 1, 1])
    shared = head["bias"][0] - np.log(3.0)  # two new classes: log(N + 1)
    want_bias = head["bias"].copy()
    want_bias[[0, 3, 4]] = shared
    want_kernel = head["kernel"].copy()
    want_kernel[..., 3] = want_kernel[..., 4] = head["kernel"][..., 0]
    np.testing.assert_allclose(p1["head"]["bias"], want_bias, rtol=1e-6)
    np.testing.assert_allclose(p1["head"]["kernel"], want_kernel, rtol=1e-6)
    np.testing.assert_array_equal(p1["body"]["w"], params["body"]["w"])
    # Why: background-or-new now has exactly the old background probability.
    x = rng.normal(size=(7, c))
    old_z = x @ head["kernel"][0, 0] + head["bias"]
    new_z = x @ np.asarray(p1["head"]["kernel"][0, 0]) + np.asarray(p1["head"]["bias"])
    p_old, p_new = _softmax(old_z[:, :3]), _softmax(new_z)
    np.testing.assert_allclose(p_new[:, [0, 3, 4]].sum(-1), p_old[:, 0], rtol=1e-6)
    np.testing.assert_allclose(p_new[:, 1:3], p_old[:, 1:3], rtol=1e-6)

    off = mib.make(ml_collections.ConfigDict({**mib.DEFAULTS, "mib_init": False}), env)
    p2, _ = off.before_phase(params, {}, s0, _phase(1, [3, 4], range(5), k))
    np.testing.assert_array_equal(p2["head"]["bias"], head["bias"])
    with pytest.raises(ValueError, match="mib_ce_pixels"):
        mib.make(ml_collections.ConfigDict({**mib.DEFAULTS, "mib_ce_pixels": "x"}), env)


@pytest.fixture(scope="module")
def parts():
    graphdef, params, stats = tiny.tiny_unet()
    forward = step_lib.make_forward(graphdef)
    batch = tiny.batch()  # labels 0..2
    old = jax.tree.map(lambda p: 0.7 * p + 0.05, params)
    old_stats = jax.tree.map(lambda s: s + 0.1, stats)

    @jax.jit
    def reference(p):
        out, _ = forward(p, stats, batch["image"], True)
        old_out, _ = forward(old, old_stats, batch["image"], False)
        return out["logits"], old_out["logits"]

    return forward, params, stats, batch, (old, old_stats), reference


def test_mib_loss_in_the_step(parts):
    forward, params, stats, batch, (old, old_stats), reference = parts
    kd_weight = 3.0
    cfg = ml_collections.ConfigDict({**mib.DEFAULTS, "mib_kd": kd_weight})
    strategy = mib.make(cfg, base.Env(forward, 3, 2))
    logits, old_logits = (np.asarray(x) for x in reference(params))
    labels = np.asarray(batch["label"])
    tx = optax.sgd(0.0)

    def loss_of(sstate):
        _, _, metrics, _ = tiny.one_step(forward, strategy, tx, params, stats, sstate, batch)
        return float(metrics.compute()["loss"])

    # First phase: exactly the plain cross-entropy.
    s0 = strategy.before_phase(
        params, stats, strategy.init(params, stats), _phase(0, [0, 1], [0, 1], 3)
    )[1]
    ce = float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
    np.testing.assert_allclose(loss_of(s0), ce, rtol=1e-5)

    # Second phase (class 2 new), after a snapshot of a different "previous model".
    s1 = s0._replace(snap=snapshot.take(old, old_stats, _mask([0, 1], 3)))
    _, s1 = strategy.before_phase(params, stats, s1, _phase(1, [2], [0, 1, 2], 3))
    uce = _np_unbiased_ce(logits, labels, [0, 1, 2], [0, 1])
    ukd = _np_unbiased_kd(logits, old_logits, [0, 1, 2], [0, 1])
    assert abs(uce - ce) > 1e-3 and ukd > 1e-3
    np.testing.assert_allclose(loss_of(s1), uce + kd_weight * ukd, rtol=1e-4)

    # A phase with no new class (domain-incremental): nothing is folded into the background.
    s2 = s1._replace(snap=snapshot.take(old, old_stats, _mask([0, 1, 2], 3)))
    _, s2 = strategy.before_phase(params, stats, s2, _phase(2, [], [0, 1, 2], 3))
    kd_all = _np_unbiased_kd(logits, old_logits, [0, 1, 2], [0, 1, 2])
    np.testing.assert_allclose(loss_of(s2), ce + kd_weight * kd_all, rtol=1e-4)


def test_mib_compiles_once_across_phases(parts):
    forward, params, stats, batch, _, _ = parts
    strategy = mib.make(ml_collections.ConfigDict(mib.DEFAULTS), base.Env(forward, 3, 3))

    @jax.jit
    def loss(p, sstate, class_mask):
        out, _ = forward(p, stats, batch["image"], True)
        out = {**out, "logits": losses.mask_logits(out["logits"], class_mask)}
        inputs = base.LossInputs(p, stats, batch, out, jnp.zeros(()), class_mask)
        return strategy.loss(inputs, sstate, jax.random.PRNGKey(0))[0]

    # Hook results are put back on the device like the trainer does (placement, not shapes).
    place = lambda tree: jax.device_put(tree, jax.devices()[0])
    params, state = place((params, strategy.init(params, stats)))
    schedule = [([0, 1], [0, 1]), ([2], [0, 1, 2]), ([], [0, 1, 2])]
    values, signatures, compiles = [], [], 0
    for i, (new, seen) in enumerate(schedule):
        phase = _phase(i, new, seen, 3)
        params, state = place(strategy.before_phase(params, stats, state, phase))
        signatures.append(tiny.signature((params, state)))
        with compiles_lib.Counter() as counter:
            values.append(float(loss(params, state, jnp.asarray(phase.class_mask))))
        compiles += counter.count
        state = place(strategy.after_phase(params, stats, state, phase))
    assert compiles == 1
    assert signatures[0] == signatures[1] == signatures[2]
    assert all(np.isfinite(values)) and values[1] != values[0]
