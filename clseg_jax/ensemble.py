"""An ensemble's run: N members of one stream trained as one compiled program.

``build(config) -> Ensemble`` gives what ``setup.build`` gives for one run, with a leading
members axis on every array (parameters, optimizer state, BatchNorm statistics, strategy state,
RNG keys, train metrics) and one ``setup.Parts`` per member: the separate run it equals (its
seed, swept values and data order; ``members.Member.config``). The room functions here
(``compile_step``, ``begin_phase``, ``end_phase``, ``feed_sharding``, ``fresh_accumulators``,
``summarize``) are ``setup``'s for an ensemble, so ``train.run`` drives both alike.

- The step is ``members.vectorize``d over the members axis. Inside it each member's strategy is
  built from ``config.strategy`` with the swept fields replaced by the member's values, passed in
  as a ``float32 [N]`` array; the learning rates are already state (``step.PhaseLRState``).
- Between-phase hooks (Fisher, importances, memory selection, MiB's head init, PLOP's medians,
  synthesis) are host work: they loop over the members, each with its own parts (``env.seed``,
  concrete hyperparameters), and the results are stacked again.
- Evaluation reads every test batch once for all members (``evaluate.Evaluator(members=N)``).
- One checkpoint holds every member; results.json has a ``members`` list and a mean +- std
  table (``summarize``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clseg_jax import data, evaluate, members, results, setup, sharding, stopping, strategies, tasks
from clseg_jax import step as step_lib
from clseg_jax.data import base as data_base
from clseg_jax.strategies import base


class Ensemble(NamedTuple):
    """The parts of an ensemble's run (the fields ``train.run`` reads are ``setup.Parts``').

    Attributes:
      members: who the members are (``members.Member``).
      parts: one ``setup.Parts`` per member (its hooks, its strategy with concrete values).
      hparams: ``{strategy field: float32 [N]}``, the swept strategy fields' member values.
      chunk: members vectorised at a time (``members.vectorize``).
      shared_batch: every member reads the same batches (``[B,...]``), else ``[N,B,...]``.
      Others: as in ``setup.Parts``, with a leading members axis on ``arrays``.
    """

    config: ml_collections.ConfigDict
    stream: data_base.Stream
    task: tasks.Task
    task_il: bool
    phases: list[base.Phase]
    mesh: Mesh
    members: list[members.Member]
    parts: list[setup.Parts]
    datasets: list[grain.MapDataset]
    arrays: dict
    shardings: dict
    hparams: dict[str, jax.Array]
    evaluator: evaluate.Evaluator
    chunk: int
    shared_batch: bool


def stack(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def build(config: ml_collections.ConfigDict, stop: Callable[[], bool] = stopping.never) -> Ensemble:
    """The parts of the ensemble ``config.ensemble`` describes (``members.make``)."""
    setup.validate_names(config)
    ms = members.make(config)
    stream = data.make(config.data)
    parts = [setup.build(m.config, stream=stream, stop=stop) for m in ms]
    p0, n = parts[0], len(ms)
    axis = members.member_axis_size(p0.mesh)
    if n % axis:
        raise ValueError(
            f"{n} ensemble members do not split over the mesh's {members.MEMBER!r} axis of {axis}"
        )
    chunk = members.auto_chunk(int(config.ensemble.chunk), n // axis)
    shared = not config.ensemble.shuffle_per_member
    datasets = (
        p0.datasets
        if shared
        else [_zip([p.datasets[i] for p in parts]) for i in range(len(p0.phases))]
    )
    shardings = jax.tree.map(members.sharded, p0.shardings)
    swept = sorted({f.split(".", 1)[1] for f in ms[0].values if f.startswith("strategy.")})
    hparams = {
        key: jnp.asarray([m.values[f"strategy.{key}"] for m in ms], jnp.float32) for key in swept
    }
    evaluator = evaluate.make(
        p0.forward,
        stream,
        p0.mesh,
        config.eval_batch_size,
        p0.task,
        predict=p0.strategy.predict,
        members=n,
        chunk=chunk,
    )
    return Ensemble(
        config,
        stream,
        p0.task,
        p0.task_il,
        p0.phases,
        p0.mesh,
        ms,
        parts,
        datasets,
        sharding.put(stack([p.arrays for p in parts]), shardings),
        shardings,
        sharding.put(hparams, members.placement(p0.mesh)),
        evaluator,
        chunk,
        shared,
    )


def _zip(datasets: list[grain.MapDataset]) -> grain.MapDataset:
    """Batch i of every member's dataset, stacked: ``[N,B,...]``."""
    return grain.MapDataset.range(len(datasets[0])).map(
        lambda i: jax.tree.map(lambda *xs: np.stack(xs), *(d[i] for d in datasets))
    )


