"""Issue 17: an ensemble's step (``config.ensemble``) against N separate runs of the same step.

    python experiments/bench_ensemble.py --out experiments/results/bench_ensemble.json

W1's model and batch (BENCHMARKS.md: the ``unet64`` UNet, batch 32 of 64x64, SGD 0.01 momentum
0.9, float32) through the ``naive`` strategy, built by ``ensemble.build`` / ``setup.build`` as a
run builds them. For N = 1, 2, 4, 8 members: member-images/s of the ensemble's compiled step
(every member on the same batch, as with a shared data order), and of one member's compiled
step called N times (N separate runs, one after another on this machine). Rounds interleave
the two, so drifting load hits both alike; the figure is the median of the rounds. ``--chunks``
picks how the members are computed: ``auto`` (the library's choice for this backend: a loop on
CPU, one vmap on GPU/TPU) and ``vmap`` (all members side by side).

Goal (issue 17): ``ratio_to_separate`` >= 0.95 on CPU; on an accelerator, where this model
leaves the device mostly idle, >= 0.8 N (the separate runs' member-images/s is one member's).
Run with nothing else on the machine and say what else ran.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clseg_jax import ensemble, hostmem, setup
from configs import shapes_di
from experiments.bench_step import environment, write_json


def _config(batch: int, size: int, members: int, chunk: int):
    c = shapes_di.get_config()
    c.data.image_size = size
    c.data.train_per_exp = batch
    c.data.test_per_exp = batch
    c.model.kwargs.widths = (16, 32, 64, 128)
    c.batch_size = batch
    c.optimizer.name, c.optimizer.lr, c.optimizer.momentum = "sgd", 0.01, 0.9
    c.ensemble.seeds = tuple(range(members))
    c.ensemble.chunk = chunk
    c.progress = False
    return c


def _runner(room, parts, batch: dict):
    """A closure taking ``reps`` steps of ``parts``' compiled step on ``batch``; the carried
    arrays are donated and carried on."""
    step = room.compile_step(parts)
    carried = [parts.arrays["state"], parts.arrays["sstate"], *room.fresh_accumulators(parts)]
    placed = jax.device_put(batch, room.feed_sharding(parts))
    key, mask = parts.arrays["rng"], jnp.ones(parts.stream.num_classes, bool)

    def run(reps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            carried[:] = step(*carried, placed, key, mask)
        jax.block_until_ready(carried)
        return time.perf_counter() - t0

    run(1)  # the first call places the donated buffers
    return run


def main() -> None:
    print(hostmem.keep_freed_memory(), flush=True)  # before JAX's threads allocate
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", default="1,2,4,8")
    p.add_argument("--chunks", default="auto,vmap")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="experiments/results/bench_ensemble.json")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8),
        "label": rng.integers(0, 4, (args.batch, args.size, args.size), dtype=np.uint8),
    }
    one = setup.build(_config(args.batch, args.size, 0, 0))  # no ensemble: one run
    separate = _runner(setup, one, batch)
    rows = []
    for n in (int(x) for x in args.members.split(",")):
        for chunk_name in args.chunks.split(","):
            chunk = n if chunk_name == "vmap" else 0
            e = ensemble.build(_config(args.batch, args.size, n, chunk))
            together = _runner(ensemble, e, batch)
            times_e, times_s = [], []
            for _ in range(args.rounds):
                times_e.append(together(args.reps) / args.reps)
                times_s.append(separate(args.reps * n) / args.reps)  # N runs' steps
            t_e, t_s = statistics.median(times_e), statistics.median(times_s)
            row = {
                "members": n,
                "chunk": chunk_name,
                "members_side_by_side": e.chunk,
                "ensemble_member_images_per_s": n * args.batch / t_e,
                "separate_member_images_per_s": n * args.batch / t_s,
                "ratio_to_separate": t_s / t_e,
                "ensemble_step_ms": [t * 1e3 for t in times_e],
                "separate_steps_ms": [t * 1e3 for t in times_s],
            }
            rows.append(row)
            print(
                f"N={n} {chunk_name:4s}: ensemble {row['ensemble_member_images_per_s']:7.1f} "
                f"member-img/s, separate {row['separate_member_images_per_s']:7.1f} "
                f"-> {row['ratio_to_separate']:.2f}x",
                flush=True,
            )
    out = {
        "workload": "W1 unet64 naive step, N ensemble members vs N separate runs",
        "batch": args.batch,
        "image_size": args.size,
        "backend": jax.default_backend(),
        "rows": rows,
        **environment(),
    }
    write_json(args.out, out)


if __name__ == "__main__":
    main()
