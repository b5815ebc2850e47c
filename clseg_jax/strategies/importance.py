"""Shared machinery for parameter-importance passes between phases (EWC's Fisher, MAS's Omega).

An importance pass runs a jitted per-batch function over ``phase.batches(batch_size)`` until
``num_samples`` samples have been seen. Every batch is padded to exactly ``batch_size`` rows with a
0/1 sample weight (the phase's last batch may be smaller, and the sample budget may end inside a
batch), so the per-batch function compiles once for the whole stream. Per-sample gradients are
``jax.vmap(jax.grad(f))``: one vectorised backward pass per batch, no Python loop over samples.
On several devices each sums its own rows of a batch, each process feeding only its rows
(``clseg_jax.rows``).

The passes run the model in eval mode (``train=False``): in train mode BatchNorm would normalise
each sample by its own statistics (a degenerate one-sample batch, and a different function from the
one evaluated and protected), and would update the running statistics as a side effect. Logits are
class-masked with the phase's ``class_mask`` so that unseen classes are excluded as in training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clseg_jax import losses, rows
from clseg_jax.strategies import base

PyTree = Any
# sample_fn(params, batch_stats, class_mask, image [H,W,3], label [H,W]) -> scalar
SampleFn = Callable[[PyTree, PyTree, jax.Array, jax.Array, jax.Array], jax.Array]


def eval_logits(
    forward: base.Forward, params: PyTree, batch_stats: PyTree, images: jax.Array, class_mask
) -> jax.Array:
    """Class-masked logits ``[B,H,W,K]`` in eval mode (see the module docstring for why)."""
    out, _ = forward(params, batch_stats, images, False)
    return losses.mask_logits(out["logits"], class_mask)


def sample_log_likelihood(forward: base.Forward) -> SampleFn:
    """A sample's log-likelihood: the mean over its non-ignored pixels of log p(label | image)."""

    def fn(params, batch_stats, class_mask, image, label):
        logits = eval_logits(forward, params, batch_stats, image[None], class_mask)
        return -losses.cross_entropy(logits, label[None])

    return fn


def per_sample_grads(fn: Callable[..., jax.Array], params: PyTree, *batched: jax.Array) -> PyTree:
    """``d fn(params, *row) / d params`` for every row of ``batched``: leaves ``[b, *p.shape]``."""
    in_axes = (None,) + (0,) * len(batched)
    return jax.vmap(jax.grad(fn), in_axes=in_axes)(params, *batched)


def make_per_sample_sum(
    sample_fn: SampleFn, transform: Callable[[jax.Array], jax.Array]
) -> rows.Sum:
    """``acc + sum_i w_i * transform(grad_i)`` over one padded batch (e.g. square, abs)."""

    def batch_sum(params, batch_stats, class_mask, images, labels, weights):
        fn = lambda p, x, y: sample_fn(p, batch_stats, class_mask, x, y)
        grads = per_sample_grads(fn, params, images, labels)
        return jax.tree.map(lambda g: jnp.tensordot(weights, transform(g), axes=1), grads)

    return rows.Sum(batch_sum, whole=3)


def make_batch_grad_sum(
    sample_fn: SampleFn, transform: Callable[[jax.Array], jax.Array]
) -> rows.Sum:
    """``acc + n_b * transform(grad of the batch's mean sample_fn)`` (n_b = sum of weights).

    With ``batch_size=1`` this equals ``make_per_sample_sum``: a batch's objective is the mean of
    its samples' objectives, and each batch counts as many times as it has samples. Split over
    devices as the gradient of the weighted sum and the weight (both add up over row blocks); the
    mean and the transform come after the blocks are added.
    """

    def batch_sum(params, batch_stats, class_mask, images, labels, weights):
        def total(p):
            values = jax.vmap(lambda x, y: sample_fn(p, batch_stats, class_mask, x, y))(
                images, labels
            )
            return jnp.sum(weights * values)

        return jax.grad(total)(params), jnp.sum(weights)

    def finalize(parts):
        grad_sum, n = parts
        return jax.tree.map(lambda g: n * transform(g / jnp.maximum(n, 1.0)), grad_sum)

    return rows.Sum(batch_sum, whole=3, finalize=finalize)


def _pad(x: np.ndarray, n: int, fill: int) -> np.ndarray:
    return np.concatenate([x, np.full((n, *x.shape[1:]), fill, x.dtype)])


def padded_batches(
    phase: base.Phase, batch_size: int, num_samples: int
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """``(batch, weights)`` with exactly ``batch_size`` rows; ``weights`` float32 ``[b]`` is 1 for
    the first ``num_samples`` samples of the phase and 0 for padding and samples past the budget."""
    seen = 0
    for batch in phase.batches(batch_size):
        if seen >= num_samples:
            return
        b = len(batch["label"])
        weights = np.zeros(batch_size, np.float32)
        weights[: min(b, num_samples - seen)] = 1.0
        seen += b
        pad = batch_size - b
        if pad:
            # Padding rows are all-ignore: zero weight and, for batch objectives, no pixels.
            batch = {"image": _pad(batch["image"], pad, 0), "label": _pad(batch["label"], pad, 255)}
        yield batch, weights


def quadratic(params: PyTree, weight: PyTree, center: PyTree) -> jax.Array:
    """``sum_i weight_i (params_i - center_i)^2`` over every leaf: the penalties' common form."""
    terms = jax.tree.map(lambda p, w, c: jnp.sum(w * (p - c) ** 2), params, weight, center)
    return sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


@jax.jit
def _zeros(tree: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, tree)


@jax.jit
def _divide(tree: PyTree, n: jax.Array) -> PyTree:
    return jax.tree.map(lambda a: a / jnp.maximum(n, 1.0), tree)


def mean_over_samples(
    batch_fn: rows.Sum,
    params: PyTree,
    batch_stats: PyTree,
    phase: base.Phase,
    batch_size: int,
    num_samples: int,
) -> tuple[PyTree, int]:
    """Runs ``batch_fn`` over the phase's first ``num_samples`` samples; returns the accumulated
    sum divided by the number of samples used (zeros if the phase has none) and that number."""
    # Placed as params are, so the first call and the later ones (given batch_fn's output) share
    # one compiled program.
    acc = base.place_like(_zeros(params), params)
    mask = np.asarray(phase.class_mask, bool)
    mesh = rows.mesh_for(params, batch_size)
    n = 0
    for batch, weights in padded_batches(phase, batch_size, num_samples):
        split = [rows.feed(x, mesh) for x in (batch["image"], batch["label"], weights)]
        acc = batch_fn(acc, params, batch_stats, mask, *split, mesh=mesh)
        n += int(weights.sum())
    # An array, not a Python number: a new value must not become a new compiled constant.
    return _divide(acc, np.float32(n)), n