def untraceable(parts: setup.Parts) -> list[str]:
    """The float fields of ``parts``' strategies whose step cannot take them as arrays (each
    traced alone in the one-run step, nothing compiled): ``members.UNSWEEPABLE``'s source."""
    env, cfg = parts.env, parts.config
    sh = sharding.batch_sharding(parts.mesh)
    batch = {
        "image": jax.ShapeDtypeStruct((cfg.batch_size, *env.image_shape), jnp.uint8, sharding=sh),
        "label": jax.ShapeDtypeStruct((cfg.batch_size, *env.label_shape), jnp.uint8, sharding=sh),
    }
    mask = jnp.ones(parts.stream.num_classes, bool)
    carried = (parts.arrays["state"], parts.arrays["sstate"], *setup.fresh_accumulators(parts))
    out = []
    for field in members.float_fields(cfg):
        key = field.split(".", 1)[1]

        def step(value, carried, batch, key=key):
            strategy = strategies.make(members.Overlay(cfg.strategy, {key: value}), env)
            fn = step_lib.make_train_step(parts.forward, strategy, parts.tx, parts.task)
            return fn(*carried, batch, parts.arrays["rng"], mask)

        try:
            jax.eval_shape(step, jnp.float32(cfg.strategy[key]), carried, batch)
        except jax.errors.ConcretizationTypeError:
            out.append(field)
    return out


def _step_fn(e: Ensemble) -> Callable:
    """``step(state, sstate, metrics, monitor, batch, keys, mask, hparams)`` over the members."""
    p0 = e.parts[0]

    def one(state, sstate, metrics, monitor, batch, key, hparams, mask):
        strategy = strategies.make(members.Overlay(p0.config.strategy, hparams), p0.env)
        step = step_lib.make_train_step(p0.forward, strategy, p0.tx, p0.task)
        return step(state, sstate, metrics, monitor, batch, key, mask)

    axes = (0, 0, 0, 0, None if e.shared_batch else 0, 0, 0, None)
    vectorized = members.vectorize(one, axes, len(e.members), e.chunk, e.mesh)

    def step(state, sstate, metrics, monitor, batch, keys, mask, hparams):
        return vectorized(state, sstate, metrics, monitor, batch, keys, hparams, mask)

    return step


def feed_sharding(e: Ensemble) -> NamedSharding:
    """Where a training batch goes: split over the data axis (and the members axis, for
    per-member batches)."""
    if e.shared_batch:
        return sharding.batch_sharding(e.mesh)
    lead = members.MEMBER if members.MEMBER in e.mesh.axis_names else None
    return NamedSharding(e.mesh, PartitionSpec(lead, sharding.DATA))


def fresh_accumulators(e: Ensemble) -> tuple[Any, step_lib.Monitor]:
    """Empty train metrics and monitors, one per member, placed as the step returns them."""
    n = len(e.members)
    empty = (step_lib.TrainMetrics.empty(), step_lib.new_monitor())
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), empty)
    return sharding.put(stacked, members.placement(e.mesh))


def _step_structs(e: Ensemble) -> tuple:
    sh = feed_sharding(e)
    lead = () if e.shared_batch else (len(e.members),)
    b = e.config.batch_size
    env = e.parts[0].env
    batch = {
        "image": jax.ShapeDtypeStruct((*lead, b, *env.image_shape), jnp.uint8, sharding=sh),
        "label": jax.ShapeDtypeStruct((*lead, b, *env.label_shape), jnp.uint8, sharding=sh),
    }
    metrics, monitor = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
        fresh_accumulators(e),
    )
    repl = sharding.replicated(e.mesh)
    mask = jax.ShapeDtypeStruct((e.stream.num_classes,), jnp.bool_, sharding=repl)
    a = e.arrays
    return a["state"], a["sstate"], metrics, monitor, batch, a["rng"], mask, e.hparams


def compile_step(e: Ensemble) -> Callable:
    """The ensemble's step compiled ahead of time, called as one run's
    (``step(state, sstate, metrics, monitor, batch, keys, mask)``)."""
    return _bind(lower_step(e).compile(), e.hparams)


def _bind(compiled: Callable, hparams: dict) -> Callable:
    return lambda *args: compiled(*args, hparams)


