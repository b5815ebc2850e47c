"""Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2018) for dense prediction.

The model trained on the previous phases is frozen; on each new batch its logits are distilled
into the current model, per pixel, over the classes it knew::

    loss = task CE + active * alpha * T^2 * mean_pixels KL(softmax(z_old / T) || softmax(z / T))

with both softmaxes restricted to ``snap.class_mask`` (``losses.distillation``). Li & Hoiem record
the old network's responses once before training; since that network is frozen, running it inside
the compiled step (eval mode: running statistics, no BatchNorm update, no gradient) gives the same
targets without a pass over the data between phases. Defaults: ``alpha = 1`` and ``T = 2`` as in
the paper (lambda_o = 1, T = 2).

The current model's logits are masked to the classes seen so far; the old model's classes are a
subset of those in class-incremental streams, so every distilled class is a live output.

Multi-label tasks distil per class instead (``losses.binary_distillation``: the old sigmoid
outputs as soft targets, no temperature), the multi-label LwF of the PPI paper's baselines.

State: a ``snapshot.Snapshot`` (a copy of the parameters and batch statistics, ``class_mask
bool [K]``, ``active float32 []``), inactive until the first phase ends, so the loss is exactly 0
during the first phase without a Python branch.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from clseg_jax import losses
from clseg_jax.strategies import base, snapshot

PyTree = Any

DEFAULTS = {"lwf_alpha": 1.0, "lwf_temperature": 2.0}

# What each field of DEFAULTS sets (the hyperparameter table of docs/strategies.md).
HELP = {
    "lwf_alpha": (
        "weight alpha of `alpha * T^2 * KL(softmax(z_old/T) || softmax(z/T))` over the classes "
        "the old model knew (multi-label: per-class sigmoid distillation)"
    ),
    "lwf_temperature": "distillation temperature T",
}


def make(cfg: ml_collections.ConfigDict, env: base.Env) -> base.Strategy:
    alpha, temperature = base.hparam(cfg.lwf_alpha), base.hparam(cfg.lwf_temperature)

    def loss(
        inputs: base.LossInputs, snap: snapshot.Snapshot, key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        del key
        old = snapshot.outputs(env.forward, snap, inputs.batch["image"])
        if env.task.name == "multilabel":
            kd = losses.binary_distillation(
                inputs.outputs["logits"], old["logits"], snap.class_mask
            )
        else:
            kd = losses.distillation(
                inputs.outputs["logits"], old["logits"], snap.class_mask, temperature
            )
        value = snap.active * alpha * kd
        return value, {"lwf": value}

    return base.Strategy(
        init=snapshot.initializer(env.num_classes),
        loss=loss,
        after_phase=snapshot.after_phase,
    )
