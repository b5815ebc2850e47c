"""Cosine linear classifier (Hou et al., CVPR 2019, "Learning a Unified Classifier Incrementally
via Rebalancing" (LUCIR); the head of CCSI, Ayromlou et al., MICCAI 2022 / arXiv 2406.05631).

``logits_k = sigma * <w_k / ||w_k||, f / ||f||>`` for ``f [B,C]`` and a kernel ``W [C,K]`` whose
column ``k`` is class ``k``'s weight ``w_k``. Both vectors are L2-normalised, so every logit lies
in ``[-sigma, sigma]`` whatever the norms of old and new classes' weights: the bias of a linear
head towards classes trained with more (new) data disappears. ``sigma`` is one learnable scalar
that sets the softmax's sharpness.

Defaults from the official code (CCSI's and LUCIR's ``modified_linear.CosineLinear``): the
kernel uniform in ``+-1/sqrt(C)`` (PyTorch's ``stdv = 1 / sqrt(in_features)``) and ``sigma = 1``.
Normalisation divides by ``max(||x||, 1e-12)``, as ``torch.nn.functional.normalize``.

Parameters: ``kernel [C,K]`` (the same name and layout as ``nnx.Linear``'s, so class-incremental
code that edits ``params["head"]["kernel"]`` works for both heads) and ``sigma []``; no bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clseg_jax.models import layers

EPS = 1e-12  # torch.nn.functional.normalize's default


def safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
    """``||x||_2`` along ``axis`` (kept), with gradient 0 instead of NaN at ``x = 0``.

    A pooled ReLU feature can be exactly zero; ``sqrt``'s infinite slope there would turn the
    whole gradient into NaN even where the result is multiplied by 0.
    """
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """``x / max(||x||_2, EPS)`` along ``axis`` (``torch.nn.functional.normalize``)."""
    return x / jnp.maximum(safe_norm(x, axis), EPS)


def cosine_scores(features: jax.Array, kernel: jax.Array) -> jax.Array:
    """Unscaled cosines ``<w_k/|w_k|, f/|f|>`` in [-1, 1]: ``[B,C], [C,K] -> [B,K]``."""
    f = normalize(features.astype(jnp.float32), axis=-1)
    w = normalize(kernel.astype(jnp.float32), axis=0)  # column k is class k
    return f @ w


class CosineLinear(nnx.Module):
    """``[B,C] -> [B,K]``: ``sigma * cosine_scores(x, kernel)`` (module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rngs: nnx.Rngs,
        sigma_init: float = 1.0,
    ):
        init = layers.torch_uniform(in_features)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features)))
        self.sigma = nnx.Param(jnp.asarray(sigma_init, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        # float32 whatever the activations' dtype: the logits are at most sigma apart, and bf16
        # would round away the differences between classes.
        return self.sigma[...] * cosine_scores(x, self.kernel[...])