def lower_step(e: Ensemble) -> jax.stages.Lowered:
    msh = members.placement(e.mesh)
    metric_sh = jax.tree.map(lambda _: msh, step_lib.TrainMetrics.empty())
    carried = (e.shardings["state"], e.shardings["sstate"], metric_sh, step_lib.Monitor(msh))
    batch_sh = feed_sharding(e)
    jitted = jax.jit(
        _step_fn(e),
        in_shardings=(
            *carried,
            {"image": batch_sh, "label": batch_sh},
            e.shardings["rng"],
            sharding.replicated(e.mesh),
            jax.tree.map(lambda _: msh, e.hparams),
        ),
        out_shardings=carried,
        donate_argnums=(0, 1, 2, 3),
    )
    return jitted.lower(*_step_structs(e))


def begin_phase(e: Ensemble, state: step_lib.TrainState, sstate, phase: base.Phase):
    """Each member's ``setup.begin_phase`` (its strategy's hook, its learning rate)."""
    out = [
        setup.begin_phase(p, members.take(state, m), members.take(sstate, m), phase)
        for m, p in enumerate(e.parts)
    ]
    return sharding.put(stack(out), (e.shardings["state"], e.shardings["sstate"]))


def end_phase(e: Ensemble, state: step_lib.TrainState, sstate, phase: base.Phase):
    """Each member's ``setup.end_phase`` (Fisher, importances, memory ...)."""
    out = [
        setup.end_phase(p, members.take(state, m), members.take(sstate, m), phase)
        for m, p in enumerate(e.parts)
    ]
    return sharding.put(stack(out), e.shardings["sstate"])


def split(progress: results.Progress, m: int) -> results.Progress:
    """Member ``m``'s statistics out of an ensemble's progress (each holds all members')."""
    pick = lambda rows: [[stat[m] for stat in row] for row in rows]
    return progress._replace(
        rows=pick(progress.rows),
        initial_row=[stat[m] for stat in progress.initial_row],
        rows_task_il=pick(progress.rows_task_il),
        overall=[o[m] for o in progress.overall],
        full=[f[m] for f in progress.full],
    )


def summarize(e: Ensemble, progress: results.Progress, compile_count: int) -> dict[str, Any]:
    """results.json of an ensemble: each member's results (as its separate run's, under
    ``members``), their mean accuracy matrix and mean summary at the top (what plots and
    comparison tables read) and ``ensemble``: the mean +- std over members and, for a sweep,
    per swept point over the seeds."""
    outs = [setup.summarize(p, split(progress, m), compile_count) for m, p in enumerate(e.parts)]
    shared = ("metric", "task", "strategy", "precision", "phases", "stream", "timing")
    out = {k: outs[0][k] for k in shared if k in outs[0]}
    out["config"] = e.config.to_dict()
    out["accuracy_matrix"] = np.nanmean([o["accuracy_matrix"] for o in outs], axis=0).tolist()
    numbers = [
        k
        for k, v in outs[0].items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in shared
    ]
    table = {k: [float(o[k]) if o[k] is not None else np.nan for o in outs] for k in numbers}
    out.update({k: float(np.nanmean(v)) for k, v in table.items()})
    out["members"] = [
        {
            "index": mem.index,
            "seed": mem.seed,
            "values": mem.values,
            **{k: v for k, v in o.items() if k not in (*shared, "config")},
        }
        for mem, o in zip(e.members, outs, strict=True)
    ]
    out["ensemble"] = {
        "size": len(e.members),
        "seeds": sorted({m.seed for m in e.members}),
        "sweep": members.parse_sweep(e.config),
        "data_order": (
            "each member its own seed's"
            if not e.shared_batch
            else f"shared, seed {members.order_seed(e.config)}"
        ),
        "chunk": e.chunk,
        "mean": {k: float(np.nanmean(v)) for k, v in table.items()},
        "std": {k: float(np.nanstd(v)) for k, v in table.items()},
        "points": _points(e.members, table),
    }
    return out


def _points(ms: list[members.Member], table: dict[str, list[float]]) -> list[dict]:
    """Per swept point: its values, seeds, and each summary number's mean and std over them."""
    groups: dict[tuple, list[int]] = {}
    for m in ms:
        groups.setdefault(tuple(sorted(m.values.items())), []).append(m.index)
    return [
        {
            "values": dict(point),
            "seeds": [ms[i].seed for i in idx],
            "mean": {k: float(np.nanmean([v[i] for i in idx])) for k, v in table.items()},
            "std": {k: float(np.nanstd([v[i] for i in idx])) for k, v in table.items()},
        }
        for point, idx in groups.items()
    ]
