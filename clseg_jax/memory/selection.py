"""Which rows the episodic memory keeps: selection policies, run on the host between phases.

Candidates are the memory's valid rows followed by the finished phase's training rows; a policy
returns the candidate stored in each of the ``capacity`` slots (-1 = empty) and the row's rank.
Every policy is deterministic given its ``numpy`` generator.

- ``reservoir`` (Vitter 1985; ER, DER++): the n-th row ever offered takes slot n while the memory
  fills, then replaces a uniformly random slot with probability M/n, so the memory stays a uniform
  sample of everything seen. Offering a phase's rows in order after it ends keeps that law.
- ``random``: a fixed block of ``M // num_experiences`` slots per experience, filled with a uniform
  sample of its rows (GEM's and A-GEM's per-experience memories).
- ``experience_balanced``: ``M`` split evenly over the experiences seen so far (earlier ones get the
  remainder); old experiences keep their first-ranked rows when their share shrinks.
- ``class_balanced``: ``M`` split evenly over the classes present; a row counts for every class it
  contains (for segmentation: every class with at least one pixel; the caller leaves background
  out). Classes are served rarest first, each topping up to its quota with rows not yet chosen;
  leftover slots take uniformly random remaining rows.
- ``herding`` (iCaRL, Rebuffi et al. 2017, Alg. 4): per class, ``M // num_classes`` rows chosen
  greedily so the mean of their L2-normalised features tracks the class mean; a class with no new
  rows keeps its stored exemplars in their herding order (iCaRL's ReduceExemplarSet).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

POLICIES = ("reservoir", "random", "experience_balanced", "class_balanced", "herding")


class Candidates(NamedTuple):
    """Rows that may enter the memory: ``N`` = stored valid rows + the new phase's rows.

    Attributes:
      exp: int ``[N]``, the phase each row came from.
      presence: bool ``[N,K]``, the classes each row contains (what class balance counts).
      rank: int ``[N]``, a stored row's rank (-1 for new rows).
      slot: int ``[N]``, a stored row's memory slot (-1 for new rows).
      features: float ``[N,C]`` (herding only) or None.
    """

    exp: np.ndarray
    presence: np.ndarray
    rank: np.ndarray
    slot: np.ndarray
    features: np.ndarray | None = None


def check(policy: str) -> None:
    """One-line error for an unknown policy name."""
    if policy not in POLICIES:
        raise ValueError(f"unknown memory selection policy {policy!r}; valid: {list(POLICIES)}")


def select(
    policy: str,
    cands: Candidates,
    capacity: int,
    rng: np.random.Generator,
    *,
    seen: int,
    num_experiences: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Runs ``policy``; ``seen`` = rows offered before this phase (reservoir's count).

    Returns:
      chosen: int ``[capacity]``, candidate index stored in each slot, -1 for an empty slot.
      rank: int ``[capacity]``, each slot's rank within its group.
    """
    check(policy)
    if policy == "reservoir":
        return _reservoir(cands, capacity, rng, seen)
    if policy == "random":
        return _random_per_experience(cands, capacity, rng, num_experiences)
    if policy == "experience_balanced":
        return _experience_balanced(cands, capacity, rng)
    if policy == "class_balanced":
        return _class_balanced(cands, capacity, rng)
    if cands.features is None:
        raise ValueError("herding needs candidate features")
    return _herding(cands, capacity)


def _pack(picks: list[np.ndarray], ranks: list[np.ndarray], capacity: int):
    chosen = np.full(capacity, -1, np.int64)
    rank = np.zeros(capacity, np.int64)
    flat = np.concatenate(picks) if picks else np.zeros(0, np.int64)
    flat_rank = np.concatenate(ranks) if ranks else np.zeros(0, np.int64)
    chosen[: len(flat)] = flat[:capacity]
    rank[: len(flat)] = flat_rank[:capacity]
    return chosen, rank


def _reservoir(cands, capacity, rng, seen):
    chosen = np.full(capacity, -1, np.int64)
    old = np.flatnonzero(cands.slot >= 0)
    chosen[cands.slot[old]] = old
    new = np.flatnonzero(cands.slot < 0)
    n = seen + np.arange(len(new))  # each new row's 0-based arrival number
    target = np.where(n < capacity, n, rng.integers(0, n + 1))
    for i, t in zip(new, target, strict=True):  # in order: a later row may evict an earlier one
        if t < capacity:
            chosen[t] = i
    return chosen, np.zeros(capacity, np.int64)


