"""``build(config) -> Parts``: the one public builder of a run's parts.

Stream, model, strategy, phases, mesh, datasets, optimizer and the placed initial arrays, built
the same way for ``train.run``, the tests, the experiments and the service. Nothing here trains
or compiles the step (``compile_step`` does, when asked).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from clseg_jax import (
    data,
    evaluate,
    members,
    models,
    precision,
    results,
    sharding,
    stopping,
    strategies,
    tasks,
)
from clseg_jax import step as step_lib
from clseg_jax.data import base as data_base
from clseg_jax.data import phases as phases_lib
from clseg_jax.kernels import select
from clseg_jax.models import weights
from clseg_jax.strategies import base


class Parts(NamedTuple):
    """The parts of one run.

    Attributes:
      config: the run's config.
      stream: the stream of experiences.
      graphdef: the model's NNX graph definition.
      forward: the model's pure forward function (``base.Forward``).
      task: what is predicted and how it is scored.
      env: what the strategy was built with.
      strategy: the (possibly chained) strategy.
      phases: the strategy's schedule as phases.
      mesh: the device mesh.
      shardings: ``{"state", "sstate", "rng"}`` placements (``step.array_shardings``).
      datasets: one grain training dataset per phase (``len`` = its number of steps).
      tx: the optimizer; ``tx_init`` its jitted ``init``.
      arrays: the initial ``{"state": TrainState, "sstate", "rng"}``, placed.
      evaluator: scores parameters on the stream's test sets.
      task_il: each experience is also scored task-incrementally (``eval_task_il`` or
        ``task_incremental``; classification only).
    """

    config: ml_collections.ConfigDict
    stream: data_base.Stream
    graphdef: nnx.GraphDef
    forward: base.Forward
    task: tasks.Task
    env: base.Env
    strategy: base.Strategy
    phases: list[base.Phase]
    mesh: Mesh
    shardings: dict
    datasets: list[grain.MapDataset]
    tx: optax.GradientTransformation
    tx_init: Callable
    arrays: dict
    evaluator: evaluate.Evaluator
    task_il: bool


def validate_names(config: ml_collections.ConfigDict) -> None:
    """Fails fast, before any data is built, on names that no registry knows."""
    strategies.names(config.strategy.name)
    if config.data.name not in data.DATASETS:
        raise ValueError(f"unknown dataset {config.data.name!r}; valid: {sorted(data.DATASETS)}")
    if config.model.name not in models.MODELS:
        raise ValueError(f"unknown model {config.model.name!r}; valid: {sorted(models.MODELS)}")
    precision.check(config.get("precision", "float32"))
    members.make(config)  # the ensemble's fields (one-line errors)


def _check_model_fits_task(name: str, stream: data_base.Stream, task: tasks.Task) -> None:
    """A one-line ``ValueError`` when the model's output (per image or per pixel) is not what
    the stream's labels ask for, before anything is compiled."""
    per_image = task.name != "segmentation"
    if per_image == (name in models.IMAGE_MODELS):
        return
    fits = sorted(models.IMAGE_MODELS if per_image else set(models.MODELS) - models.IMAGE_MODELS)
    labels = "a class per image" if per_image else "a class per pixel"
    raise ValueError(
        f"model {name!r} does not fit the {stream.name!r} stream: its labels give {labels} "
        f"({task.name}); models that do: {fits}"
    )


def model_config(config: ml_collections.ConfigDict, devices: int) -> ml_collections.ConfigDict:
    """``config.model`` with the precision's dtype and ``conv_impl`` resolved for a mesh of
    ``devices`` (``kernels/select.py``)."""
    policy = config.get("precision", "float32")
    out = precision.model_config(config.model, policy).copy_and_resolve_references()
    dtype = str(out.kwargs.get("dtype", None) or "float32")
    impl = config.model.get("conv_impl", "xla")
    out.conv_impl = select.resolve(impl, dtype=dtype, devices=devices)
    return out


