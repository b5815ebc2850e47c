"""Issue 17: the confusion-matrix update by ``bincount`` (a scatter-add) against a one-hot matmul,
the choice behind ``metrics.confusion(method="auto")`` on this backend.

    python experiments/bench_confusion.py --out experiments/results/bench_confusion.json

Shapes: the evaluation batches of the reference workloads, labels and predictions as the eval
step has them: W1 (8 x 64 x 64, 5 classes), W3 (8 x 512 x 512, 21 classes, VOC) and ADE20K
(8 x 512 x 512, 151 classes). Each update is jitted alone; rounds interleave the two methods so
drifting load hits both alike; the figure is the median of the rounds. Run with nothing else on
the machine and say what else ran.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clseg_jax import hostmem, metrics
from experiments.bench_step import environment

SHAPES = {"W1": ((8, 64, 64), 5), "W3": ((8, 512, 512), 21), "ADE": ((8, 512, 512), 151)}


def _time(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def main() -> None:
    print(hostmem.keep_freed_memory(), flush=True)  # before JAX's threads allocate
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="experiments/results/bench_confusion.json")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    rows = {}
    for name, (shape, k) in SHAPES.items():
        labels = rng.integers(0, k, shape).astype(np.uint8)
        labels[rng.random(shape) < 0.1] = 255
        preds = jnp.asarray(rng.integers(0, k, shape).astype(np.int32))
        labels = jnp.asarray(labels)
        fns = {
            m: jax.jit(lambda a, b, m=m, k=k: metrics.confusion(a, b, k, m))
            for m in metrics.CONFUSION_METHODS
        }
        ref = np.asarray(fns["bincount"](labels, preds))
        np.testing.assert_array_equal(np.asarray(fns["matmul"](labels, preds)), ref)
        times = {m: [] for m in fns}
        for _ in range(args.rounds):
            for m, fn in fns.items():
                times[m].append(_time(fn, (labels, preds), args.reps))
        med = {m: statistics.median(t) for m, t in times.items()}
        rows[name] = {
            "shape": list(shape),
            "num_classes": k,
            "median_ms": {m: 1e3 * v for m, v in med.items()},
            "matmul_over_bincount": med["matmul"] / med["bincount"],
        }
        print(f"{name}: " + ", ".join(f"{m} {1e3 * v:.2f} ms" for m, v in med.items()))
    out = {
        **environment(),
        "backend": jax.default_backend(),
        "rounds": args.rounds,
        "reps": args.reps,
        "rows": rows,
        "auto_picks": metrics._CONFUSION_BY_BACKEND.get(jax.default_backend(), "matmul"),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
