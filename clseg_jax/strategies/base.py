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
taken apart from the data backward pass, so ``needs_task_grads`` (SI, RWalk) costs nothing extra
unless some strategy also adds a data-dependent ``loss`` (then a second backward pass gives the
task gradient). A strategy that classifies by other means than the head's logits (iCaRL's
nearest mean of exemplars) sets ``predict``: the compiled evaluation step then takes the strategy
state as an argument and scores with it. ``chain`` composes strategies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np

from clseg_jax import tasks

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
      needs_task_grads: ``on_step`` receives d(task loss)/d(params), else None
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
    needs_task_grads: bool = False
    predict: Predict | None = None


def chain(*strategies: Strategy) -> Strategy:
    """Composes strategies: losses add, gradient transforms apply in order, states form a tuple.

    At most one member may replace the task loss (it would otherwise be counted twice or lost) and
    at most one may change the schedule or define ``predict`` (the evaluation rule).
    """
    if len(strategies) == 1:
        return strategies[0]
    if sum(s.replaces_task_loss for s in strategies) > 1:
        raise ValueError("chain: at most one strategy may replace the task loss")
    schedules = {s.schedule for s in strategies} - {one_per_experience}
    if len(schedules) > 1:
        raise ValueError("chain: at most one strategy may change the phase schedule")
    predictor = [i for i, s in enumerate(strategies) if s.predict is not None]
    if len(predictor) > 1:
        raise ValueError("chain: at most one strategy may define predict (the evaluation rule)")
    replacer = next((i for i, s in enumerate(strategies) if s.replaces_task_loss), None)

    def init(params, batch_stats):
        return tuple(s.init(params, batch_stats) for s in strategies)

    def before_phase(params, batch_stats, sstate, phase):
        new = []
        for s, st in zip(strategies, sstate, strict=True):
            params, st = s.before_phase(params, batch_stats, st, phase)
            new.append(st)
        return params, tuple(new)

    def prepare_batch(batch, sstate, key):
        keys = jax.random.split(key, len(strategies))
        for s, st, k in zip(strategies, sstate, keys, strict=True):
            batch = s.prepare_batch(batch, st, k)
        return batch

    def loss(inputs, sstate, key):
        keys = jax.random.split(key, len(strategies))
        total, metrics = 0.0, {}
        for s, st, k in zip(strategies, sstate, keys, strict=True):
            value, m = s.loss(inputs, st, k)
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
        for s, st, k in zip(strategies, sstate, keys, strict=True):
            grads = s.transform_grads(grads, inputs, st, k)
        return grads

    def on_step(sstate, task_grads, old_params, new_params):
        return tuple(
            s.on_step(st, task_grads, old_params, new_params)
            for s, st in zip(strategies, sstate, strict=True)
        )

    def after_phase(params, batch_stats, sstate, phase):
        return tuple(
            s.after_phase(params, batch_stats, st, phase)
            for s, st in zip(strategies, sstate, strict=True)
        )

    def predict(outputs, sstate):
        i = predictor[0]
        return strategies[i].predict(outputs, sstate[i])

    return Strategy(
        init=init,
        before_phase=before_phase,
        prepare_batch=prepare_batch,
        # Keep the default when no member adds a data loss: the trainer then reuses the data
        # gradient as the task gradient (see has_data_loss).
        loss=loss if any(has_data_loss(s) for s in strategies) else _loss,
        penalty=penalty,
        transform_grads=transform_grads,
        on_step=on_step,
        after_phase=after_phase,
        schedule=next(iter(schedules), one_per_experience),
        replaces_task_loss=replacer is not None,
        needs_task_grads=any(s.needs_task_grads for s in strategies),
        predict=predict if predictor else None,
    )
