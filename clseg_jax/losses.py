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


def unbiased_cross_entropy(
    logits: jax.Array, labels: jax.Array, old_mask: jax.Array, mean_over: str = "valid"
) -> jax.Array:
    """MiB's unbiased cross-entropy (Cermelli et al., CVPR 2020). Returns a scalar.

    A pixel labelled background (0) may show a class learned in an earlier step, unlabelled now
    (background shift), so its target probability is that of background *or* any old class::

        -log( sum_{c in {0} u old} p(c) )    for label 0,    -log p(label)    otherwise,

    with ``p`` the softmax over the logits (mask them with ``mask_logits`` first: the classes
    seen so far). Pixels labelled with an old class (settings where old classes keep their
    labels) use their own probability: they are labelled, not shifted. MiB's code maps them to 0
    instead, which changes nothing in its disjoint/overlapped data, where they never occur.
    With an empty ``old_mask`` this is ``cross_entropy``.

    Args:
      logits: ``[..., K]``, e.g. ``[B,H,W,K]``.
      labels: ``[...]`` int; 255 (or ``>= K``) is ignored.
      old_mask: ``bool [K]``, the classes of earlier steps (background may or may not be in it).
      mean_over: "valid" divides by the number of non-ignored pixels (like ``cross_entropy``);
        "all" by every pixel, ignored ones counting 0 (MiB's code: ``reduction='none'`` then
        ``.mean()``).
    """
    if mean_over not in ("valid", "all"):
        raise ValueError(f"mean_over must be 'valid' or 'all', got {mean_over!r}")
    x = logits.astype(jnp.float32)
    num_classes = x.shape[-1]
    valid = (labels != IGNORE) & (labels < num_classes)
    safe = jnp.where(valid, labels, 0)
    group = jnp.asarray(old_mask, bool) | (jnp.arange(num_classes) == 0)  # [K]
    log_den = jax.nn.logsumexp(x, axis=-1)
    log_group = jax.nn.logsumexp(jnp.where(group, x, NEG), axis=-1)
    own = jnp.take_along_axis(x, safe[..., None], axis=-1)[..., 0]
    nll = log_den - jnp.where(safe == 0, log_group, own)
    count = jnp.sum(valid) if mean_over == "valid" else valid.size
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1)


def unbiased_distillation(
    new_logits: jax.Array,
    old_logits: jax.Array,
    old_mask: jax.Array,
    class_mask: jax.Array,
    alpha: float = 1.0,
) -> jax.Array:
    """MiB's unbiased knowledge distillation (Cermelli et al., CVPR 2020). Returns a scalar.

    The old model never saw the new classes: where it says "background", the new model may
    rightly say a new class. So the new model's background probability is taken as that of
    background *or* any new class, and the old model's softmax (over its classes, background
    included) is the target::

        -(1 / |old|) mean_pixels sum_{c in old} q(c) log p_hat(c),
        q = softmax_old(alpha * z_old),  p = softmax_seen(z_new),
        p_hat(0) = p(0) + sum_{c in seen \\ old} p(c),  p_hat(c) = p(c) otherwise.

    The ``1 / |old|`` and ``alpha`` multiplying the old logits only (no ``T^2``) are MiB's code
    (``UnbiasedKnowledgeDistillationLoss``; ``alpha = 1`` there), whose ``loss_kd = 10`` weight
    assumes them. The mean runs over every pixel, labels play no part. An empty ``old_mask``
    gives 0.

    Args:
      new_logits: ``[..., K]`` current model.
      old_logits: ``[..., K]`` frozen previous model (only its ``old_mask`` classes are read).
      old_mask: ``bool [K]``, the classes the old model knew (background included).
      class_mask: ``bool [K]``, the classes the current model may predict (seen so far).
      alpha: multiplies the old logits (> 1 sharpens the targets).
    """
    old_mask = jnp.asarray(old_mask, bool)
    class_mask = jnp.asarray(class_mask, bool)
    num_classes = new_logits.shape[-1]
    background = jnp.arange(num_classes) == 0
    x = jnp.where(class_mask, new_logits.astype(jnp.float32), NEG)
    log_den = jax.nn.logsumexp(x, axis=-1, keepdims=True)
    absorbed = background | (class_mask & ~old_mask)  # background + the classes new since
    log_bg = jax.nn.logsumexp(jnp.where(absorbed, x, NEG), axis=-1, keepdims=True)
    log_p = jnp.where(background, log_bg, x) - log_den  # [..., K]
    z_old = jnp.where(old_mask, alpha * old_logits.astype(jnp.float32), NEG)
    q = jax.nn.softmax(z_old, axis=-1)
    # ``where``: masked classes contribute exact zeros (no 0 * NEG products in the backward pass).
    per_pixel = -jnp.sum(jnp.where(old_mask, q * log_p, 0.0), axis=-1)
    return jnp.mean(per_pixel) / jnp.maximum(jnp.sum(old_mask), 1)
