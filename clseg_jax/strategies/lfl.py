"""Less-Forgetful Learning (Jung, Ju, Jung & Kim, "Less-forgetting Learning in Deep Neural
Networks", arXiv:1607.00122, 2016) for dense prediction.

The model trained on the previous phases is frozen; the current model's features are kept close
to its features on the new data::

    loss = task CE + active * lambda * mean_{b, y, x} sum_c (f(x)[b,y,x,c] - f_old(x)[b,y,x,c])^2

Which features: ``lfl_layer="features"`` (default) is the bottleneck, as in the domain-incremental
UNet study this library started from; ``lfl_layer="penultimate"`` is the input of the classifier
head, Jung et al.'s "last hidden layer" (with ``lfl_freeze_head=True`` this is the paper's method).
In a UNet the skip connections bypass the bottleneck, so constraining it leaves the decoder free:
on the binary shapes stream of the behaviour tests, bottleneck LFL barely changes with lambda
(1 vs 10) while penultimate LFL reduces forgetting.

Normalisation: Jung et al. penalise the squared Euclidean distance between the two feature
*vectors* of an example; in a dense bottleneck ``[B, h, w, C]`` every position holds such a vector,
so the distance is summed over channels and averaged over positions and the batch, which keeps
``lambda`` independent of the image size and batch size (it still scales with the width ``C``).
The default ``lambda = 0.1`` puts a unit drift of a 16-128-channel BatchNorm+ReLU bottleneck at
the scale of the cross-entropy; tune it per model.

The old model runs in eval mode (running statistics, no BatchNorm update, no gradient) inside the
compiled step; with the bottleneck only its encoder is live (XLA drops the unused decoder), with
``penultimate`` all but its head (step cost: bench_strategies.py). With
``lfl_freeze_head=True`` the classifier head (``params["head"]``) gets zero gradients once a phase
has finished, as the paper freezes the softmax layer. Note that only the gradient is zeroed: weight
decay applied by the optimizer after ``transform_grads``, or momentum carried over from an earlier
phase when ``optimizer.reset_per_phase`` is off, would still move it.

State: a ``snapshot.Snapshot`` (a copy of the parameters and batch statistics, ``class_mask
bool [K]`` unused here, ``active float32 []``), inactive until the first phase ends.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from clseg_jax.strategies import base, snapshot

PyTree = Any

DEFAULTS = {"lfl_lambda": 0.1, "lfl_freeze_head": False, "lfl_layer": "features"}

# What each field of DEFAULTS sets (the hyperparameter table of docs/strategies.md).
HELP = {
    "lfl_lambda": (
        "weight lambda of `||f(x) - f_old(x)||^2` (summed over channels, mean over positions) "
        "against the frozen previous model"
    ),
    "lfl_freeze_head": "freeze the classifier head (`params['head']`) after the first phase",
    "lfl_layer": (
        "`features` (the bottleneck) or `penultimate` (the head's input, the paper's last "
        "hidden layer; in a UNet the skips bypass the bottleneck)"
    ),
}
LAYERS = ("features", "penultimate")


def feature_distance(new: jax.Array, old: jax.Array) -> jax.Array:
    """Mean over batch and positions of the squared L2 distance over channels ``[B,h,w,C]``."""
    diff = new.astype(jnp.float32) - old.astype(jnp.float32)
    return jnp.mean(jnp.sum(diff**2, axis=-1))


def make(cfg: ml_collections.ConfigDict, env: base.Env) -> base.Strategy:
    get = lambda key: cfg.get(key, DEFAULTS[key])
    lam, freeze_head, layer = (
        base.hparam(get("lfl_lambda")),
        bool(get("lfl_freeze_head")),
        get("lfl_layer"),
    )
    if layer not in LAYERS:
        raise ValueError(f"lfl_layer must be one of {LAYERS}, got {layer!r}")

    def loss(
        inputs: base.LossInputs, snap: snapshot.Snapshot, key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        del key
        old = snapshot.outputs(env.forward, snap, inputs.batch["image"])
        value = snap.active * lam * feature_distance(inputs.outputs[layer], old[layer])
        return value, {"lfl": value}

    def transform_grads(
        grads: PyTree, inputs: base.LossInputs, snap: snapshot.Snapshot, key: jax.Array
    ) -> PyTree:
        del inputs, key
        if "head" not in grads:
            raise ValueError("lfl_freeze_head: the model has no params['head'] to freeze")
        # A product, not a branch: one compiled step serves the first phase and the later ones.
        keep = 1.0 - snap.active
        head = jax.tree.map(lambda g: g * keep.astype(g.dtype), grads["head"])
        return {**grads, "head": head}

    return base.Strategy(
        init=snapshot.initializer(env.num_classes),
        loss=loss,
        transform_grads=transform_grads if freeze_head else base.Strategy().transform_grads,
        after_phase=snapshot.after_phase,
    )
