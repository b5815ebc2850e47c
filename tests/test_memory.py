"""The episodic memory: selection invariants, in-step sampling, and the between-phase rebuild."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clseg_jax import rows
from clseg_jax.memory import buffer, selection, update
from clseg_jax.strategies import base


def _cands(exp, presence, features=None, rank=None, slot=None):
    n = len(exp)
    return selection.Candidates(
        exp=np.asarray(exp),
        presence=np.asarray(presence, bool),
        rank=np.full(n, -1) if rank is None else np.asarray(rank),
        slot=np.full(n, -1) if slot is None else np.asarray(slot),
        features=features,
    )


def _select(policy, cands, capacity, seed=0, seen=0, num_experiences=4):
    rng = np.random.default_rng(seed)
    return selection.select(
        policy, cands, capacity, rng, seen=seen, num_experiences=num_experiences
    )


def test_unknown_policy_is_one_line():
    with pytest.raises(ValueError, match=r"unknown memory selection policy 'fifo'; valid: \["):
        selection.check("fifo")


@pytest.mark.parametrize("policy", selection.POLICIES)
def test_capacity_and_determinism(policy):
    rng = np.random.default_rng(0)
    n = 50
    cands = _cands(
        rng.integers(0, 3, n), rng.random((n, 4)) < 0.4, features=rng.normal(size=(n, 6))
    )
    a, ra = _select(policy, cands, 12, seed=1)
    b, rb = _select(policy, cands, 12, seed=1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ra, rb)
    kept = a[a >= 0]
    assert len(a) == 12 and len(kept) == len(set(kept.tolist())) <= 12  # no row twice
    assert kept.max() < n


def test_reservoir_is_uniform_over_everything_offered():
    # 3 phases of 10 rows into 6 slots, 3000 times: every row kept with probability 6/30.
    hits = np.zeros(30)
    for trial in range(3000):
        rng = np.random.default_rng(trial)
        slots = np.full(6, -1)  # global id of the row held in each slot
        for phase in range(3):
            old = np.flatnonzero(slots >= 0)
            n = len(old) + 10
            cands = _cands(np.zeros(n, int), np.zeros((n, 1)), slot=np.r_[old, np.full(10, -1)])
            chosen, _ = selection.select(
                "reservoir", cands, 6, rng, seen=10 * phase, num_experiences=3
            )
            ids = np.r_[slots[old], phase * 10 + np.arange(10)]  # candidate -> global id
            slots = np.where(chosen >= 0, ids[chosen], -1)
        hits[slots] += 1
    freq = hits / 3000
    # Binomial(3000, 0.2): sd 0.0073; 5 sd over 30 rows.
    assert np.all(np.abs(freq - 0.2) < 0.037), freq


def test_random_per_experience_fills_fixed_blocks():
    exp = np.repeat([0, 1], [20, 5])
    chosen, rank = _select("random", _cands(exp, np.zeros((25, 1))), 16, num_experiences=2)
    assert np.all(exp[chosen[:8]] == 0)  # block 0: 8 rows of experience 0
    assert np.all(exp[chosen[8:13]] == 1) and np.all(chosen[13:] == -1)  # only 5 available
    np.testing.assert_array_equal(rank[:8], np.arange(8))


def test_experience_balanced_shares_and_keeps_best_ranked_rows():
    # Stored: 12 rows of experience 0 with ranks 0..11; new: 30 rows of experience 1.
    exp = np.r_[np.zeros(12), np.ones(30)].astype(int)
    rank = np.r_[np.arange(12)[::-1], np.full(30, -1)]
    slot = np.r_[np.arange(12), np.full(30, -1)]
    cands = _cands(exp, np.zeros((42, 1)), rank=rank, slot=slot)
    chosen, _ = _select("experience_balanced", cands, 12)
    kept = chosen[chosen >= 0]
    assert np.bincount(exp[kept]).tolist() == [6, 6]
    # The stored experience keeps its six best-ranked rows (ranks 0..5).
    assert sorted(rank[kept[exp[kept] == 0]].tolist()) == list(range(6))


def test_class_balanced_meets_every_quota():
    rng = np.random.default_rng(3)
    n = 200
    presence = np.zeros((n, 5), bool)
    presence[:, 0] = rng.random(n) < 0.9  # a common class
    presence[:, 1] = rng.random(n) < 0.5
    presence[:6, 2] = True  # a rare class: 6 rows only
    presence[:, 3] = rng.random(n) < 0.1
    cands = _cands(np.zeros(n, int), presence)
    chosen, _ = _select("class_balanced", cands, 20)
    kept = chosen[chosen >= 0]
    assert len(kept) == 20
    counts = presence[kept].sum(axis=0)
    for c in range(4):
        assert counts[c] >= min(20 // 4, presence[:, c].sum()), counts


def _herd_reference(f, m):
    """iCaRL's Algorithm 4 written directly: try every remaining row at every step."""
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    mu = f.mean(axis=0)
    picked = []
    for k in range(1, m + 1):
        best, best_d = None, np.inf
        for i in range(len(f)):
            if i in picked:
                continue
            d = np.linalg.norm(mu - (f[picked].sum(axis=0) + f[i]) / k)
            if d < best_d:
                best, best_d = i, d
        picked.append(best)
    return picked


