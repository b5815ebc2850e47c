"""The stream loop: ``run(config, workdir)`` trains a strategy over a stream and reports.

Per phase (an experience, or a union of experiences for cumulative/joint): the strategy's
``before_phase``, the compiled step over this phase's grain batches, ``after_phase``, then an
evaluation of *every* experience's test set (one row of the accuracy matrix R) and an atomic
checkpoint. Checkpoints also fall every ``checkpoint_every_steps`` steps and on SIGTERM; re-running
the same command on the same workdir resumes where the last one stopped.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging

from clseg_jax import (
    checkpoint,
    data,
    evaluate,
    models,
    report,
    sharding,
    strategies,
    tasks,
    writers,
)
from clseg_jax import metrics as metrics_lib
from clseg_jax import step as step_lib
from clseg_jax.data import base as data_base
from clseg_jax.data import loader
from clseg_jax.models import weights
from clseg_jax.strategies import base


class _Progress(NamedTuple):
    """Where a run stands; saved as checkpoint metadata (JSON)."""

    phase: int
    step_in_phase: int
    iterator: dict | None
    rows: list  # statistics per finished phase: rows[i][j] = [K,K] confusion or [K] APs
    initial_row: list | None
    timing: dict
    rows_task_il: list | tuple = ()  # the same, task-incremental (config.eval_task_il)
    overall: list | tuple = ()  # multi-label: mAP over seen classes on the seen tasks' images
    full: list | tuple = ()  # [K,K] confusion on the stream's full test set after each phase


def _phases(stream, schedule, task_incremental: bool = False) -> list[base.Phase]:
    """Phase descriptions for a schedule; classes seen accumulate over phases.

    ``task_incremental``: the task id is known in training too, so a phase's step may predict
    only its own experiences' classes (a per-task head by masking); otherwise every class seen
    so far (class-incremental).
    """
    out, seen = [], set()
    for i, exps in enumerate(schedule):
        labelled = _labelled(stream, exps)
        new = tuple(sorted(labelled - seen))
        seen |= labelled
        source = _phase_source(stream, exps)
        visible = stream.class_mask(sorted(labelled))

        def batches(batch_size, source=source, visible=visible):
            return loader.host_batches(source, visible, batch_size)

        mask = stream.class_mask(sorted(labelled) if task_incremental else sorted(seen))
        out.append(base.Phase(i, tuple(exps), new, tuple(sorted(seen)), mask, batches))
    return out


def _labelled(stream, exps) -> set[int]:
    """Classes labelled in the union of these experiences' training data."""
    return set().union(*(stream.experiences[e].classes for e in exps))


def _phase_source(stream, exps):
    sources = [stream.experiences[e].train for e in exps]
    return sources[0] if len(sources) == 1 else data_base.ConcatSource(sources)


def _count_compiles() -> tuple[list, Callable]:
    """Counts XLA compilations through JAX's own monitoring events."""
    events: list = []

    def listener(name, _secs, **_):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return events, lambda: jax.monitoring.unregister_event_duration_listener(listener)


class NonFiniteLossError(RuntimeError):
    pass


class Hooks(NamedTuple):
    """Callbacks for a caller that drives ``run`` (the service's worker); all optional.

    ``on_log(info)``: at each metrics read (``phase``, ``step_in_phase``, ``steps_in_phase``,
    ``global_step`` and the train metrics, floats). ``on_checkpoint(directory, meta)``: after each
    complete checkpoint, with its folder. ``should_stop()``: polled once per step on the host; when
    it says so, the run saves a checkpoint and returns ``{}`` (as on SIGTERM). ``handle_sigterm``:
    False leaves SIGTERM to the caller (a Celery worker's warm shutdown), which stops the run
    through ``should_stop``.
    """

    on_log: Callable[[dict], None] | None = None
    on_checkpoint: Callable[[str, dict], None] | None = None
    should_stop: Callable[[], bool] | None = None
    handle_sigterm: bool = True