def init_model(
    model_cfg: ml_collections.ConfigDict, num_classes: int, seed: int
) -> tuple[nnx.GraphDef, Any, Any]:
    """``(graphdef, params, batch_stats)``, from ``model.pretrained`` weights when set."""
    graphdef, params, batch_stats = models.init(model_cfg, num_classes, seed=seed)
    pretrained = model_cfg.get("pretrained", None)
    if pretrained and pretrained.get("path"):
        # A backbone from an ImageNet classifier (``into``), or a whole model of the same
        # layout under a head with another class count (``skip_head``).
        params, batch_stats = weights.load(
            os.path.expanduser(pretrained.path),
            params,
            batch_stats,
            skip_head=bool(pretrained.get("skip_head", True)),
            into=pretrained.get("into", None) or None,
        )
    return graphdef, params, batch_stats


def row_shapes(stream: data_base.Stream, crop: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """One training row's image and label shapes after a ``crop`` (0: none)."""
    example = stream.experiences[0].train[0]
    image, label = np.shape(example["image"]), np.shape(example["label"])
    if crop and len(label) == 2:
        return (crop, crop, 3), (crop, crop)
    if crop:
        return (crop, crop, 3), label
    return image, label


def make_env(
    stream: data_base.Stream,
    forward: base.Forward,
    graphdef: nnx.GraphDef | None = None,
    *,
    seed: int = 0,
    max_experiences: int = 0,
    input_norm: str = "symmetric",
    crop: int = 0,
    stop: Callable[[], bool] = stopping.never,
    conv_impl: str = "xla",
) -> base.Env:
    """What a strategy built for this stream may know (``base.Env``).

    ``max_experiences``: a fixed upper bound on the stream length (0: its own length), so that
    strategy state keeps its shapes while a stream grows. ``stop``: whether the run was asked
    to stop (``Env.stop``).
    """
    image_shape, label_shape = row_shapes(stream, crop)
    n_exp = len(stream.experiences)
    if max_experiences and n_exp > max_experiences:
        raise ValueError(
            f"the stream has {n_exp} experiences but config.max_experiences is {max_experiences}"
        )
    return base.Env(
        forward,
        stream.num_classes,
        max_experiences or n_exp,
        image_shape=image_shape,
        label_shape=label_shape,
        seed=seed,
        task=tasks.for_stream(stream.kind, label_shape),
        class_names=tuple(stream.class_names),
        graphdef=graphdef,
        input_norm=input_norm,
        stop=stop,
        conv_impl=conv_impl,
    )


def build(
    config: ml_collections.ConfigDict,
    make_strategy: Callable[[base.Env], base.Strategy] | None = None,
    stream: data_base.Stream | None = None,
    stop: Callable[[], bool] = stopping.never,
) -> Parts:
    """The parts of the run ``config`` describes.

    Args:
      config: a run config (``clseg_jax.config.base_config`` and a config file's fields).
      make_strategy: builds the strategy from the env instead of the registry (tests inject
        strategies with test doubles this way).
      stream: the stream, if the caller already built it from ``config.data``.
      stop: whether the run was asked to stop, for hooks that loop for long (``Env.stop``).
    """
    validate_names(config)
    mesh = sharding.make_mesh(config.sharding.mesh)
    model_cfg = model_config(config, mesh.size)
    stream = stream if stream is not None else data.make(config.data)
    label_shape = row_shapes(stream, config.augment.crop)[1]
    _check_model_fits_task(config.model.name, stream, tasks.for_stream(stream.kind, label_shape))
    graphdef, params, batch_stats = init_model(model_cfg, stream.num_classes, config.seed)
    input_norm = config.model.get("input_norm", "symmetric")
    forward = step_lib.make_forward(graphdef, input_norm)
    env = make_env(
        stream,
        forward,
        graphdef,
        seed=config.seed,
        max_experiences=int(config.get("max_experiences", 0) or 0),
        input_norm=input_norm,
        crop=config.augment.crop,
        stop=stop,
        conv_impl=model_cfg.conv_impl,
    )
    task_il = bool(config.get("eval_task_il", False) or config.get("task_incremental"))
    if task_il and env.task.name != "classification":
        raise ValueError(
            f"eval_task_il / task_incremental need a classification stream; "
            f"{stream.name!r} is {env.task.name}"
        )
    strategy = make_strategy(env) if make_strategy else strategies.make(config.strategy, env)
    phases = phases_lib.make(
        stream,
        strategy.schedule(len(stream.experiences)),
        task_incremental=bool(config.get("task_incremental", False)),
    )
    datasets = [
        phases_lib.train_dataset(stream, p, config, jax.process_index(), jax.process_count())
        for p in phases
    ]
    tx = step_lib.make_optimizer(config.optimizer, max(len(d) for d in datasets))
    # One program each: run eagerly, every per-leaf op compiles separately (EWC's state took
    # ~140 tiny compiles, seconds on a CPU).
    tx_init = jax.jit(tx.init)
    state = step_lib.TrainState(params, batch_stats, tx_init(params), jnp.array(0, jnp.int32))
    arrays = {
        "state": state,
        "sstate": jax.jit(strategy.init)(params, batch_stats),
        "rng": jax.random.PRNGKey(config.seed),
    }
    shardings = step_lib.array_shardings(arrays, mesh, config.sharding.param_rules)
    evaluator = evaluate.make(
        forward, stream, mesh, config.eval_batch_size, env.task, predict=strategy.predict
    )
    return Parts(
        config,
        stream,
        graphdef,
        forward,
        env.task,
        env,
        strategy,
        phases,
        mesh,
        shardings,
        datasets,
        tx,
        tx_init,
        sharding.put(arrays, shardings),
        evaluator,
        task_il,
    )


def jit_step(parts: Parts) -> Callable:
    """The run's train step under ``jax.jit`` with its shardings and donation (not yet
    compiled: a changed shape or placement would recompile, which tests count)."""
    step = step_lib.make_train_step(parts.forward, parts.strategy, parts.tx, parts.task)
    return step_lib.jit_train_step(step, parts.shardings, parts.mesh)


def compile_step(parts: Parts) -> Callable:
    """The run's train step compiled ahead of time; a call with other shapes fails instead of
    recompiling."""
    return lower_step(parts).compile()


def lower_step(parts: Parts) -> jax.stages.Lowered:
    """The run's train step lowered for its batch shapes (``.as_text()``: its StableHLO)."""
    cfg = parts.config
    return step_lib.lower_train_step(
        jit_step(parts),
        parts.arrays,
        parts.mesh,
        cfg.batch_size,
        parts.env.image_shape,
        parts.env.label_shape,
        parts.stream.num_classes,
    )


def begin_phase(
    parts: Parts, state: step_lib.TrainState, sstate, phase: base.Phase, steps: int | None = None
):
    """The strategy's ``before_phase``, the optimizer's phase start (fresh state if
    ``optimizer.reset_per_phase``, the phase's length ``steps`` (default: its dataset's) and
    rate), everything placed where the compiled step expects it. Returns ``(state, sstate)``."""
    cfg = parts.config.optimizer
    params, sstate = parts.strategy.before_phase(state.params, state.batch_stats, sstate, phase)
    opt_state = parts.tx_init(params) if cfg.reset_per_phase else state.opt_state
    opt_state = step_lib.start_phase(
        opt_state,
        total=len(parts.datasets[phase.index]) if steps is None else steps,
        lr=step_lib.phase_lr(cfg, phase.index),
    )
    state = state._replace(params=params, opt_state=opt_state)
    # Hooks run on the host and may return arrays placed anywhere.
    return sharding.put((state, sstate), (parts.shardings["state"], parts.shardings["sstate"]))


def end_phase(parts: Parts, state: step_lib.TrainState, sstate, phase: base.Phase):
    """The strategy's ``after_phase``, its state placed where the compiled step expects it."""
    sstate = parts.strategy.after_phase(state.params, state.batch_stats, sstate, phase)
    return sharding.put(sstate, parts.shardings["sstate"])


# The rest of the room functions ``train.run`` calls; ``clseg_jax/ensemble.py`` has an
# ensemble's.


def feed_sharding(parts: Parts):
    """Where a training batch goes: split over the data axis."""
    return sharding.batch_sharding(parts.mesh)


def fresh_accumulators(parts: Parts):
    """Empty train metrics and monitor, placed as the step returns them."""
    return step_lib.fresh_accumulators(parts.mesh)


def summarize(parts: Parts, progress: results.Progress, compile_count: int) -> dict:
    """The results dict of a finished run (``results.summarize``)."""
    return results.summarize(
        progress,
        config=parts.config,
        stream=parts.stream,
        phases=parts.phases,
        task=parts.task,
        compile_count=compile_count,
    )