def test_herding_matches_icarl_algorithm():
    f = np.random.default_rng(0).normal(size=(40, 8))
    assert selection.herd(f, 10).tolist() == _herd_reference(f, 10)


def test_herding_keeps_old_class_order():
    # Class 0 only in stored rows (ranks 2,0,1) -> kept in rank order; class 1 herded anew.
    presence = np.zeros((10, 2), bool)
    presence[:3, 0] = True
    presence[3:, 1] = True
    cands = _cands(
        np.r_[np.zeros(3), np.ones(7)].astype(int),
        presence,
        features=np.random.default_rng(1).normal(size=(10, 4)),
        rank=np.r_[[2, 0, 1], np.full(7, -1)],
        slot=np.r_[[0, 1, 2], np.full(7, -1)],
    )
    chosen, rank = _select("herding", cands, 4)
    assert chosen[:2].tolist() == [1, 2]
    assert set(chosen[2:].tolist()) <= set(range(3, 10))
    assert rank.tolist() == [0, 1, 0, 1]


def test_presence_of_each_label_kind():
    seg = np.array([[[0, 2], [255, 2]], [[0, 0], [1, 255]]], np.uint8)
    np.testing.assert_array_equal(
        update.presence(seg, 3), [[False, False, True], [False, True, False]]
    )
    np.testing.assert_array_equal(
        update.presence(np.array([2, 0, 255], np.uint8), 3)[:, 2], [True, False, False]
    )
    np.testing.assert_array_equal(update.presence(np.array([[0, 1, 1]], np.uint8), 3), [[0, 1, 1]])


def _filled(valid):
    buf = buffer.empty(len(valid), (2, 2, 3), (2, 2))
    m = len(valid)
    return buf._replace(
        image=jnp.arange(m, dtype=jnp.uint8)[:, None, None, None]
        * jnp.ones((m, 2, 2, 3), jnp.uint8),
        label=jnp.where(jnp.asarray(valid)[:, None, None], 1, 255).astype(jnp.uint8)
        * jnp.ones((m, 2, 2), jnp.uint8),
        valid=jnp.asarray(valid),
    )


def test_sample_draws_distinct_valid_rows():
    buf = _filled([True, False, True, True, False, True])
    rows, ok = jax.jit(buffer.sample, static_argnums=2)(buf, jax.random.PRNGKey(0), 4)
    ids = rows["image"][:, 0, 0, 0]
    assert bool(ok.all()) and len(set(ids.tolist())) == 4
    assert set(ids.tolist()) == {0, 2, 3, 5}
    # More rows than are filled: the extra rows are flagged.
    rows, ok = buffer.sample(_filled([True, False, False]), jax.random.PRNGKey(1), 2)
    assert ok.tolist().count(True) == 1 and int(rows["image"][ok][0, 0, 0, 0]) == 0


def test_append_replay_ignores_rows_without_data():
    batch = {
        "image": jnp.full((2, 2, 2, 3), 7, jnp.uint8),
        "label": jnp.zeros((2, 2, 2), jnp.uint8),
    }
    rows, ok = buffer.sample(_filled([True, False, False, False]), jax.random.PRNGKey(0), 3)
    out = buffer.append_replay(batch, rows, ok)
    assert out["image"].shape == (5, 2, 2, 3) and out["label"].shape == (5, 2, 2)
    ignored = np.asarray(out["label"][2:] == 255).all(axis=(1, 2))
    np.testing.assert_array_equal(ignored, ~np.asarray(ok))
    # Empty rows borrow the batch's own images (real pixels for BatchNorm).
    assert np.all(np.asarray(out["image"][2:])[~np.asarray(ok)] == 7)


def _phase(index, images, labels):
    def batches(size):
        for s in range(0, len(images), size):
            yield {"image": images[s : s + size], "label": labels[s : s + size]}

    return base.Phase(index, (index,), (), (), np.ones(3, bool), batches)


def test_update_stores_rows_labels_and_extras():
    rng = np.random.default_rng(0)
    buf = buffer.empty(8, (2, 2, 3), (2, 2), extra={"logits": ((2, 2, 3), jnp.float32)})

    def row_fn(params, batch_stats, images):  # a stand-in model: logits from pixel values
        del params, batch_stats
        x = images.astype(jnp.float32)
        return {"logits": x, "features": x.mean(axis=(1, 2))}

    for p, n in enumerate((8, 10, 10)):
        images = rng.integers(0, 256, (n, 2, 2, 3), dtype=np.uint8)
        labels = rng.integers(0, 3, (n, 2, 2), dtype=np.uint8)
        buf = update.update(
            buf,
            _phase(p, images, labels),
            "reservoir",
            np.random.default_rng(p),
            num_classes=3,
            num_experiences=3,
            row_fn=rows.Map(row_fn, whole=2),
            batch_size=4,
        )
        if p == 0:
            # The first eight rows fill the memory in arrival order, with their labels.
            np.testing.assert_array_equal(np.asarray(buf.image), images)
            np.testing.assert_array_equal(np.asarray(buf.label), labels)
    assert int(buf.seen) == 28 and bool(buf.valid.all())
    np.testing.assert_allclose(np.asarray(buf.extra["logits"]), np.asarray(buf.image, np.float32))
    assert set(np.asarray(buf.exp).tolist()) <= {0, 1, 2}