def array_shardings(arrays: dict, mesh, rules=()) -> dict:
    """Shardings of the run's arrays: params (and their optimizer moments) by the config's rules,
    everything else replicated."""
    repl = sharding.replicated(mesh)
    state = arrays["state"]
    out = {
        "state": step_lib.TrainState(
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
    metric_sh = jax.tree.map(lambda _: repl, step_lib.TrainMetrics.empty())
    mon_sh = step_lib.Monitor(repl)
    carried = (shardings["state"], shardings["sstate"], metric_sh, mon_sh)
    return jax.jit(
        step,
        in_shardings=(*carried, {"image": batch_sh, "label": batch_sh}, repl, repl),
        out_shardings=carried,
        donate_argnums=(0, 1, 2, 3),
    )


def validate_names(config: ml_collections.ConfigDict) -> None:
    """Fails fast, before any data is built, on names that no registry knows."""
    strategies.names(config.strategy.name)
    if config.data.name not in data.DATASETS:
        raise ValueError(f"unknown dataset {config.data.name!r}; valid: {sorted(data.DATASETS)}")
    if config.model.name not in models.MODELS:
        raise ValueError(f"unknown model {config.model.name!r}; valid: {sorted(models.MODELS)}")


def run(config: ml_collections.ConfigDict, workdir: str, hooks: Hooks | None = None) -> dict:
    """Trains ``config.strategy`` on ``config.data``'s stream; writes results under ``workdir``.

    Re-running on the same workdir resumes from the latest checkpoint (and, if the stream is
    finished, just rewrites the results). Returns the results dict (also ``results.json``).

    The stream may have grown since the checkpoint was written (more experiences, as in the
    service's lineages): the run resumes at the first untrained phase. For the strategy state to
    keep its shapes, set ``config.max_experiences`` to a fixed upper bound on the stream length;
    rows of R evaluated before an experience existed hold NaN for it.
    """
    validate_names(config)
    compile_events, stop_counting = _count_compiles()
    try:
        with _Run(config, workdir, compile_events, hooks or Hooks()) as r:
            return r.execute()
    finally:
        stop_counting()


class _Run:
    """State of one ``run`` call; kept as an object only to share setup between its phases."""

    def __init__(self, config, workdir, compile_events, hooks: Hooks | None = None):
        self.config = config
        self.hooks = hooks or Hooks()
        self.workdir = os.path.abspath(workdir)
        self.compile_events = compile_events
        os.makedirs(self.workdir, exist_ok=True)
        self.stream = data.make(config.data)
        self.graphdef, params, batch_stats = models.init(
            config.model, self.stream.num_classes, seed=config.seed
        )
        pretrained = config.model.get("pretrained", None)
        if pretrained:
            # A backbone from an ImageNet classifier (``into``), or a whole model of the same
            # layout under a head with another class count (``skip_head``).
            params, batch_stats = weights.load(
                os.path.expanduser(pretrained.path),
                params,
                batch_stats,
                skip_head=bool(pretrained.get("skip_head", True)),
                into=pretrained.get("into", None) or None,
            )
        self.forward = step_lib.make_forward(
            self.graphdef, config.model.get("input_norm", "symmetric")
        )
        image_shape, label_shape = self._row_shapes()
        self.task = tasks.for_stream(self.stream.kind, label_shape)
        n_exp = len(self.stream.experiences)
        max_exp = int(config.get("max_experiences", 0) or 0)
        if max_exp and n_exp > max_exp:
            raise ValueError(
                f"the stream has {n_exp} experiences but config.max_experiences is {max_exp}"
            )
        env = base.Env(
            self.forward,
            self.stream.num_classes,
            max_exp or n_exp,
            image_shape=image_shape,
            label_shape=label_shape,
            seed=config.seed,
            task=self.task,
            class_names=tuple(self.stream.class_names),
            graphdef=self.graphdef,
            input_norm=config.model.get("input_norm", "symmetric"),
        )
        self.strategy = strategies.make(config.strategy, env)
        self.phases = _phases(
            self.stream,
            self.strategy.schedule(len(self.stream.experiences)),
            task_incremental=bool(config.get("task_incremental", False)),
        )
        self.mesh = sharding.make_mesh(config.sharding.mesh)
        self._rules = config.sharding.param_rules
        self.repl = sharding.replicated(self.mesh)
        self.batch_sh = sharding.batch_sharding(self.mesh)
        self.datasets = [self._dataset(p) for p in self.phases]
        self.tx = step_lib.make_optimizer(config.optimizer, max(len(d) for d in self.datasets))
        # One program each: run eagerly, every per-leaf op compiles separately (EWC's state took
        # ~140 tiny compiles, seconds on a CPU).
        self._tx_init = jax.jit(self.tx.init)

        state = step_lib.TrainState(
            params, batch_stats, self._tx_init(params), jnp.array(0, jnp.int32)
        )
        sstate = jax.jit(self.strategy.init)(params, batch_stats)
        self.arrays = {
            "state": state,
            "sstate": sstate,
            "rng": jax.random.PRNGKey(config.seed),
        }
        self.arrays = jax.device_put(
            self.arrays, array_shardings(self.arrays, self.mesh, self._rules)
        )
        self.ckpt = checkpoint.Checkpointer(os.path.join(self.workdir, "checkpoints"))
        self.writer = writers.MetricWriter(
            self.workdir,
            tensorboard=config.log.tensorboard,
            wandb=config.log.wandb,
            wandb_mode=config.log.wandb_mode,
            run_name=os.path.basename(self.workdir),
            config=config.to_dict(),
        )
        self.evaluator = evaluate.Evaluator(
            self.forward,
            self.stream,
            self.mesh,
            config.eval_batch_size,
            self.task,
            predict=self.strategy.predict,
        )
        self.task_il = bool(config.get("eval_task_il", False) or config.get("task_incremental"))
        if self.task_il and self.task.name != "classification":
            raise ValueError(
                f"eval_task_il / task_incremental need a classification stream; "
                f"{self.stream.name!r} is {self.task.name}"
            )
        self.stop_requested = False

    def __enter__(self):
        self._old_handler = None
        if self.hooks.handle_sigterm and threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc):
        if self._old_handler is not None:
            signal.signal(signal.SIGTERM, self._old_handler)
        self.writer.close()
        self.ckpt.close()

    def _on_sigterm(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM: saving a checkpoint after the current step, then exiting")
        self.stop_requested = True

    def _dataset(self, phase: base.Phase):
        exps = phase.experiences
        aug = self.config.augment
        return loader.train_dataset(
            _phase_source(self.stream, exps),
            self.stream.class_mask(sorted(_labelled(self.stream, exps))),
            global_batch=self.config.batch_size,
            epochs=self.config.epochs,
            seed=self.config.seed * 1000 + phase.index,
            crop=aug.crop or None,
            flip=aug.flip,
            scale=tuple(aug.scale) if aug.get("scale") else None,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    # -- the run ---------------------------------------------------------------------------

    def execute(self) -> dict:
        timing = {**dict.fromkeys(TIMING_KEYS, 0.0), "compiles_per_phase": []}
        progress = _Progress(0, 0, None, [], None, timing)
        if self.ckpt.latest() is not None:
            abstract = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self.arrays
            )
            self.arrays, meta = self.ckpt.restore(abstract)
            progress = _Progress(**meta)
            logging.info(
                "resumed from checkpoint: phase %d step %d", progress.phase, progress.step_in_phase
            )
        timing = progress.timing

        t0 = time.perf_counter()
        step_fn = self._compile_step()
        state = self.arrays["state"]
        self.evaluator.compile(state.params, state.batch_stats, self.arrays["sstate"])
        timing["compile_s"] += time.perf_counter() - t0

        if progress.initial_row is None:
            t0 = time.perf_counter()
            full = np.ones(self.stream.num_classes, bool)
            confs = self.evaluator.row(state.params, state.batch_stats, full, self.arrays["sstate"])
            progress = progress._replace(initial_row=[c.tolist() for c in confs])
            timing["eval_s"] += time.perf_counter() - t0

        for phase in self.phases[progress.phase :]:
            progress = self._train_phase(phase, progress, step_fn)
            if progress is None:  # stopped by SIGTERM after saving
                return {}
        return self._finish(progress)

    def _row_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """One training row's image and label shapes after cropping."""
        example = self.stream.experiences[0].train[0]
        image, label = np.shape(example["image"]), np.shape(example["label"])
        crop = self.config.augment.crop
        if crop and len(label) == 2:
            return (crop, crop, 3), (crop, crop)
        if crop:
            return (crop, crop, 3), label
        return image, label

    def _compile_step(self):
        """Compiles the step ahead of time; a call with other shapes would fail, not recompile."""
        cfg = self.config
        step = step_lib.make_train_step(self.forward, self.strategy, self.tx, self.task)
        jitted = jit_train_step(
            step, array_shardings(self.arrays, self.mesh, self._rules), self.mesh
        )
        image_shape, label_shape = self._row_shapes()
        b = cfg.batch_size
        batch = {
            "image": jax.ShapeDtypeStruct((b, *image_shape), jnp.uint8, sharding=self.batch_sh),
            "label": jax.ShapeDtypeStruct((b, *label_shape), jnp.uint8, sharding=self.batch_sh),
        }
        k = self.stream.num_classes
        mask = jax.ShapeDtypeStruct((k,), jnp.bool_, sharding=self.repl)
        return jitted.lower(
            self.arrays["state"],
            self.arrays["sstate"],
            step_lib.TrainMetrics.empty(),
            step_lib.new_monitor(),
            batch,
            self.arrays["rng"],
            mask,
        ).compile()

    def _train_phase(self, phase: base.Phase, progress: _Progress, step_fn) -> _Progress | None:
        cfg = self.config
        timing = progress.timing
        compiles_before = len(self.compile_events)
        state, sstate = self.arrays["state"], self.arrays["sstate"]
        if progress.step_in_phase == 0:
            t0 = time.perf_counter()
            params, sstate = self.strategy.before_phase(
                state.params, state.batch_stats, sstate, phase
            )
            opt_state = self._tx_init(params) if cfg.optimizer.reset_per_phase else state.opt_state
            opt_state = step_lib.start_phase(
                opt_state,
                total=len(self.datasets[phase.index]),
                lr=step_lib.phase_lr(cfg.optimizer, phase.index),
            )
            state = state._replace(params=params, opt_state=opt_state)
            # Hooks run on the host and may return arrays placed anywhere: put them back where
            # the compiled step expects them.
            shardings = array_shardings({"state": state, "sstate": sstate}, self.mesh, self._rules)
            state = jax.device_put(state, shardings["state"])
            sstate = jax.device_put(sstate, shardings["sstate"])
            jax.block_until_ready((state, sstate))
            timing["strategy_s"] += time.perf_counter() - t0

        dataset = self.datasets[phase.index]
        iterator = iter(dataset.to_iter_dataset())
        if progress.iterator is not None:
            iterator.set_state(progress.iterator)
        mask = jax.device_put(jnp.asarray(phase.class_mask), self.repl)
        rng = self.arrays["rng"]
        metrics, monitor = step_lib.TrainMetrics.empty(), step_lib.new_monitor()
        n_steps = len(dataset)
        bar = tqdm.tqdm(
            total=n_steps,
            initial=progress.step_in_phase,
            disable=not cfg.progress,
            desc=f"phase {phase.index + 1}/{len(self.phases)} (experience {phase.experiences})",
            unit="step",
            dynamic_ncols=True,
        )
        t_train = time.perf_counter()
        s = progress.step_in_phase
        global_step = int(state.step)
        while s < n_steps:
            local = next(iterator)
            batch = sharding.global_batch(local, self.batch_sh)
            state, sstate, metrics, monitor = step_fn(
                state, sstate, metrics, monitor, batch, rng, mask
            )
            s += 1
            global_step += 1  # host-side mirror of state.step: reading that would sync
            bar.update(1)
            save_now = cfg.checkpoint_every_steps > 0 and s % cfg.checkpoint_every_steps == 0
            if self.hooks.should_stop is not None and self.hooks.should_stop():
                self.stop_requested = True
            if s % cfg.log_every_steps == 0 or s == n_steps or save_now or self.stop_requested:
                metrics = self._log(global_step, metrics, monitor, phase, bar, (s, n_steps))
            if global_step == cfg.debug.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the resume test
            if (save_now or self.stop_requested) and s < n_steps:
                timing["train_s"] += time.perf_counter() - t_train
                self.arrays = {"state": state, "sstate": sstate, "rng": rng}
                self._save(progress._replace(step_in_phase=s, iterator=iterator.get_state()))
                t_train = time.perf_counter()
                if self.stop_requested:
                    bar.close()
                    return None
        jax.block_until_ready(state)
        timing["train_s"] += time.perf_counter() - t_train
        timing["train_steps"] += n_steps - progress.step_in_phase
        bar.close()

        t0 = time.perf_counter()
        sstate = self.strategy.after_phase(state.params, state.batch_stats, sstate, phase)
        jax.block_until_ready(sstate)
        timing["strategy_s"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        confs = self.evaluator.row(state.params, state.batch_stats, phase.class_mask, sstate)
        task_il = (
            self.evaluator.row_task_il(state.params, state.batch_stats, sstate)
            if self.task_il
            else []
        )
        overall = None
        if self.task.metric == "map":
            upto = max(phase.experiences)
            overall = self.evaluator.overall_map(
                state.params, state.batch_stats, range(upto + 1), phase.seen_classes
            )
        full = None
        if self.stream.test is not None:
            full = self.evaluator.full_test(
                state.params, state.batch_stats, phase.seen_classes, phase.class_mask, sstate
            )
        timing["eval_s"] += time.perf_counter() - t0
        row = [self.evaluator.score(c, j) for j, c in enumerate(confs)]
        metric = self.task.metric
        logging.info(
            "after phase %d: %s per experience %s",
            phase.index,
            metric,
            " ".join(f"{v:.3f}" for v in row),
        )
        self.writer.write_scalars(
            global_step, {f"eval/{metric}_exp{j}": v for j, v in enumerate(row)}
        )
        self.arrays = {"state": state, "sstate": sstate, "rng": rng}
        # JAX's own compile events in this phase (hooks, steps, evaluation): 0 after the first.
        timing["compiles_per_phase"].append(len(self.compile_events) - compiles_before)
        progress = _Progress(
            phase.index + 1,
            0,
            None,
            [*progress.rows, [c.tolist() for c in confs]],
            progress.initial_row,
            timing,
            [*progress.rows_task_il, [c.tolist() for c in task_il]] if task_il else [],
            [*progress.overall, overall] if overall is not None else [],
            [*progress.full, full.tolist()] if full is not None else [],
        )
        self._save(progress)
        if self.stop_requested:
            return None
        return progress

    def _log(self, global_step, metrics, monitor, phase, bar, where):
        """Reads the device metrics (the only host sync of the loop), checks them, resets."""
        values = {k: float(v) for k, v in metrics.compute().items()}
        bad = int(monitor.first_bad_step)
        if bad >= 0 or not all(np.isfinite(v) for v in values.values()):
            raise NonFiniteLossError(
                f"non-finite loss or parameters at step {bad if bad >= 0 else global_step} "
                f"(phase {phase.index}, experience(s) {list(phase.experiences)}); "
                f"stopped without saving; last good checkpoint: "
                f"{self.ckpt.latest() or 'none'} in {self.workdir}/checkpoints"
            )
        self.writer.write_scalars(global_step, {f"train/{k}": v for k, v in values.items()})
        bar.set_postfix(loss=f"{values['loss']:.4f}")
        if self.hooks.on_log is not None:
            self.hooks.on_log(
                {
                    "phase": phase.index,
                    "step_in_phase": where[0],
                    "steps_in_phase": where[1],
                    "global_step": global_step,
                    **values,
                }
            )
        return step_lib.TrainMetrics.empty()

    def _save(self, progress: _Progress) -> None:
        t0 = time.perf_counter()
        meta = progress._asdict()
        n = self.ckpt.save(self.arrays, meta)
        progress.timing["checkpoint_s"] += time.perf_counter() - t0
        if self.hooks.on_checkpoint is not None:
            self.hooks.on_checkpoint(self.ckpt.directory(n), meta)

    def _per_class(self, stat: np.ndarray) -> np.ndarray:
        """Per-class IoU, recall (classification) or AP (multi-label) of one statistic."""
        if self.task.metric == "map":
            return stat
        if self.task.metric == "accuracy":
            conf = np.asarray(stat, np.float64)
            total = conf.sum(axis=1)
            out = np.full(len(conf), np.nan)
            np.divide(np.diag(conf), total, out=out, where=total > 0)
            return out
        return metrics_lib.iou_per_class(stat)

    def _old_new_all(self, confs: list, full: list) -> dict:
        """MiB/PLOP-table figures per phase: mIoU over old (background included), new and all
        seen classes, and their averages over phases.

        On the stream's full test set when it has one; otherwise on the union of the seen
        experiences' test sets (disjoint by construction in such streams), each with the labels
        seen at that experience.
        """
        out = []
        for i, phase in enumerate(self.phases):
            old = sorted(set(phase.seen_classes) - set(phase.new_classes))
            if full:
                total = np.array(full[i])
            else:
                total = sum(confs[i][: max(phase.experiences) + 1])
            out.append(metrics_lib.old_new_all(total, old, phase.new_classes))
        averages = {
            key: metrics_lib.nanmean([o[key] for o in out]) for key in ("old", "new", "all")
        }
        result = {
            "old_new_all": out,
            "old_new_all_avg": averages,
            "old_new_all_on": "full test set" if full else "seen experiences' test sets",
        }
        if full:
            result["full_test_per_class"] = [
                {str(c): v for c, v in enumerate(self._per_class(np.array(f)))} for f in full
            ]
        return result

    def _finish(self, progress: _Progress) -> dict:
        cfg = self.config
        k = self.stream.num_classes
        confs = [[np.array(c) for c in row] for row in progress.rows]
        score = self.evaluator.score
        t = len(self.stream.experiences)
        # Rows evaluated before the stream grew (a lineage's earlier jobs) end early: NaN there.
        R = [[score(c, j) for j, c in enumerate(row)] + [np.nan] * (t - len(row)) for row in confs]
        initial = [score(np.array(c), j) for j, c in enumerate(progress.initial_row)]
        if len(initial) != t:  # FWT needs the untrained model on experiences that came later
            initial = None
        timing = dict(progress.timing)
        timing["compile_count"] = len(self.compile_events)
        timing["steps_per_s"] = timing["train_steps"] / max(timing["train_s"], 1e-9)
        results = {
            "metric": self.task.metric,
            "task": self.task.name,
            "strategy": cfg.strategy.name,
            "accuracy_matrix": R,
            "initial_row": initial,
            **metrics_lib.cl_summary(R, initial if len(R) > 1 else None),
            "per_class": [
                {str(c): v for c, v in enumerate(self._per_class(stat))} for stat in confs[-1]
            ],
            "phases": [list(p.experiences) for p in self.phases],
            "stream": {
                "name": self.stream.name,
                "kind": self.stream.kind,
                "num_classes": k,
                "class_names": list(self.stream.class_names),
                "experiences": [e.name for e in self.stream.experiences],
            },
            "timing": timing,
            "config": cfg.to_dict(),
        }
        if progress.overall:
            results["overall_map"] = list(progress.overall)
        if progress.rows_task_il:
            R_task = [
                [score(np.array(c), j) for j, c in enumerate(row)] for row in progress.rows_task_il
            ]
            results["task_il"] = {"accuracy_matrix": R_task, **metrics_lib.cl_summary(R_task)}
        if self.stream.kind == "class" and self.task.name == "segmentation":
            results.update(self._old_new_all(confs, progress.full))
        report.write_results(self.workdir, results)
        names = [e.name for e in self.stream.experiences]
        report.plot_accuracy_matrix(
            R, os.path.join(self.workdir, "accuracy_matrix.png"), labels=names
        )
        report.plot_curves(R, os.path.join(self.workdir, "curves.png"), labels=names)
        logging.info("results written to %s", os.path.join(self.workdir, "results.json"))
        return results


TIMING_KEYS = ("train_s", "train_steps", "compile_s", "strategy_s", "eval_s", "checkpoint_s")
