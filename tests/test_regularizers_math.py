"""EWC, MAS and RWalk against brute force on a tiny segmentation model and on a quadratic.

EWC: the empirical Fisher against a Python loop of ``jax.grad`` per sample (with a padded batch
and a sample budget ending inside a batch), the batch variant against its own loop, separate vs
online state after two phases, and the penalty and its gradient against the written formula.
MAS: the importance against central finite differences in float64, and the running average over
two phases. RWalk: the Fisher moving average, path scores, score averaging, normalisation and
penalty against a numpy unrolling of a few optimisation steps on a quadratic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from clseg_jax import losses
from clseg_jax import step as step_lib
from clseg_jax.strategies import base, ewc, importance, mas, rwalk

MASK = np.array([True, True, False])  # class 2 unseen: its logits are masked


def _phase(images, labels, index: int = 0) -> base.Phase:
    def batches(batch_size):
        for s in range(0, len(images), batch_size):
            yield {"image": images[s : s + batch_size], "label": labels[s : s + batch_size]}

    return base.Phase(index, (index,), (), (0, 1), MASK, batches)


class TinySegmenter(nnx.Module):
    """3x3 conv -> batch norm -> ReLU -> 1x1 conv: compiles in a fraction of a UNet's time, and
    computes in the input's dtype (float64 images give a float64 model)."""

    def __init__(self, num_classes: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Conv(4, num_classes, (1, 1), rngs=rngs)

    def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
        h = jax.nn.relu(self.norm(self.conv(x), use_running_average=not train))
        return {"logits": self.head(h), "features": h}


@pytest.fixture(scope="module")
def tiny():
    model = TinySegmenter(3, rngs=nnx.Rngs(0))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    forward = step_lib.make_forward(graphdef)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, (6, 8, 8)).astype(np.uint8)
    labels[0, :3] = 255  # partly ignored
    labels[4] = 255  # all ignored: a zero gradient, still counted as a sample
    params, stats = params.to_pure_dict(), stats.to_pure_dict()
    # Non-trivial running statistics, so eval mode differs from train mode.
    stats = jax.tree.map(
        lambda s: s + 0.1 * jnp.abs(jnp.asarray(rng.normal(size=s.shape), jnp.float32)), stats
    )

    def ll(p, x, y):
        out, _ = forward(p, stats, x[None], False)
        return -losses.cross_entropy(losses.mask_logits(out["logits"], MASK), y[None])

    def batch_ll(p, xs, ys):  # mean over samples of their mean pixel log-likelihood
        return jnp.mean(jax.vmap(lambda x, y: ll(p, x, y))(xs, ys))

    grad_ll = jax.jit(jax.grad(ll))
    grad_batch_ll = jax.jit(jax.grad(batch_ll))
    return forward, params, stats, images, labels, grad_ll, grad_batch_ll


def _env(forward, num_experiences: int = 3) -> base.Env:
    return base.Env(forward, 3, num_experiences)


def _cfg(defaults: dict, **overrides) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({**defaults, **overrides})


def _mean(trees):
    return jax.tree.map(lambda *xs: sum(np.asarray(x, np.float64) for x in xs) / len(xs), *trees)


def _loop_fisher(grad_ll, params, images, labels):
    pairs = zip(images, labels, strict=True)
    return _mean([jax.tree.map(np.square, grad_ll(params, x, y)) for x, y in pairs])


def _assert_tree_close(actual, expected, rtol=1e-4, atol_frac=1e-5):
    a_leaves, e_leaves = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(a_leaves) == len(e_leaves)
    scale = max(float(np.max(np.abs(e))) for e in e_leaves)
    assert scale > 0  # the comparison must not be vacuous
    for a, e in zip(a_leaves, e_leaves, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol_frac * scale)


def _slot(tree, k):
    return jax.tree.map(lambda x: x[k], tree)


def test_empirical_fisher_matches_a_per_sample_loop_with_padding(tiny):
    forward, params, stats, images, labels, grad_ll, _ = tiny
    expected = _loop_fisher(grad_ll, params, images[:5], labels[:5])
    # 6 samples, budget 5, batch 4: the second batch has 2 rows, 1 over budget and 2 of padding.
    strategy = ewc.make(_cfg(ewc.DEFAULTS, ewc_samples=5, ewc_batch=4), _env(forward))
    sstate = strategy.after_phase(
        params, stats, strategy.init(params, stats), _phase(images, labels)
    )
    _assert_tree_close(_slot(sstate.fisher, 0), expected)
    # The same 5 samples as one unpadded batch.
    batch_fn = importance.make_per_sample_sum(importance.sample_log_likelihood(forward), jnp.square)
    unpadded, n = importance.mean_over_samples(
        batch_fn, params, stats, _phase(images[:5], labels[:5]), 5, 5
    )
    assert n == 5
    _assert_tree_close(_slot(sstate.fisher, 0), unpadded, rtol=1e-5)


