"""Riemannian Walk (Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning: Understanding
Forgetting and Intransigence", ECCV): EWC++ plus a KL-normalised path-integral score.

Every training step, with ``g`` the task-loss gradient (``on_step`` receives it; free with a
parameter-only penalty) and ``d = theta_new - theta_old`` the applied update::

    F <- alpha g^2 + (1 - alpha) F           (EWC++: moving-average empirical Fisher)
    s <- s + (-g d) / (0.5 F d^2 + eps)      (path score: loss drop over the KL distance moved)

After each phase: ``S <- s`` for the first phase, else ``S <- (S + s) / 2`` (averaging old and
new scores keeps the penalty from growing ever more rigid); ``s <- 0``; ``theta* <- theta``; and
the penalty weight ``W = F / max F + relu(S) / max relu(S)`` (max over all parameters), frozen
until the next phase ends. Penalty: ``rwalk_lambda * sum_i W_i (theta_i - theta*_i)^2``.

From the paper: the EMA form with ``alpha`` weighting the new term; the score's numerator (first
order loss change) and denominator (1/2 F d^2, the KL divergence of the move, plus eps); averaging
old and new scores; the penalty ``(F + s)(theta - theta*)^2`` on normalised terms. From the public
code (facebookresearch/agem ``model/model.py``; Avalanche's ``RWalkPlugin`` agrees): ``alpha = 0.9``
(agem's ``fisher_ema_decay``); the EMA starts from the first squared gradient and runs on across
phases; the penalty uses the running Fisher at the end of the phase; negative scores are clipped
to 0 and both terms scaled into [0, 1] by their maximum (as Avalanche; agem also subtracts the
minimum). Our own choices: the score is summed over every step (an interval of 1 step; agem and
Avalanche sum over intervals of 50 / 10 steps, one squared distance per interval); the relu acts
on the averaged score (Avalanche) rather than on each interval (agem); ``eps`` = 1e-8 (Avalanche:
float32 machine epsilon; agem: 1e-3, without the 1/2).

State ``RWalkState`` (float32, each leaf ``p.shape``): ``fisher``, ``path`` (s), ``score`` (S),
``weight`` (W), ``anchor`` (theta*); scalars ``steps`` (int32) and ``phases`` (float32).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from clseg_jax.strategies import base, importance

PyTree = Any

DEFAULTS = {
    "rwalk_lambda": 1.0,  # FACIL's default; the terms are normalised, so O(1) is the scale
    "rwalk_alpha": 0.9,  # weight of the newest squared gradient in the Fisher EMA
    "rwalk_eps": 1e-8,
}

# What each field of DEFAULTS sets (the hyperparameter table of docs/strategies.md).
HELP = {
    "rwalk_lambda": (
        "strength of the penalty on the [0, 1]-scaled Fisher + path score (FACIL's default; the"
        " terms are normalised, so O(1) is the scale)"
    ),
    "rwalk_alpha": "weight of the newest squared gradient in the EWC++ Fisher moving average",
    "rwalk_eps": "eps in the path score's denominator `0.5 F d^2 + eps`",
}


class RWalkState(NamedTuple):
    fisher: PyTree  # EMA of squared task gradients, running over the whole stream
    path: PyTree  # s: this phase's path score
    score: PyTree  # S: finished phases' scores, averaged
    weight: PyTree  # W: normalised Fisher + normalised score, the penalty weight
    anchor: PyTree  # theta*: parameters at the end of the last phase
    steps: jax.Array  # int32 []: training steps so far
    phases: jax.Array  # float32 []: finished phases


def _tree_max(tree: PyTree) -> jax.Array:
    return jnp.max(jnp.stack([jnp.max(x) for x in jax.tree.leaves(tree)]))


def _scaled(tree: PyTree) -> PyTree:
    """``tree / max(tree)`` (all-zero stays zero); leaves are non-negative."""
    top = _tree_max(tree)
    return jax.tree.map(lambda x: x / jnp.where(top > 0, top, 1.0), tree)


def make(cfg: ml_collections.ConfigDict, env: base.Env) -> base.Strategy:
    del env
    get = lambda key: cfg.get(key, DEFAULTS[key])
    lam, alpha, eps = (
        base.hparam(get("rwalk_lambda")),
        base.hparam(get("rwalk_alpha")),
        base.hparam(get("rwalk_eps")),
    )

    def init(params, batch_stats):
        del batch_stats
        zeros = lambda: jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        anchor = jax.tree.map(lambda p: jnp.array(p, jnp.float32), params)  # a copy, not an alias
        return RWalkState(
            zeros(),
            zeros(),
            zeros(),
            zeros(),
            anchor,
            jnp.zeros((), jnp.int32),
            jnp.zeros((), jnp.float32),
        )

    def on_step(sstate: RWalkState, task_grads, old_params, new_params) -> RWalkState:
        first = sstate.steps == 0
        g = jax.tree.map(lambda x: x.astype(jnp.float32), task_grads)
        fisher = jax.tree.map(
            lambda f, g: jnp.where(first, g**2, alpha * g**2 + (1.0 - alpha) * f), sstate.fisher, g
        )

        def score(s, g, f, old, new):
            d = (new - old).astype(jnp.float32)
            return s - g * d / (0.5 * f * d**2 + eps)

        path = jax.tree.map(score, sstate.path, g, fisher, old_params, new_params)
        return sstate._replace(fisher=fisher, path=path, steps=sstate.steps + 1)

    @jax.jit
    def finish(sstate: RWalkState, params) -> RWalkState:
        first = sstate.phases == 0
        score = jax.tree.map(
            lambda old, new: jnp.where(first, new, 0.5 * (old + new)), sstate.score, sstate.path
        )
        positive = jax.tree.map(jax.nn.relu, score)
        weight = jax.tree.map(jnp.add, _scaled(sstate.fisher), _scaled(positive))
        return sstate._replace(
            path=jax.tree.map(jnp.zeros_like, sstate.path),
            score=score,
            weight=weight,
            # A copy inside jit: an output that is an input would alias the donated parameters.
            anchor=jax.tree.map(lambda p: jnp.copy(p).astype(jnp.float32), params),
            phases=sstate.phases + 1.0,
        )

    def after_phase(params, batch_stats, sstate, phase):
        del batch_stats, phase
        return finish(sstate, params)

    def penalty(params, sstate):
        value = lam * importance.quadratic(params, sstate.weight, sstate.anchor)
        return value, {"rwalk_penalty": value}

    return base.Strategy(init=init, penalty=penalty, on_step=on_step, after_phase=after_phase)
