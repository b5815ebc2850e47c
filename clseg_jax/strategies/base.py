"""The strategy interface: a continual-learning method as a NamedTuple of pure functions.

Like optax's ``GradientTransformation``, a ``Strategy`` holds functions and no state; its
state (``SState``) is a pytree of fixed-shape arrays that the trainer passes *into* the compiled
step as an argument, so one compiled step serves a whole stream. The hooks, in the order the
trainer calls them:

    sstate = init(params, batch_stats)                      # once
    for phase in schedule(num_experiences):                  # what data each phase trains on
        params, sstate = before_phase(params, batch_stats, sstate, phase)     # host: e.g. head init
        for each step (inside jit):
            batch = prepare_batch(batch, sstate, key)        # replay / synthetic rows
            outputs = model(batch, train=True)               # ONE forward with BN update
            loss, metrics = loss(LossInputs, sstate, key)    # added to the task CE, or replaces it
            pen, metrics = penalty(params, sstate)           # parameter-only (EWC, SI, MAS)
            grads = transform_grads(grads, LossInputs, sstate, key)           # GEM, A-GEM, PPI
            sstate = on_step(sstate, task_grads, old_params, new_params)      # SI path integral
        sstate = after_phase(params, batch_stats, sstate, phase)              # Fisher, memory
        evaluate                         # scores = predict(outputs, sstate) if set, else logits

A strategy that needs a frozen previous model keeps its parameters in ``sstate`` and calls the
``forward`` it was built with in eval mode (``train=False``), which reads running statistics and
updates none. Regularisers that depend on the parameters alone go in ``penalty``: their gradient is
taken apart from the data backward pass, so an ``on_step`` (SI, RWalk) costs nothing extra
unless some strategy also adds a data-dependent ``loss`` (then a second backward pass gives the
task gradient). A strategy that classifies by other means than the head's logits (iCaRL's
nearest mean of exemplars) sets ``predict``: the compiled evaluation step then takes the strategy
state as an argument and scores with it. ``chain`` composes strategies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clseg_jax import sharding, stopping, tasks

PyTree = Any
Batch = dict[str, jax.Array]  # "image" [B,H,W,3] uint8, "label" [B,H,W] int (255 = ignore)
# forward(params, batch_stats, images [B,H,W,3] float, train) -> (outputs, new_batch_stats);
# outputs = {"logits": [B,H,W,K], "features": [B,h,w,C], ...}.
Forward = Callable[[PyTree, PyTree, jax.Array, bool], tuple[dict[str, jax.Array], PyTree]]
# predict(eval-mode outputs, sstate) -> scores shaped like outputs["logits"]; argmax = prediction.
Predict = Callable[[dict[str, jax.Array], PyTree], jax.Array]


class Phase(NamedTuple):
    """One training phase: one experience, or a union of experiences (cumulative, joint).

    Attributes:
      index: position in the schedule (row of the accuracy matrix).
      experiences: indices of the experiences whose training data this phase uses.
      new_classes: classes labelled for the first time in this phase.
      seen_classes: classes labelled in this or any earlier phase.
      class_mask: ``bool [K]``, classes the model may predict during this phase (= seen).
      batches: ``batches(batch_size) -> iterator`` over this phase's training data (full passes,
        no augmentation, last batch kept; rows ``{"image", "label"}`` as numpy) for host-side work
        between phases (Fisher, importance, memory selection).
    """

    index: int
    experiences: tuple[int, ...]
    new_classes: tuple[int, ...]
    seen_classes: tuple[int, ...]
    class_mask: np.ndarray
    batches: Callable[[int], Iterator[dict[str, np.ndarray]]]


class LossInputs(NamedTuple):
    """What a strategy's loss and gradient transform see inside the compiled step.

    Attributes:
      params: the parameters being differentiated.
      batch_stats: normalisation statistics *before* this step (for eval-mode forwards).
      batch: the (prepared) batch; "image" is already float and normalised.
      outputs: the current model's train-mode outputs; "logits" are class-masked.
      task_loss: scalar pixel cross-entropy of ``outputs["logits"]`` against the labels.
      class_mask: ``bool [K]``, classes the model may predict now.
    """

    params: PyTree
    batch_stats: PyTree
    batch: Batch
    outputs: dict[str, jax.Array]
    task_loss: jax.Array
    class_mask: jax.Array


class Env(NamedTuple):
    """What a strategy factory may know about the run: ``make(cfg, env) -> Strategy``.

    Attributes:
      forward: the model's pure forward function.
      num_classes: size of the model head (the stream's label set, background included).
      num_experiences: length of the stream (an upper bound on the number of phases), for
        strategies that keep one fixed-size slot per experience.
      image_shape: one training image's shape as the step sees it, ``(H, W, 3)``.
      label_shape: one label's shape: ``(H, W)`` masks, ``()`` class ids, ``(K,)`` multi-hot.
      seed: the run's seed, for host-side randomness between phases (memory selection).
      task: what is predicted (``tasks.Task``): its loss is the one memory gradients use.
      class_names: one name per class id (replay sources find a class's folder by its name).
      graphdef: the model's NNX graph definition, for strategies that need more than
        ``forward`` (DeepInversion captures BatchNorm input moments); None if unknown.
      input_norm: how ``forward`` normalises uint8 images ("symmetric": to [-1, 1]).
      stop: ``stop() -> bool``, whether the run was asked to stop; a hook that loops for long
        (synthesis) checks it and raises ``stopping.Stopped``.
      conv_impl: who computes the model's convolutions (``"xla"`` or ``"onednn"``), for a
        strategy that convolves with model parameters itself (PLOP's head).
    """

    forward: Forward
    num_classes: int
    num_experiences: int
    image_shape: tuple[int, ...] = ()
    label_shape: tuple[int, ...] = ()
    seed: int = 0
    task: tasks.Task = tasks.SEGMENTATION
    class_names: tuple[str, ...] = ()
    graphdef: Any = None
    input_norm: str = "symmetric"
    stop: Callable[[], bool] = stopping.never
    conv_impl: str = "xla"


def hparam(value: Any) -> float | jax.Array:
    """A float hyperparameter as a strategy keeps it: a Python float, or, inside an ensemble's
    step, the member's traced value (``clseg_jax/members.py``), which must then be used only in
    arithmetic (not in a shape or a Python branch)."""
    return value if isinstance(value, jax.Array) else float(value)


def _init(params, batch_stats):
    del params, batch_stats
    return ()


def _before_phase(params, batch_stats, sstate, phase):
    del batch_stats, phase
    return params, sstate


def _prepare_batch(batch, sstate, key):
    del sstate, key
    return batch


def _loss(inputs, sstate, key):
    del inputs, sstate, key
    return 0.0, {}


def _penalty(params, sstate):
    del params, sstate
    return 0.0, {}


def _transform_grads(grads, inputs, sstate, key):
    del inputs, sstate, key
    return grads


def _on_step(sstate, task_grads, old_params, new_params):
    del task_grads, old_params, new_params
    return sstate


def _after_phase(params, batch_stats, sstate, phase):
    del params, batch_stats, phase
    return sstate


def has_data_loss(strategy: Strategy) -> bool:
    """Whether ``strategy.loss`` adds anything to (or replaces) the task loss."""
    return strategy.loss is not _loss


def needs_task_grads(strategy: Strategy) -> bool:
    """Whether ``strategy.on_step`` is defined, and so receives d(task loss)/d(params) (SI,
    RWalk); otherwise the step passes None and computes nothing for it."""
    return strategy.on_step is not _on_step


def appends_rows(strategy: Strategy) -> bool:
    """Whether ``strategy.prepare_batch`` is defined (it appends replayed or synthetic rows)."""
    return strategy.prepare_batch is not _prepare_batch


def place_like(new: PyTree, old: PyTree, cast: bool = True) -> PyTree:
    """``new`` (host or device values) placed, and typed unless ``cast=False``, as ``old``'s
    leaves are.

    The one placement helper for strategy state: a hook's new state then matches what the
    compiled step, the evaluator and the next chained member's compiled passes were built for,
    and nothing recompiles. Host values go to ``old``'s sharding when it is committed, else to
    the default device (``device_put``, not ``jnp.asarray``, which compiles a staging program per
    new shape).
    """

    def put(x, like):
        if not isinstance(like, jax.Array):
            return x
        dtype = like.dtype if cast else None
        if isinstance(x, jax.Array):
            if dtype is not None and x.dtype != dtype:
                x = x.astype(dtype)
        else:
            x = np.asarray(x, dtype)
        return sharding.put(x, like.sharding) if like.committed else jax.device_put(x)

    return jax.tree.map(put, new, old)


def one_per_experience(num_experiences: int) -> tuple[tuple[int, ...], ...]:
    """The default schedule: phase i trains on experience i alone."""
    return tuple((i,) for i in range(num_experiences))


class Strategy(NamedTuple):
    """A continual-learning method; see the module docstring for when each hook runs.

    Signatures (``SState`` = the strategy's pytree state, arrays of fixed shapes):
      init(params, batch_stats) -> SState
      before_phase(params, batch_stats, SState, Phase) -> (params, SState)        host side
      prepare_batch(Batch, SState, key) -> Batch                                   in jit
      loss(LossInputs, SState, key) -> (scalar, dict[str, scalar])                 in jit
      penalty(params, SState) -> (scalar, dict[str, scalar])                       in jit
      transform_grads(grads, LossInputs, SState, key) -> grads                     in jit
      on_step(SState, task_grads, old_params, new_params) -> SState                in jit
      after_phase(params, batch_stats, SState, Phase) -> SState                    host side
      schedule(num_experiences) -> tuple of tuples of experience indices, one per phase
      replaces_task_loss: ``loss`` returns the whole objective (MiB, PLOP, BCE heads)
      predict(outputs, SState) -> scores                                           in jit (eval)
        optional evaluation rule (iCaRL's nearest mean of exemplars): ``outputs`` are the raw
        eval-mode outputs, ``scores`` have the logits' shape ``[B,K]`` / ``[B,H,W,K]`` and are
        class-masked and argmaxed by the evaluator; None = argmax of the logits
    """

    init: Callable = _init
    before_phase: Callable = _before_phase
    prepare_batch: Callable = _prepare_batch
    loss: Callable = _loss
    penalty: Callable = _penalty
    transform_grads: Callable = _transform_grads
    on_step: Callable = _on_step
    after_phase: Callable = _after_phase
    schedule: Callable[[int], tuple[tuple[int, ...], ...]] = one_per_experience
    replaces_task_loss: bool = False
    predict: Predict | None = None


OWNER = "owner"  # the batch key chain adds: int8 [rows], 0 = the experience's own rows
PRIVATE = "_private"  # and the keys each member added, one dict per member, as it left them


def _rows(tree, idx: np.ndarray | slice, total: int):
    """The rows ``idx`` of every leaf whose leading axis has ``total`` rows; others as they are."""
    take = lambda x: x[idx] if getattr(x, "ndim", 0) and x.shape[0] == total else x
    return jax.tree.map(take, tree)


def _view_index(owner: np.ndarray, member: int, appends: bool) -> np.ndarray | slice:
    """Which rows member ``member`` (0-based) sees: the experience's rows and its own if it
    appends rows, else every row. A slice where contiguous (a cheaper slice than a gather)."""
    if not appends:
        return slice(None)
    idx = np.flatnonzero((owner == 0) | (owner == member + 1))
    if len(idx) and np.array_equal(idx, np.arange(len(idx))):
        return slice(0, len(idx))
    return idx


def chain(*strategies: Strategy, names: tuple[str, ...] = ()) -> Strategy:
    """Composes strategies: losses add, gradient transforms apply in order, states form a tuple.

    At most one member may replace the task loss (it would otherwise be counted twice or lost) and
    at most one may change the schedule or define ``predict`` (the evaluation rule).

    Rows that members append to a batch (``prepare_batch``: replay, DER, iCaRL, RECALL,
    DeepInversion, CCSI) carry their owner: the chained batch holds a static ``owner`` array
    (0 for the experience's rows, ``i + 1`` for member ``i``'s), and a member that appends rows
    sees, in ``prepare_batch``, ``loss`` and ``transform_grads``, exactly the experience's rows
    followed by its own, as if it were alone; keys it added to the batch come back to it as it
    left them. Members that append nothing see every row. So appended rows count through the
    task loss (and through non-appending members' losses, e.g. MiB's, which see them) and
    through their owner's loss, never through another appender's. A member that replaces the
    task loss and appends rows cannot be chained with another appender that does not replace it:
    that one's rows count only through the task loss, which would be gone.

    ``names``: the members' names, for error messages.
    """
    if len(strategies) == 1:
        return strategies[0]
    names = tuple(names) or tuple(f"member {i}" for i in range(len(strategies)))
    if sum(s.replaces_task_loss for s in strategies) > 1:
        raise ValueError("chain: at most one strategy may replace the task loss")
    schedules = {s.schedule for s in strategies} - {one_per_experience}
    if len(schedules) > 1:
        raise ValueError("chain: at most one strategy may change the phase schedule")
    predictor = [i for i, s in enumerate(strategies) if s.predict is not None]
    if len(predictor) > 1:
        raise ValueError("chain: at most one strategy may define predict (the evaluation rule)")
    replacer = next((i for i, s in enumerate(strategies) if s.replaces_task_loss), None)
    appends = [appends_rows(s) for s in strategies]
    if replacer is not None and appends[replacer]:
        for i in range(len(strategies)):
            if appends[i] and i != replacer:
                raise ValueError(
                    f"chain: {names[i]}'s rows count only through the task loss, which "
                    f"{names[replacer]} replaces (it trains on its own rows alone); chain "
                    f"{names[replacer]} with strategies that append no rows"
                )

    def init(params, batch_stats):
        return tuple(s.init(params, batch_stats) for s in strategies)

    def before_phase(params, batch_stats, sstate, phase):
        new = []
        for s, st in zip(strategies, sstate, strict=True):
            params, out = s.before_phase(params, batch_stats, st, phase)
            # The next member's hooks (and their compiled passes) see one placement.
            new.append(place_like(out, st))
        return params, tuple(new)

    def prepare_batch(batch, sstate, key):
        keys = jax.random.split(key, len(strategies))
        b = batch["image"].shape[0]  # the experience's rows stay first
        owner = np.zeros(b, np.int8)
        shared = list(batch)
        private: list[dict] = [{} for _ in strategies]
        for i, (s, st, k) in enumerate(zip(strategies, sstate, keys, strict=True)):
            if not appends[i]:
                continue
            # Before appending, a member's rows are the experience's alone.
            out = s.prepare_batch({key_: batch[key_][:b] for key_ in shared}, st, k)
            n = out["image"].shape[0] - b
            for key_ in shared:
                if out[key_].shape[0] != b + n:
                    raise ValueError(
                        f"chain: {names[i]} left batch[{key_!r}] with {out[key_].shape[0]} rows, "
                        f"not {b + n}: a strategy that appends rows extends every per-row key"
                    )
            # The experience's rows as this member left them (RECALL relabels them), then the
            # rows of earlier appenders, then this member's.
            batch = {
                key_: jnp.concatenate([out[key_][:b], batch[key_][b:], out[key_][b:]])
                for key_ in shared
            }
            owner = np.concatenate([owner, np.full(n, i + 1, np.int8)])
            private[i] = {key_: v for key_, v in out.items() if key_ not in shared}
        return {**batch, OWNER: owner, PRIVATE: tuple(private)}

    def member_inputs(inputs: LossInputs, i: int) -> LossInputs:
        """Member ``i``'s view of the chained batch and outputs."""
        batch = inputs.batch
        if OWNER not in batch:  # no member appended rows
            return inputs
        owner = batch[OWNER]
        idx = _view_index(owner, i, appends[i])
        total = len(owner)
        shared = {k: v for k, v in batch.items() if k not in (OWNER, PRIVATE)}
        view = {**_rows(shared, idx, total), **batch[PRIVATE][i]}
        return inputs._replace(batch=view, outputs=_rows(inputs.outputs, idx, total))

    def loss(inputs, sstate, key):
        keys = jax.random.split(key, len(strategies))
        total, metrics = 0.0, {}
        for i, (s, st, k) in enumerate(zip(strategies, sstate, keys, strict=True)):
            value, m = s.loss(member_inputs(inputs, i), st, k)
            total = total + value
            metrics.update(m)
        # With a replacer, ``total`` is its objective plus the others' penalties.
        return total, metrics

    def penalty(params, sstate):
        total, metrics = 0.0, {}
        for s, st in zip(strategies, sstate, strict=True):
            value, m = s.penalty(params, st)
            total = total + value
            metrics.update(m)
        return total, metrics

    def transform_grads(grads, inputs, sstate, key):
        keys = jax.random.split(key, len(strategies))
        for i, (s, st, k) in enumerate(zip(strategies, sstate, keys, strict=True)):
            grads = s.transform_grads(grads, member_inputs(inputs, i), st, k)
        return grads

    def on_step(sstate, task_grads, old_params, new_params):
        return tuple(
            s.on_step(st, task_grads, old_params, new_params)
            for s, st in zip(strategies, sstate, strict=True)
        )

    def after_phase(params, batch_stats, sstate, phase):
        return tuple(
            place_like(s.after_phase(params, batch_stats, st, phase), st)
            for s, st in zip(strategies, sstate, strict=True)
        )

    def predict(outputs, sstate):
        i = predictor[0]
        return strategies[i].predict(outputs, sstate[i])

    # Keep a default hook where no member overrides it: the step derives what to compile from
    # them (has_data_loss, needs_task_grads, appends_rows).
    return Strategy(
        init=init,
        before_phase=before_phase,
        prepare_batch=prepare_batch if any(appends) else _prepare_batch,
        loss=loss if any(has_data_loss(s) for s in strategies) else _loss,
        penalty=penalty,
        transform_grads=transform_grads,
        on_step=on_step if any(needs_task_grads(s) for s in strategies) else _on_step,
        after_phase=after_phase,
        schedule=next(iter(schedules), one_per_experience),
        replaces_task_loss=replacer is not None,
        predict=predict if predictor else None,
    )