def test_batch_fisher_matches_its_loop(tiny):
    forward, params, stats, images, labels, _, grad_batch_ll = tiny
    # Batches of 4 and 2 (+2 padding rows), each weighted by its sample count.
    g1 = jax.tree.map(np.square, grad_batch_ll(params, images[:4], labels[:4]))
    g2 = jax.tree.map(np.square, grad_batch_ll(params, images[4:], labels[4:]))
    expected = jax.tree.map(lambda a, b: (4 * np.asarray(a) + 2 * np.asarray(b)) / 6, g1, g2)
    cfg = _cfg(ewc.DEFAULTS, ewc_fisher="batch", ewc_batch=4, ewc_mode="online", ewc_decay=0.0)
    strategy = ewc.make(cfg, _env(forward))
    sstate = strategy.after_phase(
        params, stats, strategy.init(params, stats), _phase(images, labels)
    )
    _assert_tree_close(sstate.fisher, expected)


def _signature(tree):
    return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


def test_separate_and_online_states_after_two_phases(tiny):
    forward, params, stats, images, labels, grad_ll, _ = tiny
    theta1 = params
    theta2 = jax.tree.map(lambda p: p * 1.1 + 0.01, params)
    phase_a, phase_b = _phase(images[:3], labels[:3], 0), _phase(images[3:], labels[3:], 1)
    f_a = _loop_fisher(grad_ll, theta1, images[:3], labels[:3])
    f_b = _loop_fisher(grad_ll, theta2, images[3:], labels[3:])

    sep = ewc.make(_cfg(ewc.DEFAULTS, ewc_batch=4), _env(forward, 3))
    s0 = sep.init(params, stats)
    s = sep.after_phase(theta2, stats, sep.after_phase(theta1, stats, s0, phase_a), phase_b)
    assert _signature(s) == _signature(s0)
    np.testing.assert_array_equal(np.asarray(s.valid), [1.0, 1.0, 0.0])
    _assert_tree_close(_slot(s.fisher, 0), f_a)
    _assert_tree_close(_slot(s.fisher, 1), f_b)
    assert all(not np.any(np.asarray(x[2])) for x in jax.tree.leaves(s.fisher))
    _assert_tree_close(_slot(s.anchor, 0), theta1, rtol=0, atol_frac=0)
    _assert_tree_close(_slot(s.anchor, 1), theta2, rtol=0, atol_frac=0)
    _assert_tree_close(s.weight, jax.tree.map(np.add, f_a, f_b))

    gamma = 0.5
    onl = ewc.make(_cfg(ewc.DEFAULTS, ewc_mode="online", ewc_decay=gamma), _env(forward, 3))
    o0 = onl.init(params, stats)
    o = onl.after_phase(theta2, stats, onl.after_phase(theta1, stats, o0, phase_a), phase_b)
    assert _signature(o) == _signature(o0)
    _assert_tree_close(o.fisher, jax.tree.map(lambda a, b: gamma * a + b, f_a, f_b))
    _assert_tree_close(o.anchor, theta2, rtol=0, atol_frac=0)


def test_ewc_penalty_and_its_gradient_match_the_formula():
    rng = np.random.default_rng(3)
    shapes = {"a": (3, 4), "b": {"c": (5,)}}
    tree = lambda f: jax.tree.map(f, shapes, is_leaf=lambda x: isinstance(x, tuple))
    fisher = tree(lambda s: jnp.asarray(rng.uniform(0, 2, (3, *s)), jnp.float32))
    anchor = tree(lambda s: jnp.asarray(rng.normal(size=(3, *s)), jnp.float32))
    theta = tree(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32))
    valid = jnp.array([1.0, 0.0, 1.0])
    lam = 0.7

    def formula(p):
        total = 0.0
        for k in range(3):
            for f, a, x in zip(*(jax.tree.leaves(t) for t in (fisher, anchor, p)), strict=True):
                total += valid[k] * jnp.sum(f[k] * (x - a[k]) ** 2)
        return lam * total

    strategy = ewc.make(_cfg(ewc.DEFAULTS, ewc_lambda=lam), _env(None))
    sstate = ewc.consolidate(fisher, anchor, valid)
    value, metrics = strategy.penalty(theta, sstate)
    np.testing.assert_allclose(float(value), float(formula(theta)), rtol=1e-5)
    assert float(metrics["ewc_penalty"]) == float(value)
    grads = jax.grad(lambda p: strategy.penalty(p, sstate)[0])(theta)
    _assert_tree_close(grads, jax.grad(formula)(theta), rtol=1e-5)

    online = ewc.make(_cfg(ewc.DEFAULTS, ewc_lambda=lam, ewc_mode="online"), _env(None))
    f0, a0 = _slot(fisher, 0), _slot(anchor, 0)
    value, _ = online.penalty(theta, ewc.OnlineState(f0, a0))
    expected = lam * sum(
        jnp.sum(f * (x - a) ** 2)
        for f, a, x in zip(*(jax.tree.leaves(t) for t in (f0, a0, theta)), strict=True)
    )
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-5)