def _ordered(cands, members, rng):
    """Stored rows by rank, new rows in random order after them."""
    old = members[cands.rank[members] >= 0]
    new = members[cands.rank[members] < 0]
    return np.concatenate([old[np.argsort(cands.rank[old], kind="stable")], rng.permutation(new)])


def _random_per_experience(cands, capacity, rng, num_experiences):
    q = capacity // num_experiences
    if q < 1:
        raise ValueError(f"memory of {capacity} rows is smaller than {num_experiences} experiences")
    chosen = np.full(capacity, -1, np.int64)
    rank = np.zeros(capacity, np.int64)
    for e in np.unique(cands.exp):
        if e >= num_experiences:
            raise ValueError(f"experience {e} has no memory block ({num_experiences} blocks)")
        take = _ordered(cands, np.flatnonzero(cands.exp == e), rng)[:q]
        chosen[e * q : e * q + len(take)] = take
        rank[e * q : e * q + len(take)] = np.arange(len(take))
    return chosen, rank


def _experience_balanced(cands, capacity, rng):
    exps = np.unique(cands.exp)
    quota = np.full(len(exps), capacity // max(len(exps), 1))
    quota[: capacity - quota.sum()] += 1
    picks, ranks = [], []
    for e, q in zip(exps, quota, strict=True):
        take = _ordered(cands, np.flatnonzero(cands.exp == e), rng)[:q]
        picks.append(take)
        ranks.append(np.arange(len(take)))
    return _pack(picks, ranks, capacity)


def _class_balanced(cands, capacity, rng):
    present = cands.presence.any(axis=0)
    classes = np.flatnonzero(present)
    taken = np.zeros(len(cands.exp), bool)
    picks = []
    if len(classes):
        quota = capacity // len(classes)
        counts = cands.presence[:, classes].sum(axis=0)
        for c in classes[np.argsort(counts, kind="stable")]:  # rarest first
            have = int((cands.presence[:, c] & taken).sum())
            members = rng.permutation(np.flatnonzero(cands.presence[:, c] & ~taken))
            take = members[: max(quota - have, 0)][: capacity - int(taken.sum())]
            taken[take] = True
            picks.append(take)
    rest = rng.permutation(np.flatnonzero(~taken))[: capacity - int(taken.sum())]
    picks.append(rest)
    flat = np.concatenate(picks).astype(np.int64)
    return _pack([flat], [np.arange(len(flat))], capacity)


def herd(features: np.ndarray, m: int) -> np.ndarray:
    """iCaRL's herding: indices of ``m`` rows of ``features [n,C]`` in selection order.

    Features are L2-normalised; the k-th pick minimises ``||mu - (s + f) / k||`` where ``mu`` is
    the mean normalised feature and ``s`` the sum of the k-1 earlier picks.
    """
    f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    mu = f.mean(axis=0)
    s = np.zeros_like(mu)
    free = np.ones(len(f), bool)
    order = []
    for k in range(1, min(m, len(f)) + 1):
        dist = np.linalg.norm(mu[None] - (s[None] + f) / k, axis=1)
        i = int(np.argmin(np.where(free, dist, np.inf)))
        order.append(i)
        free[i] = False
        s = s + f[i]
    return np.asarray(order, np.int64)


def _herding(cands, capacity):
    classes = np.flatnonzero(cands.presence.any(axis=0))
    if not len(classes):
        return _pack([], [], capacity)
    quota = capacity // len(classes)
    taken = np.zeros(len(cands.exp), bool)
    picks, ranks = [], []
    for c in classes:
        members = np.flatnonzero(cands.presence[:, c] & ~taken)
        if np.all(cands.slot[members] >= 0):  # an old class: keep its exemplars' order
            take = members[np.argsort(cands.rank[members], kind="stable")][:quota]
        else:
            take = members[herd(cands.features[members], quota)]
        taken[take] = True
        picks.append(take)
        ranks.append(np.arange(len(take)))
    return _pack(picks, ranks, capacity)
