"""Memory Aware Synapses (Aljundi et al. 2018, "Memory Aware Synapses: Learning what (not) to
forget", ECCV).

Importance of parameter i from experience t, over up to ``mas_samples`` training samples x:

    Omega_new,i = mean_x | d/dtheta_i  (1/|P|) sum_{p in P} || z_p(x) ||^2 |

where ``z_p(x)`` is the eval-mode logit vector at pixel p restricted to the classes seen so far
(the phase's class mask; masked classes contribute 0) and P the image's pixels. The paper's
"output" is one vector per sample; a dense model has one per pixel, and averaging their squared
norms over pixels (instead of summing) keeps Omega, and so ``mas_lambda``, independent of the image
size, and equals the paper's quantity for a one-pixel output. No labels are used (the paper's
point: importance can be measured on unlabelled data). The absolute value is taken per sample
(vectorised per-sample gradients), as in the paper, not of a batch gradient.

Omega is a running average over experiences, ``Omega_t = ((t-1) Omega_{t-1} + Omega_new) / t``,
with one anchor theta* (the parameters after the last phase). Penalty, as in the paper's Eq. 3:
``mas_lambda * sum_i Omega_i (theta_i - theta*_i)^2``.

State: ``omega`` and ``anchor`` (each ``p.shape`` per parameter) and ``count`` (float32 [], the
number of finished phases). Omega is 0 until the first phase ends, so the penalty starts at 0.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from clseg_jax.strategies import base, importance

PyTree = Any

DEFAULTS = {
    "mas_lambda": 1.0,  # the paper's lambda for object recognition
    "mas_samples": 256,  # samples per importance pass
    "mas_batch": 16,  # samples per vectorised backward pass
}

# What each field of DEFAULTS sets (the hyperparameter table of docs/strategies.md).
HELP = {
    "mas_lambda": "strength of the quadratic penalty (the paper's lambda for object recognition)",
    "mas_samples": "samples per importance pass (mean of `|d ||f(x)||^2 / d theta|`)",
    "mas_batch": "samples per vectorised backward pass",
}


class MASState(NamedTuple):
    omega: PyTree  # p.shape: running average of the experiences' importances
    anchor: PyTree  # p.shape: parameters at the end of the last phase
    count: jax.Array  # float32 []: finished phases


def output_sq_norm(forward: base.Forward) -> importance.SampleFn:
    """A sample's mean over pixels of the squared L2 norm of its seen-class logit vector."""

    def fn(params, batch_stats, class_mask, image, label):
        del label  # unsupervised
        out, _ = forward(params, batch_stats, image[None], False)
        logits = out["logits"]
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        # Zeros rather than losses.NEG for masked classes: the same (zero) gradient, but a finite
        # value (NEG**2 would swamp the seen classes' norm in float32).
        z = jnp.where(class_mask, logits, 0.0)
        return jnp.mean(jnp.sum(z**2, axis=-1))

    return fn


def make(cfg: ml_collections.ConfigDict, env: base.Env) -> base.Strategy:
    get = lambda key: cfg.get(key, DEFAULTS[key])
    lam = base.hparam(get("mas_lambda"))
    samples, batch_size = int(get("mas_samples")), int(get("mas_batch"))
    abs_grad_sum = importance.make_per_sample_sum(output_sq_norm(env.forward), jnp.abs)

    def init(params, batch_stats):
        del batch_stats
        return MASState(
            jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params),
            jax.tree.map(jnp.array, params),
            jnp.zeros((), jnp.float32),
        )

    @jax.jit
    def fold(sstate: MASState, new_omega, params) -> MASState:
        t = sstate.count + 1.0
        omega = jax.tree.map(lambda o, n: ((t - 1.0) * o + n) / t, sstate.omega, new_omega)
        # A copy inside jit: an output that is an input would alias the donated parameters.
        return MASState(omega, jax.tree.map(jnp.copy, params), t)

    def after_phase(params, batch_stats, sstate, phase):
        new_omega, _ = importance.mean_over_samples(
            abs_grad_sum, params, batch_stats, phase, batch_size, samples
        )
        return fold(sstate, new_omega, params)

    def penalty(params, sstate):
        value = lam * importance.quadratic(params, sstate.omega, sstate.anchor)
        return value, {"mas_penalty": value}

    return base.Strategy(init=init, penalty=penalty, after_phase=after_phase)