def test_ewc_rejects_unknown_modes():
    with pytest.raises(ValueError, match="valid: \\['separate', 'online'\\]"):
        ewc.make(_cfg(ewc.DEFAULTS, ewc_mode="offline"), _env(None))
    with pytest.raises(ValueError, match="valid: \\['empirical', 'batch'\\]"):
        ewc.make(_cfg(ewc.DEFAULTS, ewc_fisher="true"), _env(None))


def test_mas_importance_matches_finite_differences(tiny):
    forward, params, stats, images, labels, _, _ = tiny
    with jax.enable_x64(True):
        p64, s64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), (params, stats))
        # Float images are taken as they are, so the whole model runs in float64.
        x64 = images.astype(np.float64) / 127.5 - 1.0
        # 3 samples, batch 2: one padded row.
        strategy = mas.make(_cfg(mas.DEFAULTS, mas_samples=3, mas_batch=2), _env(forward))
        sstate = strategy.after_phase(p64, s64, strategy.init(p64, s64), _phase(x64, labels))
        omega, _ = ravel_pytree(sstate.omega)
        omega = np.asarray(omega)
        flat, unravel = ravel_pytree(p64)
        assert flat.dtype == jnp.float64

        @jax.jit
        def sq_norm(v, x):
            out, _ = forward(unravel(v), s64, x[None], False)
            z = jnp.where(MASK, out["logits"], 0.0)
            return jnp.mean(jnp.sum(z**2, axis=-1))

        rng = np.random.default_rng(1)
        # Mostly coordinates with some importance, plus the masked class's head (importance 0).
        idx = np.concatenate(
            [
                rng.choice(np.flatnonzero(omega > 0), 6, replace=False),
                np.flatnonzero(omega == 0)[:2],
            ]
        )
        h = 1e-6
        fd = []
        for j in idx:
            e = jnp.zeros_like(flat).at[j].set(h)
            per_sample = [(sq_norm(flat + e, x) - sq_norm(flat - e, x)) / (2 * h) for x in x64[:3]]
            fd.append(np.mean(np.abs(np.asarray(per_sample))))
        fd = np.asarray(fd)
        assert fd.max() > 0
        np.testing.assert_allclose(omega[idx], fd, rtol=1e-6, atol=1e-9 * fd.max())


def test_mas_running_average_over_two_phases(tiny):
    forward, params, stats, images, _, _, _ = tiny

    def sq_norm(p, x):
        out, _ = forward(p, stats, x[None], False)
        return jnp.mean(jnp.sum(jnp.where(MASK, out["logits"], 0.0) ** 2, axis=-1))

    grad = jax.jit(jax.grad(sq_norm))
    loop = lambda p, xs: _mean([jax.tree.map(np.abs, grad(p, x)) for x in xs])
    theta2 = jax.tree.map(lambda p: p * 0.9 - 0.01, params)
    omega_a, omega_b = loop(params, images[:3]), loop(theta2, images[3:])
    strategy = mas.make(_cfg(mas.DEFAULTS, mas_batch=2), _env(forward))
    s = strategy.init(params, stats)
    dummy = np.zeros((3, 8, 8), np.uint8)
    s = strategy.after_phase(params, stats, s, _phase(images[:3], dummy, 0))
    _assert_tree_close(s.omega, omega_a)
    s = strategy.after_phase(theta2, stats, s, _phase(images[3:], dummy, 1))
    _assert_tree_close(s.omega, jax.tree.map(lambda a, b: (a + b) / 2, omega_a, omega_b))
    _assert_tree_close(s.anchor, theta2, rtol=0, atol_frac=0)
    assert float(s.count) == 2.0
    value, _ = strategy.penalty(params, s)
    expected = sum(
        np.sum(o * (np.asarray(p, np.float64) - np.asarray(a, np.float64)) ** 2)
        for o, p, a in zip(*(jax.tree.leaves(t) for t in (s.omega, params, s.anchor)), strict=True)
    )
    np.testing.assert_allclose(float(value), mas.DEFAULTS["mas_lambda"] * expected, rtol=1e-5)


