"""The train step: a pure function of pytrees, compiled once for a whole stream.

``make_train_step`` returns the function; ``jit_train_step`` jits it with explicit shardings
(``array_shardings``) and buffer donation, and ``lower_train_step(...).compile()`` compiles that
ahead of time once per (shapes, strategy); the strategy state and the class mask are arguments,
so no phase of the stream recompiles it. Metrics accumulate on device in a ``clu.metrics``
collection that the host reads only at log steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics as clu_metrics
from flax import nnx

from clseg_jax import losses, sharding, tasks
from clseg_jax.strategies import base

PyTree = Any


class TrainState(NamedTuple):
    """Everything the step updates besides the strategy state."""

    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    step: jax.Array  # int32 [], global step over the whole stream


# Built with ``create`` because clu reads field types from annotations, which
# ``from __future__ import annotations`` turns into strings.
TrainMetrics = clu_metrics.Collection.create(
    loss=clu_metrics.Average.from_output("loss"),
    task_loss=clu_metrics.Average.from_output("task_loss"),
    pixel_accuracy=clu_metrics.Average.from_output("pixel_accuracy"),
)


class Monitor(NamedTuple):
    """Device-side health of the run: the first step whose loss or updated parameters were not
    finite (-1 if none). Parameters are checked too because a finite loss can still produce an
    overflowing update, and such parameters must never be checkpointed."""

    first_bad_step: jax.Array  # int32 []


def new_monitor() -> Monitor:
    return Monitor(first_bad_step=jnp.array(-1, jnp.int32))


def fresh_accumulators(mesh) -> tuple[TrainMetrics, Monitor]:
    """Empty metrics and monitor placed as ``jit_train_step`` returns them (replicated): fresh
    uncommitted ones would give the jitted step a second cache key, so it compiled twice."""
    return sharding.put((TrainMetrics.empty(), new_monitor()), sharding.replicated(mesh))


# ImageNet channel statistics (torchvision's), for backbones converted from ImageNet weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_NORMS = ("symmetric", "imagenet")


def make_forward(graphdef: nnx.GraphDef, input_norm: str = "symmetric") -> base.Forward:
    """Pure forward over ``(params, batch_stats)`` pure-dict pytrees (faster than ``nnx.jit``).

    Pure dicts, not ``nnx.State``: a State's Variables carry the trace they were made in, and the
    step differentiates inside ``jit``.

    uint8 images are normalised: ``"symmetric"`` maps them to [-1, 1]; ``"imagenet"`` to
    ``(x / 255 - mean) / std`` with ImageNet's channel statistics, what a backbone converted from
    torchvision's ImageNet weights expects. Float images (e.g. synthesised ones) are taken as
    they are.
    """
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"unknown input_norm {input_norm!r}; valid: {list(INPUT_NORMS)}")

    def forward(params, batch_stats, images, train):
        if jnp.issubdtype(images.dtype, jnp.integer):
            x = images.astype(jnp.float32)
            if input_norm == "imagenet":
                mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
                std = jnp.asarray(IMAGENET_STD, jnp.float32)
                images = (x / 255.0 - mean) / std
            else:
                images = x / 127.5 - 1.0
        model = nnx.merge(graphdef, params, batch_stats)
        # Losses and strategy state read float32 whatever the model computed in (a bf16
        # precision policy); a no-op for a float32 model.
        outputs = jax.tree.map(_to_float32, model(images, train=train))
        return outputs, nnx.state(model, nnx.BatchStat).to_pure_dict()

    return forward


def _to_float32(x: jax.Array) -> jax.Array:
    """bf16 / f16 up to float32; float32 and float64 (the x64 math tests) as they are."""
    low = jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32
    return x.astype(jnp.float32) if low else x


class PhaseLRState(NamedTuple):
    """Learning-rate schedule state of the current phase (reset on the host at its start)."""

    count: jax.Array  # int32 [], steps taken in this phase
    total: jax.Array  # int32 [], steps in this phase (the schedule's horizon)
    lr: jax.Array  # float32 [], this phase's base learning rate


def scale_by_phase_lr(schedule: str, lr: float, total: int) -> optax.GradientTransformation:
    """``updates * -lr_t`` with ``lr_t`` from ``schedule`` over the *current phase's* steps.

    The base rate and the horizon are state, not constants, so one compiled step serves phases
    of different lengths and base rates (MiB and PLOP train the first step at 0.01 and the
    following ones at 0.001, each with its own poly decay): ``start_phase`` sets them.
    Schedules: ``constant``; ``cosine`` (``lr * (1 + cos(pi t / T)) / 2``, optax's
    ``cosine_decay_schedule``); ``poly`` (``lr * (1 - t / T)^0.9``, DeepLab's).
    """
    if schedule not in ("constant", "cosine", "poly"):
        raise ValueError(f"unknown lr schedule {schedule!r}; valid: constant, cosine, poly")

    def init(params):
        del params
        return PhaseLRState(
            jnp.zeros((), jnp.int32),
            jnp.asarray(max(total, 1), jnp.int32),
            jnp.asarray(lr, jnp.float32),
        )

    def update(updates, state, params=None):
        del params
        frac = jnp.minimum(state.count, state.total) / state.total
        if schedule == "cosine":
            factor = 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        elif schedule == "poly":
            factor = (1.0 - frac) ** 0.9
        else:
            factor = 1.0
        step = -(state.lr * factor)
        updates = jax.tree.map(lambda u: (step * u).astype(u.dtype), updates)
        return updates, state._replace(count=state.count + 1)

    return optax.GradientTransformation(init, update)


def start_phase(opt_state: PyTree, total: int, lr: float) -> PyTree:
    """Resets the phase schedule inside ``opt_state``: ``total`` steps from base rate ``lr``."""

    def reset(s):
        if isinstance(s, PhaseLRState):
            return PhaseLRState(
                jnp.zeros_like(s.count),
                jnp.asarray(max(total, 1), jnp.int32),
                jnp.asarray(lr, jnp.float32),
            )
        return s

    return jax.tree.map(reset, opt_state, is_leaf=lambda s: isinstance(s, PhaseLRState))


def phase_lr(cfg: ml_collections.ConfigDict, phase_index: int) -> float:
    """Base rate of a phase: ``lr`` for the first, ``lr_next`` (if set) for the others."""
    nxt = cfg.get("lr_next", None)
    return float(cfg.lr if phase_index == 0 or nxt is None else nxt)


def make_optimizer(cfg: ml_collections.ConfigDict, steps_per_phase: int):
    """optax optimizer from ``config.optimizer`` (name sgd|adam|adamw, lr, lr_next, schedule ...).

    The learning rate is applied last by ``scale_by_phase_lr`` (initial horizon
    ``steps_per_phase``; the trainer calls ``start_phase`` with each phase's own length).
    """
    lr_tx = scale_by_phase_lr(cfg.schedule, cfg.lr, steps_per_phase)
    wd = cfg.get("weight_decay", 0.0)
    if cfg.name == "sgd":
        momentum = cfg.get("momentum", 0.0)
        nesterov = bool(cfg.get("nesterov", False))
        parts = [optax.trace(decay=momentum, nesterov=nesterov)] if momentum else []
        decay = [optax.add_decayed_weights(wd)] if wd else []
        return optax.chain(*decay, *parts, lr_tx)
    if cfg.name == "adam":
        decay = [optax.add_decayed_weights(wd)] if wd else []
        return optax.chain(*decay, optax.scale_by_adam(), lr_tx)
    if cfg.name == "adamw":
        # optax.adamw: decoupled decay added after Adam's scaling, both times the learning rate.
        return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(wd), lr_tx)
    raise ValueError(f"unknown optimizer {cfg.name!r}; valid: ['adam', 'adamw', 'sgd']")


def make_train_step(
    forward: base.Forward,
    strategy: base.Strategy,
    tx: optax.GradientTransformation,
    task: tasks.Task = tasks.SEGMENTATION,
) -> Callable:
    """``step(state, sstate, metrics, monitor, batch, key, class_mask) -> same first four``.

    One train-mode forward (one BatchNorm update) per step; the strategy adds to or replaces the
    task loss (``task.loss``), may transform the gradients and may update its state from the task
    gradients.
    """

    def loss_parts(params, batch_stats, batch, sstate, key, class_mask):
        outputs, new_stats = forward(params, batch_stats, batch["image"], True)
        logits = losses.mask_logits(outputs["logits"], class_mask)
        outputs = {**outputs, "logits": logits}
        task_loss = task.loss(logits, batch["label"], class_mask)
        inputs = base.LossInputs(params, batch_stats, batch, outputs, task_loss, class_mask)
        value, _ = strategy.loss(inputs, sstate, key)
        total = value if strategy.replaces_task_loss else task_loss + value
        return (total, task_loss), (new_stats, inputs)

    def step(state: TrainState, sstate, metrics, monitor, batch, key, class_mask):
        key = jax.random.fold_in(key, state.step)
        k_batch, k_loss, k_grads = jax.random.split(key, 3)
        batch = strategy.prepare_batch(batch, sstate, k_batch)

        def parts(p):
            return loss_parts(p, state.batch_stats, batch, sstate, k_loss, class_mask)

        (data_loss, task_loss), pullback, (new_stats, inputs) = jax.vjp(
            parts, state.params, has_aux=True
        )
        # The prepared batch itself, not its copy through vjp's aux: a chain's static row owners
        # must stay numpy for the gradient transforms' row views.
        inputs = inputs._replace(batch=batch)
        one, zero = jnp.ones_like(task_loss), jnp.zeros_like(task_loss)
        (grads,) = pullback((one, zero))
        task_grads = None
        if base.needs_task_grads(strategy):
            # Without a data-dependent strategy loss the data gradient *is* the task gradient;
            # otherwise SI-like methods pay a second backward pass for it.
            task_grads = pullback((zero, one))[0] if base.has_data_loss(strategy) else grads
        # Parameter-only penalties (EWC, SI, MAS): elementwise, so their gradient is cheap.
        pen, pen_grads = jax.value_and_grad(lambda p: strategy.penalty(p, sstate)[0])(state.params)
        total = data_loss + pen
        grads = jax.tree.map(jnp.add, grads, pen_grads)
        grads = strategy.transform_grads(grads, inputs, sstate, k_grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        sstate = strategy.on_step(sstate, task_grads, state.params, params)

        metrics = metrics.merge(
            TrainMetrics.single_from_model_output(
                loss=total,
                task_loss=task_loss,
                pixel_accuracy=task.accuracy(inputs.outputs["logits"], batch["label"], class_mask),
            )
        )
        finite = jnp.isfinite(total) & jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])
        )
        bad = ~finite & (monitor.first_bad_step < 0)
        monitor = Monitor(jnp.where(bad, state.step, monitor.first_bad_step))
        new_state = TrainState(params, new_stats, opt_state, state.step + 1)
        return new_state, sstate, metrics, monitor

    return step


def array_shardings(arrays: dict, mesh, rules=()) -> dict:
    """Shardings of a run's arrays ``{"state", "sstate"[, "rng"]}``: params (and their optimizer
    moments) by the config's rules, everything else replicated."""
    repl = sharding.replicated(mesh)
    state = arrays["state"]
    out = {
        "state": TrainState(
            sharding.tree_shardings(state.params, mesh, rules),
            jax.tree.map(lambda _: repl, state.batch_stats),
            sharding.tree_shardings(state.opt_state, mesh, rules),
            repl,
        ),
        "sstate": jax.tree.map(lambda _: repl, arrays["sstate"]),
    }
    if "rng" in arrays:
        out["rng"] = repl
    return out


def jit_train_step(step: Callable, shardings: dict, mesh) -> Callable:
    """``jax.jit`` of a train step with explicit shardings and the carried state donated.

    Batch split over the data axis; key and class mask replicated.
    """
    repl = sharding.replicated(mesh)
    batch_sh = sharding.batch_sharding(mesh)
    metric_sh = jax.tree.map(lambda _: repl, TrainMetrics.empty())
    carried = (shardings["state"], shardings["sstate"], metric_sh, Monitor(repl))
    return jax.jit(
        step,
        in_shardings=(*carried, {"image": batch_sh, "label": batch_sh}, repl, repl),
        out_shardings=carried,
        donate_argnums=(0, 1, 2, 3),
    )


def lower_train_step(
    jitted: Callable,
    arrays: dict,
    mesh,
    batch_size: int,
    image_shape: tuple[int, ...],
    label_shape: tuple[int, ...],
    num_classes: int,
) -> jax.stages.Lowered:
    """A ``jit_train_step`` lowered for ``batch_size`` rows of these shapes (its StableHLO is
    what the precision tests read); ``.compile()`` gives a step that fails on other shapes
    instead of recompiling."""
    batch_sh = sharding.batch_sharding(mesh)
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.uint8, sharding=batch_sh),
        "label": jax.ShapeDtypeStruct((batch_size, *label_shape), jnp.uint8, sharding=batch_sh),
    }
    mask = jax.ShapeDtypeStruct((num_classes,), jnp.bool_, sharding=sharding.replicated(mesh))
    return jitted.lower(
        arrays["state"],
        arrays["sstate"],
        TrainMetrics.empty(),
        new_monitor(),
        batch,
        arrays["rng"],
        mask,
    )
