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


def binary_cross_entropy(logits: jax.Array, targets: jax.Array, class_mask: jax.Array) -> jax.Array:
    """Multi-label loss: per-class sigmoid cross-entropy, mean over the counted entries.

    Args:
      logits: ``[B,K]``.
      targets: ``[B,K]`` 0/1, 255 = ignore (padding rows).
      class_mask: ``bool [K]``; only these classes count (PyTorch's ``BCEWithLogitsLoss`` over
        the head of the classes seen so far).

    Returns a scalar; 0 when nothing counts.
    """
    valid = (targets != IGNORE) & class_mask
    y = jnp.where(valid, targets, 0).astype(jnp.float32)
    x = logits.astype(jnp.float32)
    # log(1 + exp(-|x|)) + max(x, 0) - x y: the stable form of -[y log s(x) + (1-y) log(1-s(x))].
    per = jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))
    return jnp.sum(jnp.where(valid, per, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def multilabel_accuracy(logits: jax.Array, targets: jax.Array, class_mask: jax.Array) -> jax.Array:
    """Fraction of counted entries (see ``binary_cross_entropy``) where ``logit > 0`` matches."""
    valid = (targets != IGNORE) & class_mask
    hit = ((logits > 0) == (targets == 1)) & valid
    return jnp.sum(hit) / jnp.maximum(jnp.sum(valid), 1)


def binary_distillation(
    new_logits: jax.Array, old_logits: jax.Array, class_mask: jax.Array
) -> jax.Array:
    """Multi-label distillation: sigmoid cross-entropy of the new logits against the old model's
    sigmoid outputs as soft targets, mean over rows and the classes in ``class_mask`` (the old
    model's). Logits ``[B,K]``; returns a scalar, 0 with an empty mask."""
    target = jax.nn.sigmoid(old_logits.astype(jnp.float32))
    x = new_logits.astype(jnp.float32)
    per = jnp.maximum(x, 0.0) - x * target + jnp.log1p(jnp.exp(-jnp.abs(x)))
    # Subtract the targets' own entropy so a perfect match scores 0 (a KL, like ``distillation``).
    t = jnp.clip(target, 1e-7, 1 - 1e-7)
    per = per + t * jnp.log(t) + (1 - t) * jnp.log1p(-t)
    count = jnp.maximum(jnp.sum(class_mask) * x.shape[0], 1)
    return jnp.sum(jnp.where(class_mask, per, 0.0)) / count
