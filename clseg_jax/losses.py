"""Losses over dense predictions. Shapes: logits ``[B,H,W,K]``, labels ``[B,H,W]`` int.

Labels equal to 255 (or outside ``0..K-1``) are ignored; means are over the valid pixels only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE = 255
# Masked logits get this value instead of -inf so that softmax, KD and their gradients stay finite.
NEG = -1e9


def mask_logits(logits: jax.Array, class_mask: jax.Array) -> jax.Array:
    """Sets logits of classes outside ``class_mask`` (``bool [K]``) to a large negative value."""
    return jnp.where(class_mask, logits, NEG)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Pixel-wise softmax cross-entropy averaged over non-ignored pixels. Returns a scalar.

    An all-ignored batch gives 0 (not NaN): padding batches must not poison the loss.
    """
    num_classes = logits.shape[-1]
    valid = (labels != IGNORE) & (labels < num_classes)
    safe = jnp.where(valid, labels, 0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def pixel_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of non-ignored pixels whose argmax equals the label."""
    valid = (labels != IGNORE) & (labels < logits.shape[-1])
    hit = (jnp.argmax(logits, axis=-1) == labels) & valid
    return jnp.sum(hit) / jnp.maximum(jnp.sum(valid), 1)


def distillation(
    new_logits: jax.Array, old_logits: jax.Array, class_mask: jax.Array, temperature: float
) -> jax.Array:
    """Knowledge distillation (Hinton et al. 2015; LwF, Li & Hoiem 2016). Returns a scalar.

    ``T^2 * mean_pixels KL(softmax(old / T) || softmax(new / T))`` where both softmaxes run over
    the classes in ``class_mask`` (``bool [K]``, the classes the old model knew) only; the other
    classes contribute nothing, whatever their logits (e.g. ``NEG`` from ``mask_logits``). The
    ``T^2`` keeps the gradient's scale independent of the temperature.

    The mean runs over *every* pixel, labels 255 included: the old model's prediction is defined
    on all of them and the labels play no part in distillation. With an empty mask the loss is 0.
    """
    t = jnp.asarray(temperature, jnp.float32)

    def log_probs(logits):
        scaled = jnp.where(class_mask, logits.astype(jnp.float32) / t, NEG)
        return jax.nn.log_softmax(scaled, axis=-1)

    logp_old, logp_new = log_probs(old_logits), log_probs(new_logits)
    # ``where``, not a product with zero probabilities: exact zeros for masked classes, and no
    # NEG - NEG cancellation in the forward or backward pass.
    kl = jnp.sum(jnp.where(class_mask, jnp.exp(logp_old) * (logp_old - logp_new), 0.0), axis=-1)
    return t**2 * jnp.mean(kl)
