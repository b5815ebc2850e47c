"""GEM and A-GEM as strategies: their gradient transforms against independent computations.

The memory gradients are recomputed here one by one with ``jax.grad`` on each memory block
(float64 numpy for the checks); the solver itself is tested against scipy in test_qp.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from clseg_jax import losses
from clseg_jax import step as step_lib
from clseg_jax.memory import buffer
from clseg_jax.solvers import qp
from clseg_jax.strategies import agem, base, gem
from tests import tiny

Q, T, SIZE, K = 2, 4, 16, 3


@pytest.fixture(scope="module")
def model():
    graphdef, params, stats = tiny.tiny_unet()
    return step_lib.make_forward(graphdef), params, stats


def _memory(filled_blocks: int, seed: int = 0) -> buffer.Buffer:
    rng = np.random.default_rng(seed)
    m = Q * (T - 1)
    n = Q * filled_blocks
    valid = np.arange(m) < n
    return buffer.empty(m, (SIZE, SIZE, 3), (SIZE, SIZE))._replace(
        image=jnp.asarray(rng.integers(0, 256, (m, SIZE, SIZE, 3), dtype=np.uint8)),
        label=jnp.asarray(
            np.where(valid[:, None, None], rng.integers(0, K, (m, SIZE, SIZE)), 255).astype(
                np.uint8
            )
        ),
        exp=jnp.asarray(np.where(valid, np.arange(m) // Q, -1), jnp.int32),
        valid=jnp.asarray(valid),
    )


def _env(forward):
    return base.Env(forward, K, T, image_shape=(SIZE, SIZE, 3), label_shape=(SIZE, SIZE))


def _inputs(params, stats):
    return base.LossInputs(params, stats, None, None, None, jnp.ones(K, bool))


def _grad_on(forward, params, stats, image, label) -> np.ndarray:
    """Independent memory gradient: train-mode masked CE on the given rows."""

    def loss(p):
        out, _ = forward(p, stats, image, True)
        return losses.cross_entropy(losses.mask_logits(out["logits"], jnp.ones(K, bool)), label)

    return np.asarray(ravel_pytree(jax.grad(loss)(params))[0], np.float64)


def _cfg(**kw):
    c = ml_collections.ConfigDict({**gem.DEFAULTS, **agem.DEFAULTS})
    c.update(kw)
    return c


@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_gem_projection_meets_every_memory_constraint(model, eps):
    """eps = 0: G g~ >= 0 exactly (KKT); GEM's ridge eps > 0 relaxes it to G g~ >= -eps v."""
    forward, params, stats = model
    mem = _memory(filled_blocks=2)
    G = np.stack(
        [
            _grad_on(
                forward,
                params,
                stats,
                mem.image[k * Q : (k + 1) * Q],
                mem.label[k * Q : (k + 1) * Q],
            )
            for k in range(2)
        ]
    )
    _, unravel = ravel_pytree(params)
    # A gradient that opposes experience 0's memory gradient: the constraint is violated.
    g = -G[0] + 0.1 * G[1]
    assert g @ G[0] < 0
    strategy = gem.make(_cfg(gem_mem_per_exp=Q, gem_eps=eps), _env(forward))
    fn = jax.jit(lambda gr, s: strategy.transform_grads(gr, _inputs(params, stats), s, None))
    out = np.asarray(ravel_pytree(fn(unravel(jnp.asarray(g, jnp.float32)), mem))[0], np.float64)
    if eps == 0:
        norms = np.linalg.norm(out) * np.linalg.norm(G, axis=1)
        assert np.all(G @ out >= -1e-6 * norms), G @ out
    # The same projection from the independently computed G (block 2 is empty: padding).
    G3 = jnp.asarray(np.concatenate([G, np.zeros((1, G.shape[1]))]), jnp.float32)
    ref = qp.gem_project(jnp.asarray(g, jnp.float32), G3, jnp.array([True, True, False]), 0.5, eps)
    np.testing.assert_allclose(out, np.asarray(ref), rtol=1e-4, atol=1e-6 * np.abs(ref).max())


def test_gem_block_skipping_equals_straight_line(model):
    """Accelerators skip empty blocks with lax.cond; CPU computes all and masks: same G."""
    forward, params, stats = model
    mem = _memory(filled_blocks=2)
    filled = jnp.array([True, True, False])
    env, inputs = _env(forward), _inputs(params, stats)
    fn = jax.jit(gem.memory_gradients, static_argnums=(0, 4), static_argnames="skip")
    a = fn(env, inputs, mem, filled, Q, skip=True)
    b = fn(env, inputs, mem, filled, Q, skip=False)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert not np.asarray(a[2]).any()


def test_gem_leaves_gradient_alone_without_violation_or_memory(model):
    forward, params, stats = model
    strategy = gem.make(_cfg(gem_mem_per_exp=Q), _env(forward))
    fn = jax.jit(lambda gr, s: strategy.transform_grads(gr, _inputs(params, stats), s, None))
    mem = _memory(filled_blocks=2)
    g0 = _grad_on(forward, params, stats, mem.image[:Q], mem.label[:Q])
    g1 = _grad_on(forward, params, stats, mem.image[Q : 2 * Q], mem.label[Q : 2 * Q])
    _, unravel = ravel_pytree(params)
    agree = unravel(jnp.asarray(g0 + g1, jnp.float32))  # g . g_k > 0 for both
    assert (g0 + g1) @ g0 > 0 and (g0 + g1) @ g1 > 0
    for m in (mem, _memory(filled_blocks=0)):
        out = fn(agree, m)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(agree), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_agem_matches_its_formula(model):
    forward, params, stats = model
    n = 3
    strategy = agem.make(_cfg(agem_mem_per_exp=Q, agem_sample_size=n), _env(forward))
    mem = _memory(filled_blocks=2, seed=1)
    key = jax.random.PRNGKey(3)
    rows, ok = buffer.sample(mem, key, n)
    assert bool(ok.all())
    g_ref = _grad_on(forward, params, stats, rows["image"], rows["label"])
    _, unravel = ravel_pytree(params)
    fn = jax.jit(lambda gr: strategy.transform_grads(gr, _inputs(params, stats), mem, key))
    for g in (-g_ref + 0.3 * np.roll(g_ref, 1), g_ref):
        out = np.asarray(ravel_pytree(fn(unravel(jnp.asarray(g, jnp.float32))))[0], np.float64)
        dot = g @ g_ref
        want = g - dot / (g_ref @ g_ref) * g_ref if dot < 0 else g
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
        assert out @ g_ref >= -1e-5 * np.linalg.norm(out) * np.linalg.norm(g_ref)


def test_memory_strategies_reject_bad_sizes(model):
    forward, _, _ = model
    with pytest.raises(ValueError, match=r"agem_sample_size must be in 1\.\.6"):
        agem.make(_cfg(agem_mem_per_exp=Q, agem_sample_size=7), _env(forward))
    with pytest.raises(ValueError, match="gem_mem_per_exp must be >= 1"):
        gem.make(_cfg(gem_mem_per_exp=0), _env(forward))
