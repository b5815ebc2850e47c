"""GEM / A-GEM's small QP (clseg_jax.solvers.qp) against float64 SciPy NNLS oracles.

The non-negative QP min_{u>=0} 1/2 u^T P u + c^T u with P = G G^T + eps I and c = G g + margin P 1
is NNLS on the stacked matrix [G^T; sqrt(eps) I] with right-hand side [-(g + margin G^T 1);
-sqrt(eps) margin 1] (expand the squares: the cross terms give G g + margin (G G^T + eps I) 1).
All instances are solved in one jitted vmap per shape, so the file compiles a handful of programs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg as sla
from scipy import optimize

from clseg_jax.solvers import qp

T = 20  # padded number of memory rows
N = 500  # padded gradient length
SETTINGS = ((0.0, 0.0), (0.5, 1e-3), (0.0, 1e-3), (0.5, 0.0))  # (margin, eps)

_solve = jax.jit(jax.vmap(qp.solve_nonneg_qp))
_gem = jax.jit(jax.vmap(qp.gem_project, in_axes=(0, 0, 0, None, None)), static_argnums=(3, 4))


def _memory(rng, kind, t, n, cond):
    """[t, n] memory gradients: iid, correlated (shared component + small noise) or with singular
    values spread log-uniformly over `cond` (so P = G G^T has condition number cond**2)."""
    if kind == "iid":
        return rng.standard_normal((t, n))
    if kind == "correlated":
        return rng.standard_normal(n)[None] + 0.05 * rng.standard_normal((t, n))
    U, _ = np.linalg.qr(rng.standard_normal((t, t)))
    V, _ = np.linalg.qr(rng.standard_normal((n, t)))
    return (U * np.logspace(0, -np.log10(cond), t)) @ V.T


def _instances(seed, count):
    """`count` random GEM instances, float32-representable: list of (G, g, margin, eps, cond_P)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        kind = ("iid", "correlated", "conditioned")[i % 3]
        margin, eps = SETTINGS[(i // 3) % 4]
        t, n = int(rng.integers(1, T + 1)), int(rng.integers(50, N + 1))
        # cond(G) up to 1e3 (cond(P) up to 1e6) without the ridge; with it, cond(G) up to 1e6.
        cond_g = 10 ** rng.uniform(1, 6 if eps else 3)
        G = _memory(rng, kind, t, n, cond_g).astype(np.float32).astype(np.float64)
        g = (rng.standard_normal(n) * rng.uniform(0.1, 3)).astype(np.float32).astype(np.float64)
        out.append((G, g, margin, eps, np.linalg.cond(G @ G.T + eps * np.eye(t))))
    return out


def _qp_data(G, g, margin, eps):
    P = G @ G.T + eps * np.eye(G.shape[0])
    return P, G @ g + margin * P.sum(1)


def _objective(P, c, u):
    return 0.5 * u @ P @ u + c @ u


def _nnls_gem(G, g, margin, eps):
    """Oracle for the GEM problem itself: NNLS on [G^T; sqrt(eps) I] (float64)."""
    t = G.shape[0]
    A = np.vstack([G.T, np.sqrt(eps) * np.eye(t)])
    b = np.concatenate([-(g + margin * G.sum(0)), -np.sqrt(eps) * margin * np.ones(t)])
    return optimize.nnls(A, b, maxiter=100 * t)[0]


def _nnls_qp(P, c):
    """Oracle for a given PD (P, c): with P = R^T R, 1/2 u^T P u + c^T u = 1/2 ||R u + R^-T c||^2
    + const, so NNLS on (R, -R^-T c) (float64)."""
    R = sla.cholesky(P)
    return optimize.nnls(R, -sla.solve_triangular(R, c, trans="T"), maxiter=100 * len(c))[0]


def _pad(P, c, t_pad=T):
    t = len(c)
    Pp, cp = np.zeros((t_pad, t_pad)), np.zeros(t_pad)
    Pp[:t, :t], cp[:t] = P, c
    return Pp, cp, np.arange(t_pad) < t


def _gap(P, c, u, u_ref):
    f, f_ref = _objective(P, c, u), _objective(P, c, u_ref)
    return (f - f_ref) / max(abs(f_ref), 1e-30)


@pytest.fixture(scope="module")
def solved():
    """360 instances solved in one vmapped call, with both float64 oracles."""
    rows = []
    for G, g, margin, eps, cond in _instances(0, 360):
        P, c = _qp_data(G, g, margin, eps)
        P32, c32 = P.astype(np.float32), c.astype(np.float32)
        rows.append((P, c, P32.astype(np.float64), c32.astype(np.float64), G, g, margin, eps, cond))
    Ps, cs, valid = zip(*(_pad(r[2], r[3]) for r in rows), strict=True)
    U = _solve(
        jnp.asarray(np.stack(Ps), jnp.float32),
        jnp.asarray(np.stack(cs), jnp.float32),
        jnp.asarray(np.stack(valid)),
    )
    return rows, np.asarray(U, np.float64)


def test_solver_matches_nnls_oracle(solved):
    rows, U = solved
    gaps_given, gaps_gem = [], []
    for (P, c, P32, c32, G, g, margin, eps, cond), u in zip(rows, U, strict=True):
        t = len(c)
        assert np.all(u >= 0) and np.all(u[t:] == 0)
        u = u[:t]
        # Solver error proper: the float32 (P, c) it was given, solved exactly in float64.
        gaps_given.append(_gap(P32, c32, u, _nnls_qp(P32, c32)))
        # The GEM problem itself (includes rounding G G^T to float32, ~cond(P) * 6e-8).
        gaps_gem.append((_gap(P, c, u, _nnls_gem(G, g, margin, eps)), cond))
    gaps_given = np.array(gaps_given)
    assert gaps_given.max() <= 1e-5, gaps_given.max()
    gem = np.array(gaps_gem)
    well = gem[:, 1] <= 1e5
    assert gem[well, 0].max() <= 1e-5, gem[well, 0].max()
    assert gem[:, 0].max() <= 1e-4, gem[:, 0].max()
    assert gem[:, 1].max() > 5e5  # the sweep did reach cond(P) ~ 1e6
    print(f"worst gap: given problem {gaps_given.max():.2e}, GEM problem {gem[:, 0].max():.2e}")


def test_padding_is_ignored():
    """Padding anywhere in the [T] slots, filled with junk, gives the unpadded [t] solution."""
    rng = np.random.default_rng(1)
    t, batch = 7, 16
    insts = [(G, g, m, e) for G, g, m, e, _ in _instances(2, 400) if G.shape[0] == t][:batch]
    assert len(insts) == batch
    P, c = map(np.stack, zip(*(_qp_data(*x) for x in insts), strict=True))
    u_small = np.asarray(
        _solve(
            jnp.asarray(P, jnp.float32), jnp.asarray(c, jnp.float32), jnp.ones((batch, t), bool)
        ),
        np.float64,
    )
    Pp = rng.standard_normal((batch, T, T)) * 1e3  # junk, even non-PSD, in the padding
    cp = rng.standard_normal((batch, T)) * 1e3
    valid = np.zeros((batch, T), bool)
    for b in range(batch):
        idx = np.sort(rng.choice(T, t, replace=False))
        Pp[b][np.ix_(idx, idx)], cp[b, idx], valid[b, idx] = P[b], c[b], True
    u_pad = np.asarray(
        _solve(jnp.asarray(Pp, jnp.float32), jnp.asarray(cp, jnp.float32), jnp.asarray(valid)),
        np.float64,
    )
    assert np.all(u_pad[~valid] == 0)
    for b in range(batch):
        u_ref = _nnls_qp(P[b], c[b])
        assert _gap(P[b], c[b], u_pad[b][valid[b]], u_ref) <= 1e-5
        np.testing.assert_allclose(u_pad[b][valid[b]], u_small[b], rtol=1e-4, atol=1e-5)


def _gem_batch(seed, count, t_max=T, n=200):
    """[count] GEM instances padded to [T, n] (n fixed so they stack), all with a violation."""
    rng = np.random.default_rng(seed)
    Gs, gs, valid = np.zeros((count, T, n)), np.zeros((count, n)), np.zeros((count, T), bool)
    for b in range(count):
        t = int(rng.integers(1, t_max + 1))
        G = _memory(rng, ("iid", "correlated")[b % 2], t, n, 1.0)
        g = rng.standard_normal(n)
        g = g - 2 * (g @ G[0]) / (G[0] @ G[0]) * G[0] if g @ G[0] > 0 else g  # g . g_0 < 0
        Gs[b, :t], gs[b], valid[b, :t] = G, g, True
    return Gs.astype(np.float32), gs.astype(np.float32), valid


def _project(Gs, gs, valid, margin, eps):
    out = _gem(jnp.asarray(gs), jnp.asarray(Gs), jnp.asarray(valid), margin, eps)
    return np.asarray(out, np.float64)


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_gem_projection_satisfies_constraints(margin):
    """eps = 0: KKT gives G g~ = P v + G g >= 0, and for margin 0 g~ is the Euclidean projection
    of g onto {z : G z >= 0}, so it is no farther from g than the oracle's."""
    Gs, gs, valid = _gem_batch(3, 40)
    out = _project(Gs, gs, valid, margin, 0.0)
    for G, g, ok, x in zip(Gs.astype(np.float64), gs.astype(np.float64), valid, out, strict=True):
        G = G[ok]
        scale = np.linalg.norm(G, axis=1) * np.linalg.norm(x)
        assert np.all(G @ x >= -1e-6 * scale), (G @ x) / scale
        v = _nnls_gem(G, g, margin, 0.0) + margin
        x_ref = v @ G + g
        assert np.linalg.norm(x - g) <= np.linalg.norm(x_ref - g) * (1 + 1e-4) + 1e-6
        np.testing.assert_allclose(x, x_ref, rtol=0, atol=1e-3 * np.linalg.norm(x_ref))


def test_gem_default_matches_oracle():
    Gs, gs, valid = _gem_batch(4, 40)
    out = _project(Gs, gs, valid, 0.5, 1e-3)
    for G, g, ok, x in zip(Gs.astype(np.float64), gs.astype(np.float64), valid, out, strict=True):
        v = _nnls_gem(G[ok], g, 0.5, 1e-3) + 0.5
        np.testing.assert_allclose(x, v @ G[ok] + g, rtol=0, atol=1e-4 * np.linalg.norm(x))


def test_gem_quadprog_reference():
    """Against the reference implementation's project2cone2 (quadprog), margin 0.5."""
    quadprog = pytest.importorskip("quadprog")
    Gs, gs, valid = _gem_batch(5, 20)
    out = _project(Gs, gs, valid, 0.5, 1e-3)
    for G, g, ok, x in zip(Gs.astype(np.float64), gs.astype(np.float64), valid, out, strict=True):
        G = G[ok]
        P = G @ G.T
        P = 0.5 * (P + P.T) + 1e-3 * np.eye(len(G))
        v = quadprog.solve_qp(P, -(G @ g), np.eye(len(G)), np.full(len(G), 0.5))[0]
        np.testing.assert_allclose(x, v @ G + g, rtol=0, atol=1e-4 * np.linalg.norm(x))


def test_gem_returns_g_unchanged_when_no_violation():
    rng = np.random.default_rng(6)
    n = 200
    g = rng.standard_normal(n).astype(np.float32)
    G = (np.abs(rng.standard_normal((T, 1))) * g + 0.1 * rng.standard_normal((T, n))).astype(
        np.float32
    )
    G[-3:] = -g  # violating rows, but padding
    valid = np.arange(T) < T - 3
    assert np.all(G[valid] @ g > 0)
    for fn in (qp.gem_project, jax.jit(qp.gem_project)):
        out = np.asarray(fn(jnp.asarray(g), jnp.asarray(G), jnp.asarray(valid)))
        assert np.array_equal(out, g)
    out = _project(G[None], g[None], valid[None], 0.5, 1e-3)  # vmapped: cond becomes a select
    assert np.array_equal(out[0].astype(np.float32), g)
    # and under jit a violated instance (all rows valid, the last ones = -g) is projected
    out = np.asarray(jax.jit(qp.gem_project)(jnp.asarray(g), jnp.asarray(G)), np.float64)
    G64 = G.astype(np.float64)
    x_ref = (_nnls_gem(G64, g.astype(np.float64), 0.5, 1e-3) + 0.5) @ G64 + g
    np.testing.assert_allclose(out, x_ref, rtol=0, atol=1e-4 * np.linalg.norm(x_ref))


def test_agem_formula():
    rng = np.random.default_rng(7)
    g, g_ref = rng.standard_normal(100), rng.standard_normal(100)
    agem = jax.jit(qp.agem_project)
    for sign in (1.0, -1.0):  # both branches
        r = sign * np.sign(g @ g_ref) * g_ref
        expected = g - (g @ r) / (r @ r) * r if g @ r < 0 else g
        out = np.asarray(agem(jnp.asarray(g, jnp.float32), jnp.asarray(r, jnp.float32)))
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        if g @ r < 0:
            assert abs(out @ r) <= 1e-4 * np.linalg.norm(r) * np.linalg.norm(g)
        else:
            assert np.array_equal(out, g.astype(np.float32))
    zero = np.asarray(agem(jnp.asarray(g, jnp.float32), jnp.zeros(100, jnp.float32)))
    assert np.array_equal(zero, g.astype(np.float32))
