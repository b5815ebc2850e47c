"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017, "Continual Learning Through
Synaptic Intelligence"), as in the reference code ganguli-lab/pathint (``PATH_INT_PROTOCOL`` with
``omega_decay='sum'``), not Avalanche's clamped variant.

Per training step, with ``g`` the gradient of the task loss alone (``on_step`` receives it) and
``delta = theta_new - theta_old`` the update the optimizer actually applied (penalty included)::

    omega <- omega - g * delta                                   (path integral of this phase)

After each phase, with ``theta*`` the parameters at the start of the phase::

    Omega <- relu(Omega + omega / ((theta - theta*)^2 + xi))
    omega <- 0;  theta* <- theta

and during training the parameter-only penalty ``c * sum Omega * (theta - theta*)^2``.

Following pathint (``protocols.py``): ``theta*`` ("cweights") is set to the initial parameters
before the first task (``init_updates``) and to the current parameters after each task, *after*
Omega has been updated with the old ``theta*``; the relu is applied to the accumulated sum
(``relu(ema('sum', ...))``), the gradient is that of the unregularised loss (``unreg_grads``), the
step is the optimizer's actual weight change (``deltas``) and the penalty has no factor 1/2
(``regularizers.quadratic_regularizer``). ``xi`` defaults to 1e-3, the value of pathint's
split-MNIST and split-CIFAR-10/100 runs (its permuted-MNIST run used 0.1); ``c`` to 0.1, the
strength the paper reports for split CIFAR-10/100 (pathint sweeps 0, 0.01, 0.1 there; split MNIST
used 1). Here ``theta*`` is taken at the end of the previous phase; a ``before_phase`` of another
chained strategy that edits parameters (e.g. a new head's initialisation) is therefore counted in
``theta - theta*`` but not in ``omega``.

State ``SIState`` (float32, each leaf shaped like the corresponding parameter, fixed for the
stream): ``omega`` (running path integral), ``importance`` (Omega), ``anchor`` (theta*).
The penalty goes through ``Strategy.penalty``, so SI alone needs no second backward pass.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from clseg_jax.strategies import base

PyTree = Any

DEFAULTS = {"si_c": 0.1, "si_xi": 1e-3}

# What each field of DEFAULTS sets (the hyperparameter table of docs/strategies.md).
HELP = {
    "si_c": "penalty strength c in `c * sum Omega (theta - theta*)^2`",
    "si_xi": (
        "damping xi in `Omega <- relu(Omega + omega / ((theta - theta*)^2 + xi))` (pathint's value)"
    ),
}


class SIState(NamedTuple):
    omega: PyTree  # running path integral of -g * delta over the current phase
    importance: PyTree  # Omega, accumulated over finished phases
    anchor: PyTree  # theta*: the parameters at the start of the current phase


def _f32(tree: PyTree) -> PyTree:
    # A copy (never an alias): the train step donates the parameter buffers.
    return jax.tree.map(lambda p: jnp.array(p, dtype=jnp.float32), tree)


def init(params: PyTree, batch_stats: PyTree) -> SIState:
    del batch_stats
    # Two separate trees of zeros: the step donates the state, and one buffer cannot be donated
    # twice.
    zeros = lambda: jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    return SIState(omega=zeros(), importance=zeros(), anchor=_f32(params))


def on_step(sstate: SIState, task_grads: PyTree, old_params: PyTree, new_params: PyTree) -> SIState:
    def accumulate(w, g, old, new):
        return w - g.astype(jnp.float32) * (new.astype(jnp.float32) - old.astype(jnp.float32))

    omega = jax.tree.map(accumulate, sstate.omega, task_grads, old_params, new_params)
    return sstate._replace(omega=omega)


def consolidate(sstate: SIState, params: PyTree, xi: float) -> SIState:
    """End of a phase: fold the path integral into Omega, reset it, move the anchor."""

    def importance(big, w, p, a):
        return jax.nn.relu(big + w / ((p.astype(jnp.float32) - a) ** 2 + xi))

    new_importance = jax.tree.map(
        importance, sstate.importance, sstate.omega, params, sstate.anchor
    )
    return SIState(
        omega=jax.tree.map(jnp.zeros_like, sstate.omega),
        importance=new_importance,
        anchor=_f32(params),
    )


def penalty_value(params: PyTree, sstate: SIState, c: float) -> jax.Array:
    """``c * sum Omega * (theta - theta*)^2`` over every parameter."""
    terms = jax.tree.map(
        lambda p, big, a: jnp.sum(big * (p.astype(jnp.float32) - a) ** 2),
        params,
        sstate.importance,
        sstate.anchor,
    )
    return c * sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


def make(cfg: ml_collections.ConfigDict, env: base.Env) -> base.Strategy:
    del env
    c, xi = base.hparam(cfg.si_c), base.hparam(cfg.si_xi)
    # One program: eagerly, every per-leaf op compiled on its own (~160 compiles, ~10 s on CPU).
    finish = jax.jit(lambda sstate, params: consolidate(sstate, params, xi))

    def penalty(params: PyTree, sstate: SIState) -> tuple[jax.Array, dict[str, jax.Array]]:
        value = penalty_value(params, sstate, c)
        return value, {"si_penalty": value}

    def after_phase(
        params: PyTree, batch_stats: PyTree, sstate: SIState, phase: base.Phase
    ) -> SIState:
        del batch_stats, phase
        return finish(sstate, params)

    return base.Strategy(
        init=init,
        penalty=penalty,
        on_step=on_step,
        after_phase=after_phase,
    )
