"""The stream loop: ``run(config, workdir)`` trains a strategy over a stream and reports.

Per phase (an experience, or a union of experiences for cumulative/joint): the strategy's
``before_phase``, the compiled step over this phase's grain batches, ``after_phase``, then an
evaluation of *every* experience's test set (one row of the accuracy matrix R) and an atomic
checkpoint. Checkpoints also fall every ``checkpoint_every_steps`` steps and on SIGTERM; re-running
the same command on the same workdir resumes where the last one stopped.

The parts of a run come from ``setup.build`` (``ensemble.build`` for an ensemble's N members,
``config.ensemble``), and so do the functions that differ between the two (the module is the
run's ``room``); results.json from ``results.summarize``.
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
    compiles,
    distributed,
    ensemble,
    members,
    paths,
    results,
    setup,
    sharding,
    stopping,
    writers,
)
from clseg_jax.data import feed
from clseg_jax.strategies import base


class NonFiniteLossError(RuntimeError):
    pass


class Hooks(NamedTuple):
    """Callbacks for a caller that drives ``run`` (the service's worker); all optional.

    ``on_log(info)``: at each metrics read (``phase``, ``step_in_phase``, ``steps_in_phase``,
    ``global_step`` and the train metrics, floats). ``on_checkpoint(directory, meta)``: after each
    complete checkpoint, with its folder. ``should_stop()``: polled once per step on the host and
    between a synthesis's iterations; when it says so, the run saves a checkpoint and returns
    ``{}`` (as on SIGTERM). ``handle_sigterm``:
    False leaves SIGTERM to the caller (a Celery worker's warm shutdown), which stops the run
    through ``should_stop``. ``should_cancel()``: polled where ``should_stop`` is; when it says
    so, the run returns ``{}`` at once and saves nothing (a cancelled job's work is dropped, and
    its step in flight is the last).
    """

    on_log: Callable[[dict], None] | None = None
    on_checkpoint: Callable[[str, dict], None] | None = None
    should_stop: Callable[[], bool] | None = None
    handle_sigterm: bool = True
    should_cancel: Callable[[], bool] | None = None


def run(config: ml_collections.ConfigDict, workdir: str, hooks: Hooks | None = None) -> dict:
    """Trains ``config.strategy`` on ``config.data``'s stream; writes results under ``workdir``.

    Re-running on the same workdir resumes from the latest checkpoint (and, if the stream is
    finished, just rewrites the results). Returns the results dict (also ``results.json``).

    The stream may have grown since the checkpoint was written (more experiences, as in the
    service's lineages): the run resumes at the first untrained phase. For the strategy state to
    keep its shapes, set ``config.max_experiences`` to a fixed upper bound on the stream length;
    rows of R evaluated before an experience existed hold NaN for it.
    """
    with compiles.Counter() as counter, _Run(config, workdir, counter, hooks or Hooks()) as r:
        return r.execute()


class _Run:
    """One ``run`` call: the built parts, the checkpointer and writer, and the stop flag."""

    def __init__(self, config, workdir, counter: compiles.Counter, hooks: Hooks):
        self.config = config
        self.hooks = hooks
        self.workdir = paths.resolve(workdir)  # local or gs:// (clseg_jax/paths.py)
        self.counter = counter
        self.stop_requested = False
        self.cancelled = False
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.room = ensemble if members.enabled(config) else setup
        self.parts = self.room.build(config, stop=self._should_stop)
        self.arrays = self.parts.arrays
        self.ckpt = checkpoint.Checkpointer(
            self.workdir / "checkpoints",
            delay_s=float(config.debug.get("save_delay_s", 0.0)),
        )
        # Files are process 0's; the others train and save their checkpoint shards.
        self.primary = distributed.is_primary()
        self.writer = writers.MetricWriter(
            self.workdir,
            tensorboard=config.log.tensorboard,
            wandb=config.log.wandb,
            wandb_mode=config.log.wandb_mode,
            run_name=self.workdir.name,
            config=config.to_dict(),
            enabled=self.primary,
        )

    def _should_stop(self) -> bool:
        """SIGTERM or the caller's ``should_stop`` / ``should_cancel``: what long hooks check
        (``Env.stop``)."""
        if self.hooks.should_stop is not None and self.hooks.should_stop():
            self.stop_requested = True
        if self.hooks.should_cancel is not None and self.hooks.should_cancel():
            self.cancelled = self.stop_requested = True
        return self.stop_requested

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

    def execute(self) -> dict:
        parts = self.parts
        progress = results.start()
        if self.ckpt.latest() is not None:
            abstract = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self.arrays
            )
            self.arrays, meta = self.ckpt.restore(abstract)
            progress = results.Progress(**meta)
            logging.info(
                "resumed from checkpoint: phase %d step %d", progress.phase, progress.step_in_phase
            )
        timing = progress.timing

        t0 = time.perf_counter()
        step_fn = self.room.compile_step(parts)
        state = self.arrays["state"]
        parts.evaluator.compile(state.params, state.batch_stats, self.arrays["sstate"])
        timing["compile_s"] += time.perf_counter() - t0

        if progress.initial_row is None:
            t0 = time.perf_counter()
            every = np.ones(parts.stream.num_classes, bool)
            sstate = self.arrays["sstate"]
            confs = parts.evaluator.row(state.params, state.batch_stats, every, sstate)
            progress = progress._replace(initial_row=[c.tolist() for c in confs])
            timing["eval_s"] += time.perf_counter() - t0

        for phase in parts.phases[progress.phase :]:
            progress = self._train_phase(phase, progress, step_fn)
            if progress is None:  # stopped by SIGTERM after saving
                return {}
        out = self.room.summarize(parts, progress, self.counter.count)
        if self.primary:
            results.write(self.workdir, out)
        return out

    def _train_phase(
        self, phase: base.Phase, progress: results.Progress, step_fn
    ) -> results.Progress | None:
        cfg, parts = self.config, self.parts
        timing = progress.timing
        compiles_before = self.counter.mark()
        state, sstate = self.arrays["state"], self.arrays["sstate"]
        if progress.step_in_phase == 0:
            t0 = time.perf_counter()
            state, sstate = self.room.begin_phase(parts, state, sstate, phase)
            jax.block_until_ready((state, sstate))
            timing["strategy_s"] += time.perf_counter() - t0

        dataset = parts.datasets[phase.index]
        iterator = feed.iterate(
            dataset,
            self.room.feed_sharding(parts),
            workers=int(cfg.data.get("workers", 0)),
            prefetch=int(cfg.data.get("device_prefetch", 2)),
        )
        if progress.iterator is not None:
            iterator.set_state(progress.iterator)
        repl = sharding.replicated(parts.mesh)
        mask = sharding.put(jnp.asarray(phase.class_mask), repl)
        rng = self.arrays["rng"]
        metrics, monitor = self.room.fresh_accumulators(parts)
        n_steps = len(dataset)
        bar = tqdm.tqdm(
            total=n_steps,
            initial=progress.step_in_phase,
            disable=not (cfg.progress and self.primary),
            desc=f"phase {phase.index + 1}/{len(parts.phases)} (experience {phase.experiences})",
            unit="step",
            dynamic_ncols=True,
        )
        t_train = time.perf_counter()
        s = progress.step_in_phase
        global_step = int(np.max(state.step))  # an ensemble's members are in step
        while s < n_steps:
            batch = next(iterator)  # on the devices already (read ahead by data.feed)
            state, sstate, metrics, monitor = step_fn(
                state, sstate, metrics, monitor, batch, rng, mask
            )
            s += 1
            global_step += 1  # host-side mirror of state.step: reading that would sync
            bar.update(1)
            save_now = cfg.checkpoint_every_steps > 0 and s % cfg.checkpoint_every_steps == 0
            if self._should_stop() and self.cancelled:
                logging.warning("cancelled at step %d of phase %d: nothing saved", s, phase.index)
                bar.close()
                iterator.close()
                return None
            if s % cfg.log_every_steps == 0 or s == n_steps or save_now or self.stop_requested:
                metrics = self._log(global_step, metrics, monitor, phase, bar, (s, n_steps))
                self._announce()
            if global_step == cfg.debug.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the resume test
            if (save_now or self.stop_requested) and s < n_steps:
                timing["train_s"] += time.perf_counter() - t_train
                self.arrays = {"state": state, "sstate": sstate, "rng": rng}
                # Periodic saves go on in the background; a stop waits for its save.
                meta = progress._replace(step_in_phase=s, iterator=iterator.get_state())
                self._save(meta, wait=self.stop_requested)
                t_train = time.perf_counter()
                if self.stop_requested:
                    bar.close()
                    iterator.close()
                    return None
        iterator.close()  # its read-ahead thread (and workers) end with the phase
        jax.block_until_ready(state)
        timing["train_s"] += time.perf_counter() - t_train
        timing["train_steps"] += n_steps - progress.step_in_phase
        bar.close()

        t0 = time.perf_counter()
        try:
            sstate = self.room.end_phase(parts, state, sstate, phase)
        except stopping.Stopped as e:
            if self.cancelled:
                return None
            # The state the training ended with: a resumed run redoes every end-of-phase hook.
            logging.warning("%s: saving a checkpoint at the end of the phase's steps", e)
            self.arrays = {"state": state, "sstate": sstate, "rng": rng}
            self._save(progress._replace(step_in_phase=n_steps, iterator=iterator.get_state()))
            return None
        jax.block_until_ready(sstate)
        timing["strategy_s"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        ev = parts.evaluator.after_phase(
            state.params, state.batch_stats, sstate, phase, task_il=parts.task_il
        )
        timing["eval_s"] += time.perf_counter() - t0
        if self._should_stop() and self.cancelled:
            return None
        row = [parts.evaluator.score(c, j) for j, c in enumerate(ev.row)]
        metric = parts.task.metric
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
        timing["compiles_per_phase"].append(self.counter.mark() - compiles_before)
        progress = results.record_phase(progress, phase, ev)
        self._save(progress)  # complete before the experience counts as done
        if self.stop_requested:
            return None
        return progress

    def _log(self, global_step, metrics, monitor, phase, bar, where):
        """Reads the device metrics (the only host sync of the loop), checks them, resets."""
        host = jax.device_get(metrics)
        # clu computes one collection at a time: an ensemble's, member by member.
        rows = (
            [host]
            if self.room is setup
            else [members.take(host, m) for m in range(len(self.parts.members))]
        )
        computed = [r.compute() for r in rows]
        per_member = {k: np.array([float(c[k]) for c in computed]) for k in computed[0]}
        values = {k: float(np.mean(v)) for k, v in per_member.items()}  # an ensemble's mean
        firsts = np.asarray(monitor.first_bad_step).reshape(-1)
        losses = per_member["loss"].reshape(-1)
        sick = np.flatnonzero((firsts >= 0) | ~np.isfinite(losses))
        if sick.size:
            bad = int(firsts[sick[0]]) if firsts[sick[0]] >= 0 else global_step
            who = ""
            if firsts.size > 1:
                m = self.parts.members[sick[0]]
                who = f"ensemble member {m.index}: seed {m.seed} {m.values or ''}, ".replace(
                    " ,", ","
                )
            raise NonFiniteLossError(
                f"non-finite loss or parameters at step {bad} ({who}"
                f"phase {phase.index}, experience(s) {list(phase.experiences)}); "
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
        return self.room.fresh_accumulators(self.parts)[0]

    def _save(self, progress: results.Progress, wait: bool = True) -> None:
        """Saves ``self.arrays``; ``wait=False`` returns once they are off the devices.
        ``checkpoint_s`` counts the time training waited."""
        t0 = time.perf_counter()
        self.ckpt.save(self.arrays, progress._asdict(), wait=wait)
        progress.timing["checkpoint_s"] += time.perf_counter() - t0
        self._announce()

    def _announce(self) -> None:
        """``Hooks.on_checkpoint`` for every save that has completed (never for one in flight,
        which a kill would lose)."""
        for n, meta in self.ckpt.committed():
            if self.hooks.on_checkpoint is not None:
                self.hooks.on_checkpoint(self.ckpt.directory(n), meta)
