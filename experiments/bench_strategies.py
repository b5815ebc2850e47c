"""Issue 3's speed figures: each regulariser's train step relative to naive, and the cost and
quality of EWC's Fisher pass against its sample count.

    python experiments/bench_strategies.py --out experiments/results/bench_strategies.json
    python experiments/bench_strategies.py --quality-seeds 0,1   # + EWC quality vs samples

1. Step time: W2's model and batch (W1 UNet, 64x64, batch 32, SGD), one compiled step per
   strategy with its state *active* (after one between-phase pass), timed in interleaved rounds
   so that load drifting on a shared machine hits every strategy alike; the figure is the median
   per-step time over all rounds, and the ratio to naive's.
2. Fisher pass: EWC's ``after_phase`` (per-sample gradients, ``vmap(grad)`` in batches of
   ``ewc_batch``) on N samples, compiled beforehand, against the time of the N / 32 naive steps
   that see the same images (forward + backward + update: the backward passes it needs, and more).
3. Quality (optional): EWC on the behaviour-test stream (``configs/behaviour_di.py``) with
   ``ewc_samples`` in {8, 32, 128, 256}: average mIoU and forgetting per seed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clseg_jax import hostmem, models, strategies, train
from clseg_jax import step as step_lib
from clseg_jax.strategies import base
from configs import behaviour_di, w2

STRATEGIES = ("naive", "ewc", "si", "mas", "rwalk", "lfl", "lwf")
NUM_CLASSES = 5


def _images(n: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, NUM_CLASSES, (n, size, size), dtype=np.uint8),
    }


def _phase(data: dict[str, np.ndarray]) -> base.Phase:
    """A phase over ``data`` (all classes seen), for the between-phase hooks."""

    def batches(batch_size: int):
        for i in range(0, len(data["image"]), batch_size):
            yield {k: v[i : i + batch_size] for k, v in data.items()}

    classes = tuple(range(NUM_CLASSES))
    return base.Phase(0, (0,), classes, classes, np.ones(NUM_CLASSES, bool), batches)


class _Bench:
    """One strategy's compiled step and carried state on W2's model."""

    def __init__(self, name: str, size: int, batch_size: int, samples: int):
        cfg = w2.get_config(f"strategy={name}")
        cfg.strategy.ewc_samples = cfg.strategy.mas_samples = samples
        graphdef, params, stats = models.init(cfg.model, NUM_CLASSES, seed=0)
        forward = step_lib.make_forward(graphdef)
        self.strategy = strategies.make(cfg.strategy, base.Env(forward, NUM_CLASSES, 4))
        tx = step_lib.make_optimizer(cfg.optimizer, 1000)
        self.phase = _phase(_images(samples, size, seed=1))
        sstate = jax.jit(self.strategy.init)(params, stats)
        t0 = time.perf_counter()
        sstate = self.strategy.after_phase(params, stats, sstate, self.phase)
        jax.block_until_ready(sstate)
        self.first_after_phase_s = time.perf_counter() - t0  # includes compilation
        state = step_lib.TrainState(params, stats, tx.init(params), jnp.array(0, jnp.int32))
        batch = jax.device_put(_images(batch_size, size))
        key, mask = jax.random.PRNGKey(0), jnp.ones(NUM_CLASSES, bool)
        step = jax.jit(step_lib.make_train_step(forward, self.strategy, tx), donate_argnums=(0, 2))
        carried = (state, sstate, step_lib.TrainMetrics.empty(), step_lib.new_monitor())
        t0 = time.perf_counter()
        compiled = step.lower(*carried, batch, key, mask).compile()
        self.compile_s = time.perf_counter() - t0
        self._fn = lambda c: compiled(c[0], c[1], c[2], c[3], batch, key, mask)
        self.carried = self._fn(carried)  # warm-up
        jax.block_until_ready(self.carried)

    def time_steps(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.carried = self._fn(self.carried)
            jax.block_until_ready(self.carried)
            times.append(time.perf_counter() - t0)
        return times

    def time_after_phase(self) -> float:
        """One between-phase pass, compiled already (the constructor ran one)."""
        t0 = time.perf_counter()
        state, sstate = self.carried[0], self.carried[1]
        sstate = self.strategy.after_phase(state.params, state.batch_stats, sstate, self.phase)
        jax.block_until_ready(sstate)
        return time.perf_counter() - t0


def step_ratios(names, size, batch_size, rounds, steps_per_round, samples) -> dict:
    benches = {n: _Bench(n, size, batch_size, samples) for n in names}
    times = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            times[n] += benches[n].time_steps(steps_per_round)
    naive = statistics.median(times["naive"])
    out = {}
    for n in names:
        med = statistics.median(times[n])
        out[n] = {
            "step_s": med,
            "ratio_to_naive": med / naive,
            "images_per_s": batch_size / med,
            "compile_s": benches[n].compile_s,
        }
        print(
            f"{n:7s} step {med * 1e3:7.1f} ms  x{med / naive:.2f} naive  "
            f"compile {benches[n].compile_s:5.1f} s",
            flush=True,
        )
    return out


def fisher_cost(sample_counts, size, batch_size) -> dict:
    naive = _Bench("naive", size, batch_size, 32)
    naive_step = statistics.median(naive.time_steps(10))
    out = {}
    for n in sample_counts:
        ewc = _Bench("ewc", size, batch_size, n)
        seconds = statistics.median([ewc.time_after_phase() for _ in range(2)])
        same_images = n / batch_size * naive_step
        out[n] = {
            "fisher_s": seconds,
            "first_pass_incl_compile_s": ewc.first_after_phase_s,
            "naive_steps_same_images_s": same_images,
            "ratio": seconds / same_images,
        }
        print(
            f"fisher {n:4d} samples: {seconds:6.2f} s (first, with compile: "
            f"{ewc.first_after_phase_s:5.1f} s); naive steps on the same images "
            f"{same_images:5.2f} s: x{seconds / same_images:.2f}",
            flush=True,
        )
    return out


def fisher_quality(sample_counts, seeds) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sample_counts:
            for seed in seeds:
                cfg = behaviour_di.get_config(f"strategy=ewc,seed={seed}")
                cfg.progress = False
                cfg.strategy.ewc_samples = n
                r = train.run(cfg, f"{tmp}/{n}_{seed}")
                row = {
                    "samples": n,
                    "seed": seed,
                    "avg_miou": r["avg_miou"],
                    "forgetting": r["forgetting"],
                    "avg_diag": r["avg_diag"],
                    "strategy_s": r["timing"]["strategy_s"],
                }
                rows.append(row)
                print(
                    f"ewc samples {n:4d} seed {seed}: avg {row['avg_miou']:.3f} forgetting "
                    f"{row['forgetting']:.3f} diag {row['avg_diag']:.3f}",
                    flush=True,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=6)
    parser.add_argument("--fisher-samples", default="32,128,512")
    parser.add_argument("--quality-seeds", default="", help="e.g. 0,1 (adds the quality sweep)")
    parser.add_argument("--out", default="experiments/results/bench_strategies.json")
    args = parser.parse_args()
    print(hostmem.keep_freed_memory(), flush=True)  # before JAX's threads allocate
    result = {
        "workload": "W2 model and batch (W1 UNet, SGD), step per strategy; EWC Fisher pass",
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "steps": step_ratios(
            args.strategies.split(","),
            args.size,
            args.batch_size,
            args.rounds,
            args.steps_per_round,
            samples=32,
        ),
        "fisher": fisher_cost(
            [int(s) for s in args.fisher_samples.split(",")], args.size, args.batch_size
        ),
    }
    if args.quality_seeds:
        seeds = [int(s) for s in args.quality_seeds.split(",")]
        result["fisher_quality"] = fisher_quality((8, 32, 128, 256), seeds)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
