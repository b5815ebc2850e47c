"""Elastic Weight Consolidation (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in
neural networks", PNAS).

Penalty ``lambda * sum_k valid_k * sum_i F_k,i (theta_i - theta*_k,i)^2`` (no 1/2, as Avalanche).

- ``separate``: one Fisher ``F_k`` and anchor ``theta*_k`` per finished experience k, written into
  slot ``phase.index`` of stacked arrays ``[num_experiences, *p.shape]`` with a 0/1 ``valid [E]``.
  The step does not loop over slots: ``sum_k F_k (theta - a_k)^2 = W (theta - c)^2 + const`` with
  ``W = sum_k F_k``, ``c = sum_k F_k a_k / W`` and ``const = sum_k F_k (a_k - c)^2`` (the cross term
  vanishes), precomputed after each phase, so a step costs the same as with one anchor.
- ``online``: ``F <- gamma F + F_new`` (``ewc_decay`` = gamma) and one anchor, both ``p.shape``.

Fisher (diagonal): ``empirical``: mean over up to ``ewc_samples`` training samples of the squared
gradient of the sample's log-likelihood, the mean over its non-ignored pixels of log p(label),
with the ground-truth labels; ``batch``: squared gradients of the batch-mean log-likelihood, each
batch weighted by its sample count (``ewc_batch`` samples per batch; Avalanche's variant).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clseg_jax.strategies import base, importance

PyTree = Any

DEFAULTS = {
    "ewc_lambda": 100.0,
    "ewc_mode": "separate",  # separate | online
    "ewc_decay": 1.0,  # gamma of the online mode
    "ewc_samples": 128,  # samples per Fisher pass: quality flat from 8 to 256 (experiments/README)
    "ewc_batch": 16,  # samples per vectorised backward pass
    "ewc_fisher": "empirical",  # empirical | batch
}

# What each field of DEFAULTS sets (the hyperparameter table of docs/strategies.md).
HELP = {
    "ewc_lambda": (
        "penalty strength lambda in `lambda * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2`"
    ),
    "ewc_mode": (
        "`separate`: one Fisher + anchor per past experience (fixed-size slots); `online`: one "
        "Fisher, `F <- gamma F + F_new`"
    ),
    "ewc_decay": "gamma of the online mode",
    "ewc_samples": (
        "samples per Fisher pass (quality flat from 8 to 256 on the behaviour stream, see "
        "benchmarks.md)"
    ),
    "ewc_batch": "samples per vectorised backward pass (`vmap(grad)`)",
    "ewc_fisher": (
        "`empirical`: per-sample gradients of the mean pixel log-likelihood; `batch`: the "
        "batch-gradient variant (Avalanche's)"
    ),
}
MODES = ("separate", "online")
FISHERS = ("empirical", "batch")


class SeparateState(NamedTuple):
    fisher: PyTree  # [E, *p.shape] per-experience Fisher
    anchor: PyTree  # [E, *p.shape] per-experience parameters
    valid: jax.Array  # float32 [E]: slot k holds a finished experience
    weight: PyTree  # p.shape: sum_k valid_k F_k
    center: PyTree  # p.shape: the Fisher-weighted mean anchor
    offset: jax.Array  # float32 []: sum_k valid_k F_k (a_k - center)^2 summed over parameters


class OnlineState(NamedTuple):
    fisher: PyTree  # p.shape: gamma-discounted sum of the experiences' Fishers
    anchor: PyTree  # p.shape: parameters at the end of the last phase


def consolidate(fisher: PyTree, anchor: PyTree, valid: jax.Array) -> SeparateState:
    """The separate-mode state for stacked ``fisher``/``anchor`` and ``valid`` (see docstring)."""
    on = lambda f: f * valid.reshape((-1,) + (1,) * (f.ndim - 1))
    fisher_on = jax.tree.map(on, fisher)
    weight = jax.tree.map(lambda f: jnp.sum(f, axis=0), fisher_on)
    center = jax.tree.map(
        lambda f, a, w: jnp.sum(f * a, axis=0) / jnp.where(w > 0, w, 1.0),
        fisher_on,
        anchor,
        weight,
    )
    spread = jax.tree.map(lambda f, a, c: jnp.sum(f * (a - c) ** 2), fisher_on, anchor, center)
    offset = sum(jax.tree.leaves(spread), jnp.zeros((), jnp.float32))
    return SeparateState(fisher, anchor, valid, weight, center, offset)


def _check(cfg: ml_collections.ConfigDict) -> None:
    if cfg.get("ewc_mode", DEFAULTS["ewc_mode"]) not in MODES:
        raise ValueError(f"unknown ewc_mode {cfg.ewc_mode!r}; valid: {list(MODES)}")
    if cfg.get("ewc_fisher", DEFAULTS["ewc_fisher"]) not in FISHERS:
        raise ValueError(f"unknown ewc_fisher {cfg.ewc_fisher!r}; valid: {list(FISHERS)}")


def make(cfg: ml_collections.ConfigDict, env: base.Env) -> base.Strategy:
    _check(cfg)
    get = lambda key: cfg.get(key, DEFAULTS[key])
    lam, mode, gamma = (
        base.hparam(get("ewc_lambda")),
        get("ewc_mode"),
        base.hparam(get("ewc_decay")),
    )
    samples, batch_size = int(get("ewc_samples")), int(get("ewc_batch"))
    sample_fn = importance.sample_log_likelihood(env.forward)
    if get("ewc_fisher") == "empirical":
        fisher_batch = importance.make_per_sample_sum(sample_fn, jnp.square)
    else:
        fisher_batch = importance.make_batch_grad_sum(sample_fn, jnp.square)
    slots = env.num_experiences

    def fisher(params, batch_stats, phase: base.Phase) -> PyTree:
        """The phase's diagonal Fisher (see the module docstring)."""
        f, _ = importance.mean_over_samples(
            fisher_batch, params, batch_stats, phase, batch_size, samples
        )
        return f

    def init(params, batch_stats):
        del batch_stats
        zeros = lambda p: jnp.zeros_like(p, jnp.float32)
        if mode == "online":
            return OnlineState(jax.tree.map(zeros, params), jax.tree.map(jnp.array, params))
        stack = lambda p: jnp.zeros((slots, *p.shape), jnp.float32)
        return consolidate(
            jax.tree.map(stack, params),
            jax.tree.map(stack, params),
            jnp.zeros(slots, jnp.float32),
        )

    @jax.jit
    def write_slot(sstate: SeparateState, new_fisher, params, index) -> SeparateState:
        put = lambda s, x: jax.lax.dynamic_update_index_in_dim(s, x.astype(s.dtype), index, 0)
        return consolidate(
            jax.tree.map(put, sstate.fisher, new_fisher),
            jax.tree.map(put, sstate.anchor, params),
            sstate.valid.at[index].set(1.0),
        )

    @jax.jit
    def decay_and_add(sstate: OnlineState, new_fisher, params) -> OnlineState:
        f = jax.tree.map(lambda old, new: gamma * old + new, sstate.fisher, new_fisher)
        # A copy inside jit: an output that is an input would alias the donated parameters.
        return OnlineState(f, jax.tree.map(jnp.copy, params))

    def after_phase(params, batch_stats, sstate, phase):
        new_fisher = fisher(params, batch_stats, phase)
        if mode == "online":
            return decay_and_add(sstate, new_fisher, params)
        # An array index: a new slot number must not become a new compiled constant.
        return write_slot(sstate, new_fisher, params, np.int32(phase.index))

    def penalty(params, sstate):
        if mode == "online":
            value = lam * importance.quadratic(params, sstate.fisher, sstate.anchor)
        else:
            value = lam * (
                importance.quadratic(params, sstate.weight, sstate.center) + sstate.offset
            )
        return value, {"ewc_penalty": value}

    return base.Strategy(init=init, penalty=penalty, after_phase=after_phase)
