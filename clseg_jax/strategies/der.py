"""DER++ (Buzzega et al., NeurIPS 2020, "Dark Experience for General Continual Learning").

A reservoir memory keeps rows with the logits the model gave them; every step trains on::

    loss = task CE(new batch)
         + alpha * MSE(current logits, stored logits)   on one replayed minibatch
         + beta  * task CE(current logits, stored labels) on a second, independently drawn one

in ONE forward: ``prepare_batch`` appends the two minibatches (``der_batch`` rows each, so the step
sees ``[B + 2n]`` rows) and puts their stored logits and masks under extra batch keys; ``loss``
slices the step's logits into the three parts. The CE terms are the stream's task loss
(softmax CE; sigmoid BCE for multi-label), so segmentation ``[B,H,W,K]`` and classification
``[B,K]`` logits both work; the MSE runs over every pixel.

The MSE covers, per row, only the classes its logits were recorded for (the class mask of the
phase that stored it, looked up from the row's ``exp``) that are also live now: current logits
outside the class mask are ``NEG``. It is a mean over those entries (rows x pixels x classes),
where the reference averages over the whole head. Replayed rows while the memory is empty are
copies of new rows with ignored labels and no recorded classes: they add exactly 0.

Deviation: the reference offers each training batch to the reservoir as it arrives, storing the
train-mode logits of that moment; here a phase's rows enter the reservoir when it ends (same
uniform law, ``memory.selection``), so stored logits are the end-of-phase model's, in eval mode.

Defaults: mammoth's best arguments for seq-mnist with a 200-row buffer (``utils/best_args.py``:
alpha 0.2, beta 1.0). Mammoth replays 128 rows against stream batches of 10; ``der_batch`` = 32
here, like ``replay_batch``.

Must be the last strategy that appends rows in a chain: its rows are the batch's last ``2n``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clseg_jax import rows
from clseg_jax.memory import buffer, update
from clseg_jax.strategies import base, replay

PyTree = Any

DEFAULTS = {
    "der_mem_size": 200,  # rows in the reservoir (mammoth seq-mnist buffer 200)
    "der_batch": 32,  # rows per replayed minibatch; two minibatches per step
    "der_alpha": 0.2,  # weight of the logit MSE (mammoth seq-mnist, buffer 200)
    "der_beta": 1.0,  # weight of the replayed-label CE (mammoth seq-mnist, buffer 200)
}

# What each field of DEFAULTS sets (the hyperparameter table of docs/strategies.md).
HELP = {
    "der_mem_size": "rows in the reservoir (mammoth seq-mnist buffer 200)",
    "der_batch": "rows per replayed minibatch; two minibatches per step",
    "der_alpha": "weight of the MSE to the stored logits (mammoth seq-mnist, buffer 200)",
    "der_beta": (
        "weight of the task loss on the second minibatch's stored labels (mammoth seq-mnist, "
        "buffer 200)"
    ),
}


class DerState(NamedTuple):
    memory: buffer.Buffer  # extra["logits"]: float32 [M,*L,K], eval-mode logits at storage time
    phase_classes: jax.Array  # bool [E,K]: class mask of each phase (what a row's logits cover)


def _logits_fn(forward: base.Forward) -> update.RowFn:
    def fn(params, batch_stats, images):
        out, _ = forward(params, batch_stats, images, False)
        return {"logits": out["logits"].astype(jnp.float32)}

    return rows.Map(fn, whole=2)


def make(cfg: ml_collections.ConfigDict, env: base.Env) -> base.Strategy:
    size, n = int(cfg.der_mem_size), int(cfg.der_batch)
    alpha, beta = base.hparam(cfg.der_alpha), base.hparam(cfg.der_beta)
    if not 1 <= n <= size:
        raise ValueError(f"der_batch must be in 1..der_mem_size={size}, got {n}")
    row_fn = _logits_fn(env.forward)
    task = env.task

    def init(params: PyTree, batch_stats: PyTree) -> DerState:
        image = jax.ShapeDtypeStruct((1, *env.image_shape), jnp.uint8)
        out = jax.eval_shape(lambda x: env.forward(params, batch_stats, x, False)[0], image)
        extra = {"logits": (out["logits"].shape[1:], jnp.float32)}
        return DerState(
            buffer.empty(size, env.image_shape, env.label_shape, extra),
            jnp.zeros((env.num_experiences, env.num_classes), bool),
        )

    def prepare_batch(batch: base.Batch, st: DerState, key: jax.Array) -> base.Batch:
        k_logits, k_labels = jax.random.split(key)
        sampled, ok = buffer.sample(st.memory, k_logits, n)
        # A row's logits cover its phase's classes; empty slots cover none (exp = -1).
        classes = st.phase_classes[jnp.maximum(sampled["exp"], 0)] & ok[:, None]  # [n,K]
        out = buffer.append_replay(batch, sampled, ok)
        out = buffer.append_replay(out, *buffer.sample(st.memory, k_labels, n))
        return {**out, "der_logits": sampled["logits"], "der_classes": classes}

    def loss(inputs: base.LossInputs, st: DerState, key: jax.Array):
        del st, key
        batch, logits = inputs.batch, inputs.outputs["logits"]
        # The experience's rows, then the n logit rows and the n label rows (chained, DER sees
        # its own rows only: ``base.chain``).
        b = logits.shape[0] - 2 * n
        labels = batch["label"]
        ce_new = task.loss(logits[:b], labels[:b], inputs.class_mask)
        ce_mem = task.loss(logits[b + n :], labels[b + n :], inputs.class_mask)
        mse = masked_mse(
            logits[b : b + n], batch["der_logits"], batch["der_classes"] & inputs.class_mask
        )
        value = ce_new + alpha * mse + beta * ce_mem
        return value, {"der_mse": mse, "der_ce_mem": ce_mem}

    def after_phase(params, batch_stats, st: DerState, phase: base.Phase) -> DerState:
        memory = update.update(
            st.memory,
            phase,
            "reservoir",
            replay.memory_rng(env.seed, phase.index, 2),
            num_classes=env.num_classes,
            num_experiences=env.num_experiences,
            params=params,
            batch_stats=batch_stats,
            row_fn=row_fn,
        )
        # On the host: a traced index write would compile once per phase index.
        classes = np.array(st.phase_classes)
        classes[phase.index] = phase.class_mask
        return DerState(memory, jnp.asarray(classes))

    return base.Strategy(
        init=init,
        prepare_batch=prepare_batch,
        loss=loss,
        after_phase=after_phase,
        replaces_task_loss=True,
    )


def masked_mse(logits: jax.Array, stored: jax.Array, classes: jax.Array) -> jax.Array:
    """Mean squared error over the counted entries. Returns a scalar, 0 when none counts.

    Args:
      logits: current ``[n,*L,K]`` (``L`` = ``(H,W)`` for segmentation, ``()`` otherwise).
      stored: recorded ``[n,*L,K]``.
      classes: bool ``[n,K]``, the classes that count for each row (every pixel of the row).
    """
    mask = classes.reshape(classes.shape[0], *(1,) * (logits.ndim - 2), classes.shape[1])
    mask = jnp.broadcast_to(mask, logits.shape)
    diff = jnp.where(mask, logits.astype(jnp.float32) - stored.astype(jnp.float32), 0.0)
    return jnp.sum(diff**2) / jnp.maximum(jnp.sum(mask), 1)
