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
"""

from __future__ import annotations

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


def initialize(config: ml_collections.ConfigDict) -> None:
    """Starts ``jax.distributed`` when ``config.distributed`` asks for it (before any JAX
    computation); a single-process config does nothing."""
    check(config)
    d = config.get("distributed", None) or fields()
    if not d.auto and int(d.num_processes) == 1:
        return
    # CPU processes exchange collectives over gloo (TCP); GPUs and TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(
        initialization_timeout=int(d.init_timeout_s),
        heartbeat_timeout_seconds=int(d.heartbeat_s),
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


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0