def test_rwalk_scores_and_fisher_on_a_quadratic():
    alpha, eps, lam, lr = 0.8, 1e-8, 0.5, 0.1
    a = {"w": np.array([1.0, 3.0, 0.2]), "b": np.array([[2.0, 0.5]])}
    theta = {"w": np.array([1.0, -2.0, 0.5], np.float32), "b": np.array([[0.3, -0.1]], np.float32)}
    cfg = _cfg(rwalk.DEFAULTS, rwalk_alpha=alpha, rwalk_eps=eps, rwalk_lambda=lam)
    strategy = rwalk.make(cfg, _env(None))
    assert base.needs_task_grads(strategy)
    sstate = strategy.init(jax.tree.map(jnp.asarray, theta), {})
    on_step = jax.jit(strategy.on_step)
    fisher, path = None, None
    f64 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)

    def run(theta, steps, uphill):
        nonlocal fisher, path, sstate
        for _ in range(steps):
            g = jax.tree.map(lambda ai, x: (ai * x).astype(np.float32), a, theta)
            # "uphill" moves b along +g: the loss rises there, so its path scores are negative.
            move = {"w": -lr * g["w"], "b": (0.05 if uphill else -lr) * g["b"]}
            new = jax.tree.map(lambda x, m: (x + m).astype(np.float32), theta, move)
            g64, d64 = f64(g), jax.tree.map(lambda n, o: f64(n) - f64(o), new, theta)
            if fisher is None:  # the EMA starts from the first squared gradient
                fisher = jax.tree.map(np.square, g64)
            else:
                fisher = jax.tree.map(lambda gi, f: alpha * gi**2 + (1 - alpha) * f, g64, fisher)
            path = jax.tree.map(
                lambda p, gi, d, f: p - gi * d / (0.5 * f * d**2 + eps),
                path if path is not None else jax.tree.map(np.zeros_like, g64),
                g64,
                d64,
                fisher,
            )
            sstate = on_step(sstate, g, theta, new)
            theta = new
        return theta

    def normalised(t):
        top = max(np.max(x) for x in jax.tree.leaves(t))
        return jax.tree.map(lambda x: x / top, t)

    theta = run(theta, 3, uphill=False)
    _assert_tree_close(sstate.fisher, fisher, rtol=1e-5)
    _assert_tree_close(sstate.path, path, rtol=1e-5)
    sstate = strategy.after_phase(theta, {}, sstate, None)
    score = path
    relu = lambda t: jax.tree.map(lambda x: np.maximum(x, 0.0), t)
    weight = jax.tree.map(np.add, normalised(fisher), normalised(relu(score)))
    _assert_tree_close(sstate.weight, weight, rtol=1e-5)
    _assert_tree_close(sstate.anchor, theta, rtol=0, atol_frac=0)
    assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(sstate.path))

    anchor, path = theta, None
    theta = run(theta, 2, uphill=True)
    _assert_tree_close(sstate.fisher, fisher, rtol=1e-5)  # the EMA runs on across phases
    sstate = strategy.after_phase(theta, {}, sstate, None)
    score = jax.tree.map(lambda old, new: (old + new) / 2, score, path)
    assert np.any(score["b"] < 0) and np.any(score["w"] > 0)  # the relu below matters
    _assert_tree_close(sstate.score, score, rtol=1e-5)
    weight = jax.tree.map(np.add, normalised(fisher), normalised(relu(score)))
    _assert_tree_close(sstate.weight, weight, rtol=1e-5)
    assert float(sstate.phases) == 2.0

    probe = jax.tree.map(lambda x: jnp.asarray(x + 0.25), anchor)
    value, _ = strategy.penalty(probe, sstate)
    expected = lam * sum(
        np.sum(w * (np.asarray(p, np.float64) - np.asarray(t, np.float64)) ** 2)
        for w, p, t in zip(*(jax.tree.leaves(x) for x in (weight, probe, theta)), strict=True)
    )
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
