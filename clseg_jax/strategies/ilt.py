"""ILT: Incremental Learning Techniques for semantic segmentation (Michieli & Zanuttigh, ICCV
Workshops 2019; official TensorFlow code LTTM/IL-SemSegm), as MiB's repository reimplements it
(fcdl94/MiB, ``--method ILT``), the version the MiB, PLOP and RECALL tables report.

The model of the previous phase is frozen; two distillation terms are added to the task loss::

    loss = task CE + active * (ilt_kd * L_D + ilt_de * L_E)

- ``L_D`` (output level, the paper's L'_D): per pixel, the old model's softmax over the classes
  it knew (background included) against the current model's softmax over the same classes,
  averaged over those classes and over every pixel (MiB's ``KnowledgeDistillationLoss``:
  ``mean`` over classes, ``alpha = 1``, no temperature, as ILT's ``tau = 1``). Written here as
  ``losses.distillation`` (a KL, T = 1) over the old classes divided by their number: the same
  gradient as MiB's cross-entropy form, 0 when the two models agree (the logged value differs
  from MiB's by the old softmax's entropy over the class count).
- ``L_E`` (feature level, the paper's L'_E): the squared L2 distance between the old and new
  encoder outputs ``outputs["features"]`` (MiB: ``features['body']``, the backbone output),
  averaged over every element (``nn.MSELoss``, like ILT's ``tf.losses.mean_squared_error``).

Defaults: ``ilt_kd = 100`` and ``ilt_de = 100`` from MiB's ``--method ILT`` preset (``loss_kd`` and
``loss_de``). ILT's own scripts weight one term at a time (``lambda_distillation`` 1 for the output
KD, 50 for the features, VOC 19-1); the combined weights are MiB's choice.

State: a ``snapshot.Snapshot``, inactive until the first phase ends, so both terms are exactly 0
in the first phase without a Python branch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from clseg_jax import losses
from clseg_jax.strategies import base, snapshot

PyTree = Any

DEFAULTS = {"ilt_kd": 100.0, "ilt_de": 100.0}

# What each field of DEFAULTS sets (the hyperparameter table of docs/strategies.md).
HELP = {
    "ilt_kd": "weight of the output distillation over the old classes (MiB's reimplementation)",
    "ilt_de": "weight of the L2 distillation of the encoder features (MiB's reimplementation)",
}


def output_distillation(
    new_logits: jax.Array, old_logits: jax.Array, old_mask: jax.Array
) -> jax.Array:
    """ILT's L'_D: ``mean_pixels KL(softmax_old(z_old) || softmax_old(z)) / |old|``, a scalar."""
    kd = losses.distillation(new_logits, old_logits, old_mask, 1.0)
    return kd / jnp.maximum(jnp.sum(old_mask), 1)


def feature_distillation(new: jax.Array, old: jax.Array) -> jax.Array:
    """ILT's L'_E: mean over every element of ``(new - old)^2``, ``[B,h,w,C]`` -> scalar."""
    return jnp.mean((new.astype(jnp.float32) - old.astype(jnp.float32)) ** 2)


def make(cfg: ml_collections.ConfigDict, env: base.Env) -> base.Strategy:
    get = lambda key: cfg.get(key, DEFAULTS[key])
    kd_weight, de_weight = base.hparam(get("ilt_kd")), base.hparam(get("ilt_de"))
    if env.task.name == "multilabel":
        raise ValueError("ilt distils softmax outputs: not for multilabel tasks")

    def loss(
        inputs: base.LossInputs, snap: snapshot.Snapshot, key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        del key
        old = snapshot.outputs(env.forward, snap, inputs.batch["image"])
        kd = kd_weight * output_distillation(
            inputs.outputs["logits"], old["logits"], snap.class_mask
        )
        de = de_weight * feature_distillation(inputs.outputs["features"], old["features"])
        kd, de = snap.active * kd, snap.active * de
        return kd + de, {"ilt_kd": kd, "ilt_de": de}

    return base.Strategy(
        init=snapshot.initializer(env.num_classes),
        loss=loss,
        after_phase=snapshot.after_phase,
    )
