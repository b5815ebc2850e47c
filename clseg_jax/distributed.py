"""Several processes, one run: ``jax.distributed`` from ``config.distributed``.

One process per host (a TPU VM's workers, a SLURM or Open MPI job, or processes started by
hand). Every process runs the same command; JAX then sees every device of every process, the
mesh spans them all, and each process feeds only its own rows of each global batch
(``data.loader``, ``sharding.global_batch``). Only process 0 writes results.json, plots, metric
logs and the progress bar (``is_primary``); orbax's checkpoints are multi-process saves that
every process resumes from, so the workdir must be a path every process sees (a shared
filesystem, or ``gs://`` through orbax's ``etils.epath``).

``config.distributed``:
  auto: JAX's own cluster detection (TPU VMs, SLURM, Open MPI); the other fields unset.
  coordinator, num_processes, process_id: a hand launch (``host:port`` of process 0).
  heartbeat_s: how long a process may be silent before the others give up on it.

A dead peer ends the others with one line (``lost_peer``): at their next collective, which
fails at once, or through a watchdog thread that sees the peer's counter in the coordination
service's key-value store stop moving for ``heartbeat_s`` (a process blocked in a checkpoint's
barrier, say). JAX's own heartbeat, which aborts with a C++ stack trace, is set to a longer
timeout so that the watchdog speaks first.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections.abc import Callable

import jax
import ml_collections


def fields() -> ml_collections.ConfigDict:
    """``config.distributed``'s defaults: a single process."""
    return ml_collections.ConfigDict(
        {
            "auto": False,
            "coordinator": "",
            "num_processes": 1,
            "process_id": 0,
            "heartbeat_s": 10,
            "init_timeout_s": 120,
        }
    )


def check(config: ml_collections.ConfigDict) -> None:
    """One-line errors for a launch that cannot work, before any work starts."""
    d = config.get("distributed", None) or fields()
    n, i = int(d.num_processes), int(d.process_id)
    if d.auto and (d.coordinator or n != 1):
        raise ValueError(
            "config.distributed.auto detects the cluster itself; leave coordinator and "
            "num_processes unset with it"
        )
    if n < 1 or not 0 <= i < n:
        raise ValueError(
            f"config.distributed.process_id must be in [0, num_processes={n}), got {i}"
        )
    if n > 1 and not d.coordinator:
        raise ValueError(
            f"config.distributed.num_processes={n} needs config.distributed.coordinator=host:port "
            "(process 0's address), or config.distributed.auto=True on a TPU VM / SLURM / MPI"
        )
    if d.coordinator and ":" not in str(d.coordinator):
        raise ValueError(f"config.distributed.coordinator must be host:port, got {d.coordinator!r}")
    for name in ("batch_size", "eval_batch_size"):
        size = int(config.get(name, 0) or 0)
        if n > 1 and size % n:
            raise ValueError(
                f"config.{name}={size} is not divisible by the {n} processes "
                "(each feeds an equal share of every batch)"
            )


def initialize(config: ml_collections.ConfigDict) -> Callable[[], None]:
    """Starts ``jax.distributed`` when ``config.distributed`` asks for it (before any JAX
    computation); a single-process config does nothing. Returns ``stop()``, which ends the
    peer watchdog: call it when the run is over, before the processes shut down one by one."""
    check(config)
    d = config.get("distributed", None) or fields()
    done = threading.Event()
    if not d.auto and int(d.num_processes) == 1:
        return done.set
    # CPU processes exchange collectives over gloo (TCP); GPUs and TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(
        initialization_timeout=int(d.init_timeout_s),
        heartbeat_timeout_seconds=3 * int(d.heartbeat_s) + 10,  # after the watchdog's
    )
    if d.auto:
        jax.distributed.initialize(**kwargs)
    else:
        jax.distributed.initialize(
            coordinator_address=str(d.coordinator),
            num_processes=int(d.num_processes),
            process_id=int(d.process_id),
            **kwargs,
        )
    if jax.process_count() == 1:
        return done.set
    threading.Thread(
        target=_watch, args=(float(d.heartbeat_s), done), name="clseg-watchdog", daemon=True
    ).start()

    def stop() -> None:
        """Ends this watchdog and tells the others' that this process finished on purpose."""
        if done.is_set():
            return
        done.set()
        try:
            _client().key_value_set(f"clseg_jax/done/{jax.process_index()}", "1", True)
        except Exception:  # the coordinator already shut down: nobody is left to tell
            pass

    atexit.register(stop)  # before JAX's own shutdown (atexit runs last-in first)
    return stop


def _client():
    from jax._src import distributed as jax_distributed  # the client has no public handle

    return jax_distributed.global_state.client


def _watch(stale_s: float, done: threading.Event, period_s: float = 1.0) -> None:
    """Beats a counter in the coordination service's key-value store and watches the others'
    (module docstring); counters, not clocks, so hosts' clocks need not agree."""
    client = _client()
    me, n = jax.process_index(), jax.process_count()
    seen = {p: ("", time.monotonic()) for p in range(n) if p != me}
    beat = 0
    while not done.wait(period_s):
        beat += 1
        try:
            client.key_value_set(f"clseg_jax/beat/{me}", str(beat), allow_overwrite=True)
            for p, (value, since) in list(seen.items()):
                try:
                    client.key_value_try_get(f"clseg_jax/done/{p}")
                    del seen[p]  # finished its run: silence is expected now
                    continue
                except Exception:  # not finished
                    pass
                try:
                    now = client.key_value_try_get(f"clseg_jax/beat/{p}")
                except Exception:  # not written yet: the peer's watchdog has not started
                    now = value
                if now != value:
                    seen[p] = (now, time.monotonic())
                elif time.monotonic() - since > stale_s and not done.is_set():
                    lost_peer(f"process {p} sent no heartbeat for {stale_s:.0f} s")
        except Exception as e:  # the coordinator (process 0) itself is gone
            if not done.is_set():
                why = str(e).strip().splitlines()[0][:200]
                lost_peer(f"the coordinator is unreachable ({why})")


def lost_peer(why: str) -> None:
    """One line, then exit at once: JAX's shutdown would wait for the dead peer and abort with
    a C++ stack trace."""
    sys.stderr.write(
        f"error: process {jax.process_index()} of {jax.process_count()}: {why}, most likely "
        "another process died; rerun the same command on every process to resume from the last "
        "checkpoint\n"
    )
    sys.stderr.flush()
    os._exit(1)


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0
