"""iCaRL (Rebuffi et al., CVPR 2017, "iCaRL: Incremental Classifier and Representation Learning").

Class-incremental classification with three parts:

- Exemplars: a fixed memory of ``icarl_mem_size`` rows (2000 in the paper, 200 here) split evenly
  over the classes seen; a new class's exemplars are chosen by herding on L2-normalised features,
  an old class keeps the first of its exemplars when its share shrinks (``memory.selection``).
- Representation learning: every step trains on the new batch followed by ``icarl_batch`` replayed
  exemplars (the paper trains on the union of new data and exemplars) with a sigmoid binary
  cross-entropy over the classes seen so far, whose targets are the one-hot label for the classes
  new in this phase and the frozen previous model's sigmoid outputs for the old ones
  (classification + distillation, the paper's Alg. 3)::

      loss = mean_rows sum_{k seen} BCE(sigmoid(z_k), t_k),
      t_k = [y = k] for k new,  sigmoid(z_old_k) for k known to the previous model

  The previous model runs inside the step in eval mode (``snapshot``), like LwF.
- Classification by nearest mean of exemplars (``predict``): after each phase the mean of each
  class's exemplars' L2-normalised features (``outputs["penultimate"]``) is stored, re-normalised,
  in the state (``[K,C]`` + a valid mask); a test image goes to the class whose mean is nearest to
  its normalised feature. Before any phase has ended there are no means and the head's logits
  decide.

Classification streams only (one class id per row).

State: ``IcarlState`` (memory ``Buffer``, previous-model ``Snapshot``, class means ``[K,C]``,
``has_mean bool [K]``): fixed shapes, so the step and the evaluation compile once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clseg_jax import losses
from clseg_jax.memory import buffer, update
from clseg_jax.strategies import base, replay, snapshot

PyTree = Any

DEFAULTS = {
    "icarl_mem_size": 200,  # total exemplars, split over the classes seen (paper: 2000)
    "icarl_batch": 32,  # exemplars replayed per step, added to the new batch
}

# What each field of DEFAULTS sets (the hyperparameter table of docs/strategies.md).
HELP = {
    "icarl_mem_size": "total exemplars, split over the classes seen (paper: 2000)",
    "icarl_batch": "exemplars replayed per step, added to the new batch",
}


class IcarlState(NamedTuple):
    memory: buffer.Buffer  # the exemplars
    snap: snapshot.Snapshot  # the model at the end of the previous phase
    means: jax.Array  # float32 [K,C]: normalised mean of each class's normalised features
    has_mean: jax.Array  # bool [K]


def make(cfg: ml_collections.ConfigDict, env: base.Env) -> base.Strategy:
    if env.task.name != "classification":
        raise ValueError(
            f"icarl needs a classification stream (one class per image); task is {env.task.name!r}"
        )
    size, n = int(cfg.icarl_mem_size), int(cfg.icarl_batch)
    if not 1 <= n <= size:
        raise ValueError(f"icarl_batch must be in 1..icarl_mem_size={size}, got {n}")
    features_fn = update.make_features_fn(env.forward)
    k = env.num_classes

    def init(params: PyTree, batch_stats: PyTree) -> IcarlState:
        image = jax.ShapeDtypeStruct((1, *env.image_shape), jnp.uint8)
        feat = jax.eval_shape(lambda x: features_fn(params, batch_stats, x)["features"], image)
        c = feat.shape[-1]
        return IcarlState(
            buffer.empty(size, env.image_shape, env.label_shape),
            snapshot.empty(params, batch_stats, k),
            jnp.zeros((k, c), jnp.float32),
            jnp.zeros((k,), bool),
        )

    def prepare_batch(batch: base.Batch, st: IcarlState, key: jax.Array) -> base.Batch:
        rows, ok = buffer.sample(st.memory, key, n)
        return buffer.append_replay(batch, rows, ok)

    def loss(inputs: base.LossInputs, st: IcarlState, key: jax.Array):
        del key
        old = snapshot.outputs(env.forward, st.snap, inputs.batch["image"])["logits"]
        value = icarl_loss(
            inputs.outputs["logits"],
            inputs.batch["label"],
            old,
            st.snap.class_mask,
            inputs.class_mask,
        )
        return value, {"icarl_bce": value}

    def after_phase(params, batch_stats, st: IcarlState, phase: base.Phase) -> IcarlState:
        memory = update.update(
            st.memory,
            phase,
            "herding",
            replay.memory_rng(env.seed, phase.index, 3),
            num_classes=k,
            num_experiences=env.num_experiences,
            params=params,
            batch_stats=batch_stats,
            row_fn=features_fn,
        )
        means, has_mean = class_means(memory, features_fn, params, batch_stats, st.means.shape)
        snap = snapshot.take(params, batch_stats, phase.class_mask)
        return IcarlState(memory, snap, jnp.asarray(means), jnp.asarray(has_mean))

    def predict(outputs: dict[str, jax.Array], st: IcarlState) -> jax.Array:
        scores = nme_scores(update.pooled_features(outputs), st.means, st.has_mean)
        # No exemplars yet (before the first phase ends): the head decides.
        return jnp.where(jnp.any(st.has_mean), scores, outputs["logits"].astype(jnp.float32))

    return base.Strategy(
        init=init,
        prepare_batch=prepare_batch,
        loss=loss,
        after_phase=after_phase,
        replaces_task_loss=True,
        predict=predict,
    )


def icarl_loss(
    logits: jax.Array,
    labels: jax.Array,
    old_logits: jax.Array,
    old_classes: jax.Array,
    class_mask: jax.Array,
) -> jax.Array:
    """iCaRL's classification + distillation loss. Returns a scalar (0 if no row counts).

    Args:
      logits: current ``[B,K]`` (class-masked: ``NEG`` outside ``class_mask``).
      labels: int ``[B]``, 255 = ignored row.
      old_logits: the previous model's ``[B,K]``.
      old_classes: bool ``[K]``, classes the previous model knew (distilled; all False at first).
      class_mask: bool ``[K]``, the classes seen so far (the sum runs over these).

    The paper's sum over the seen classes of the sigmoid cross-entropy against ``[y = k]`` for
    classes new now and ``sigmoid(old_logits_k)`` for old ones, averaged over counted rows. (The
    reference code averages over classes too, with a 20x larger learning rate, 2.0; summing keeps
    the gradient on the scale of a softmax cross-entropy, so a stream's learning rate fits.)
    """
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)  # 255 -> all zeros
    target = jnp.where(old_classes, jax.nn.sigmoid(old_logits.astype(jnp.float32)), onehot)
    x = logits.astype(jnp.float32)
    # The stable form of -[t log s(x) + (1-t) log(1-s(x))].
    per = jnp.maximum(x, 0.0) - x * target + jnp.log1p(jnp.exp(-jnp.abs(x)))
    row_ok = labels != losses.IGNORE
    per_row = jnp.sum(jnp.where(class_mask, per, 0.0), axis=-1)
    return jnp.sum(jnp.where(row_ok, per_row, 0.0)) / jnp.maximum(jnp.sum(row_ok), 1)


def nme_scores(features: jax.Array, means: jax.Array, has_mean: jax.Array) -> jax.Array:
    """Nearest-mean-of-exemplars scores: ``-||f/|f| - mu_k||^2`` ``[B,K]``, ``NEG`` without a mean.

    Args:
      features: ``[B,C]``; normalised here.
      means: ``[K,C]``, already normalised.
      has_mean: bool ``[K]``.
    """
    f = features.astype(jnp.float32)
    f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    dist = jnp.sum((f[:, None, :] - means[None]) ** 2, axis=-1)
    return jnp.where(has_mean, -dist, losses.NEG)


def class_means(
    memory: buffer.Buffer, features_fn: update.RowFn, params, batch_stats, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Host side: normalised mean of each class's normalised exemplar features.

    Returns ``means float32 [K,C]`` (``shape``; zeros where a class has no exemplar) and
    ``has_mean bool [K]``.
    """
    num_classes = shape[0]
    host = buffer.to_host(memory)
    valid = np.flatnonzero(host["valid"])
    if not len(valid):
        return np.zeros(shape, np.float32), np.zeros(num_classes, bool)
    feats = update.apply_rows(features_fn, params, batch_stats, host["image"][valid], 64)[
        "features"
    ]
    feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    onehot = np.eye(num_classes, dtype=np.float64)[host["label"][valid].astype(np.int64)]  # [N,K]
    counts = onehot.sum(axis=0)
    sums = onehot.T @ feats  # [K,C]
    means = sums / np.maximum(counts, 1)[:, None]
    means = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    return means.astype(np.float32), counts > 0
