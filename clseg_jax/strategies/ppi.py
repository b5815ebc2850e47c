"""PPI: continual learning as Pareto improvement ("Projection as Pareto Improvement", the
multi-label class-incremental seed), for multi-label streams.

The objective is the current task's binary cross-entropy over its own classes only. Every past
task k contributes a constraint instead of a loss: g_k, the gradient of its loss on the *current*
batch over its own classes: by default the sigmoid cross-entropy against the frozen previous
model's outputs (the LwF variant, ``ppi_targets="old_model"``), or against the batch's labels of
those classes (``"labels"``). The shared parameters' gradient is projected as in GEM
(``solvers.qp.gem_project``, margin ``ppi_margin`` = 1.0), so that to first order no past task's
loss rises: the distillation acts only through the constraints.

Task-specific parameters are the classifier's columns (``params["head"]``, classes on the last
axis). The seed updates each task's head with its own loss before each shared-parameter step; here
the two happen in the same step (the head gradient of past task k is g_k's head part, the current
task's head follows the objective), so one compiled step still does all of it.

Cost per step: one more forward (train-mode normalisation, statistics update dropped) and one
backward per past task (``jax.vjp`` once, pulled back against each task's one-hot cotangent).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.flatten_util import ravel_pytree

from clseg_jax import losses
from clseg_jax.solvers import qp
from clseg_jax.strategies import base, snapshot

PyTree = Any

DEFAULTS = {"ppi_margin": 1.0, "ppi_eps": 1e-3, "ppi_targets": "old_model"}

# What each field of DEFAULTS sets (the hyperparameter table of docs/strategies.md).
HELP = {
    "ppi_margin": "margin of the GEM projection of the shared parameters' gradient (`v >= margin`)",
    "ppi_eps": "ridge on `G G^T` in the QP",
    "ppi_targets": (
        "past tasks' constraint losses against `old_model` (the previous model's sigmoid "
        "outputs, the LwF variant) or the batch's `labels`"
    ),
}
TARGETS = ("old_model", "labels")


class PPIState(NamedTuple):
    snap: snapshot.Snapshot  # the model after the previous phase
    task_of_class: jax.Array  # int32 [K], phase that introduced each class (-1: not yet)
    current: jax.Array  # int32 [], the phase being trained


def head_mask(params: PyTree) -> PyTree:
    """bool arrays shaped like ``params``: True in the classifier (``params["head"]``), the
    task-specific part."""
    return {
        k: jax.tree.map(lambda x, h=(k == "head"): jnp.full(x.shape, h), v)
        for k, v in params.items()
    }


def task_losses(logits, targets, task_of_class, num_rows: int, current) -> jax.Array:
    """``[num_rows]``: per past task k < current, the mean sigmoid cross-entropy of ``logits
    [B,K]`` against ``targets [B,K]`` (probabilities) over task k's classes; 0 for other rows."""
    x = logits.astype(jnp.float32)
    per = jnp.maximum(x, 0.0) - x * targets + jnp.log1p(jnp.exp(-jnp.abs(x)))  # [B,K]
    rows = jnp.arange(num_rows)
    member = (task_of_class[None, :] == rows[:, None]) & (rows[:, None] < current)  # [R,K]
    member = member.astype(jnp.float32)
    return member @ per.mean(axis=0) / jnp.maximum(member.sum(axis=1), 1.0)


def make(cfg: ml_collections.ConfigDict, env: base.Env) -> base.Strategy:
    if env.task.name != "multilabel":
        raise ValueError(f"ppi needs a multi-label stream, got a {env.task.name} one")
    if cfg.ppi_targets not in TARGETS:
        raise ValueError(f"unknown ppi_targets {cfg.ppi_targets!r}; valid: {list(TARGETS)}")
    rows = max(env.num_experiences - 1, 1)

    def init(params, batch_stats):
        return PPIState(
            snapshot.empty(params, batch_stats, env.num_classes),
            jnp.full((env.num_classes,), -1, jnp.int32),
            jnp.zeros((), jnp.int32),
        )

    def before_phase(params, batch_stats, st, phase):
        del batch_stats
        task_of_class = np.asarray(st.task_of_class).copy()
        task_of_class[list(phase.new_classes)] = phase.index
        return params, st._replace(
            task_of_class=jnp.asarray(task_of_class), current=jnp.asarray(phase.index, jnp.int32)
        )

    def current_mask(st, class_mask):
        return class_mask & (st.task_of_class == st.current)

    def loss(inputs, st, key):
        del key
        value = losses.binary_cross_entropy(
            inputs.outputs["logits"], inputs.batch["label"], current_mask(st, inputs.class_mask)
        )
        return value, {"ppi_objective": value}

    def transform_grads(grads, inputs, st, key):
        del key
        images, labels = inputs.batch["image"], inputs.batch["label"]
        if cfg.ppi_targets == "old_model":
            old = snapshot.outputs(env.forward, st.snap, images)["logits"]
            targets = jax.nn.sigmoid(old.astype(jnp.float32))
        else:
            targets = jnp.where(labels == losses.IGNORE, 0, labels).astype(jnp.float32)

        def constraint_losses(p):
            out, _ = env.forward(p, inputs.batch_stats, images, True)
            logits = losses.mask_logits(out["logits"], inputs.class_mask)
            return task_losses(logits, targets, st.task_of_class, rows, st.current)

        _, pullback = jax.vjp(constraint_losses, inputs.params)
        G_tree = jax.vmap(pullback)(jnp.eye(rows))[0]
        G = jax.vmap(lambda t: ravel_pytree(t)[0])(G_tree)  # [rows, n]
        g, unravel = ravel_pytree(grads)
        head = ravel_pytree(head_mask(grads))[0]  # [n] bool
        valid = jnp.arange(rows) < st.current
        shared = qp.gem_project(
            jnp.where(head, 0.0, g), jnp.where(head, 0.0, G), valid, cfg.ppi_margin, cfg.ppi_eps
        )
        own_heads = jnp.sum(jnp.where(valid[:, None] & head[None, :], G, 0.0), axis=0)
        return unravel(jnp.where(head, g + own_heads, shared))

    def after_phase(params, batch_stats, st, phase):
        return st._replace(snap=snapshot.take(params, batch_stats, phase.class_mask))

    return base.Strategy(
        init=init,
        before_phase=before_phase,
        loss=loss,
        transform_grads=transform_grads,
        after_phase=after_phase,
        replaces_task_loss=True,
    )
