"""Issue 4's speed figures: memory strategies' train step against naive, the GEM QP's share, and
why XLA:CPU computes GEM's memory blocks without ``lax.cond``.

    python experiments/bench_memory.py --out experiments/results/bench_memory.json

1. Step time on W2's model and batch (W1 UNet, 64x64, batch B = 32, SGD; a 4-experience stream)
   for naive, replay (200 rows, 32 replayed per step), GEM (32 rows per experience) and A-GEM
   (32 per experience, 32 per step), with the memory holding t = 0..3 experiences (the state
   during phase t). Rounds interleave the variants so that drifting load hits all alike; the
   figure is the median step. The issue's budget per phase is 1.1 x (1 + m_t / B) x naive, where
   m_t = memory rows whose gradient the step computes for its constraints (GEM: 32 t; A-GEM: 32
   once t > 0; replay: its 32 replayed rows); both are averaged over the four phases.
2. The QP alone: ``gem_project`` with t = 3 violated constraints over the model's parameter count,
   jitted by itself, against GEM's step.
3. A conv gradient plain and inside ``lax.cond``, the measurement behind gem.py's CPU path.
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
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clseg_jax import hostmem, models, setup, strategies
from clseg_jax import step as step_lib
from clseg_jax.kernels import select
from clseg_jax.models import layers
from clseg_jax.solvers import qp
from clseg_jax.strategies import base
from configs import w2

NUM_CLASSES, EXPERIENCES = 5, 4
STRATEGIES = ("naive", "replay", "gem", "agem")


def _images(n: int, size: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, NUM_CLASSES, (n, size, size), dtype=np.uint8),
    }


def _phase(index: int, data: dict[str, np.ndarray]) -> base.Phase:
    def batches(batch_size: int):
        for i in range(0, len(data["image"]), batch_size):
            yield {k: v[i : i + batch_size] for k, v in data.items()}

    classes = tuple(range(NUM_CLASSES))
    return base.Phase(index, (index,), classes, classes, np.ones(NUM_CLASSES, bool), batches)


def memory_rows(name: str, t: int, cfg) -> int:
    """m_t: rows whose gradient the step computes beyond the batch, in phase t."""
    if name == "gem":
        return cfg.gem_mem_per_exp * t
    if name == "agem":
        return cfg.agem_sample_size if t > 0 else 0
    if name == "replay":
        return cfg.replay_batch
    return 0


class _Variant:
    """One strategy's compiled step with its memory filled by t phases."""

    def __init__(self, name: str, t: int, size: int, batch_size: int):
        cfg = w2.get_config(f"strategy={name}")
        cfg.strategy.replay_batch = batch_size
        self.hparams = cfg.strategy
        # conv_impl resolved as a run resolves it (oneDNN on this CPU when built), and the
        # same value in the Env: GEM / A-GEM pick their CPU path from it.
        model_cfg = setup.model_config(cfg, 1)
        graphdef, params, stats = models.init(model_cfg, NUM_CLASSES, seed=0)
        forward = step_lib.make_forward(graphdef)
        self.forward, self.params, self.stats = forward, params, stats
        env = base.Env(
            forward,
            NUM_CLASSES,
            EXPERIENCES,
            image_shape=(size, size, 3),
            label_shape=(size, size),
            conv_impl=model_cfg.conv_impl,
        )
        strategy = strategies.make(cfg.strategy, env)
        tx = step_lib.make_optimizer(cfg.optimizer, 1000)
        sstate = jax.jit(strategy.init)(params, stats)
        for k in range(t):
            sstate = strategy.after_phase(params, stats, sstate, _phase(k, _images(64, size, k)))
        state = step_lib.TrainState(params, stats, tx.init(params), jnp.array(0, jnp.int32))
        batch = jax.device_put(_images(batch_size, size, 99))
        key, mask = jax.random.PRNGKey(0), jnp.ones(NUM_CLASSES, bool)
        step = jax.jit(step_lib.make_train_step(forward, strategy, tx), donate_argnums=(0, 2))
        carried = (state, sstate, step_lib.TrainMetrics.empty(), step_lib.new_monitor())
        compiled = step.lower(*carried, batch, key, mask).compile()
        self._fn = lambda c: compiled(c[0], c[1], c[2], c[3], batch, key, mask)
        self.carried = self._fn(carried)
        jax.block_until_ready(self.carried)

    def time_steps(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.carried = self._fn(self.carried)
            jax.block_until_ready(self.carried)
            out.append(time.perf_counter() - t0)
        return out


def step_costs(size: int, batch_size: int, rounds: int, steps: int) -> dict:
    variants = {("naive", 0): _Variant("naive", 0, size, batch_size)}
    for name in STRATEGIES[1:]:
        for t in range(EXPERIENCES):
            variants[(name, t)] = _Variant(name, t, size, batch_size)
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, v in variants.items():
            times[k] += v.time_steps(steps)
    naive = statistics.median(times[("naive", 0)])
    out = {"naive_step_s": naive}
    for name in STRATEGIES[1:]:
        per_phase = []
        for t in range(EXPERIENCES):
            v = variants[(name, t)]
            m = memory_rows(name, t, v.hparams)
            ratio = statistics.median(times[(name, t)]) / naive
            per_phase.append({"t": t, "m": m, "ratio": ratio, "budget": 1.1 * (1 + m / batch_size)})
        mean_ratio = float(np.mean([p["ratio"] for p in per_phase]))
        mean_budget = float(np.mean([p["budget"] for p in per_phase]))
        out[name] = {
            "per_phase": per_phase,
            "mean_ratio": mean_ratio,
            "mean_budget": mean_budget,
            "within_budget": mean_ratio <= mean_budget,
        }
        print(
            f"{name:7s} x naive per phase "
            + " ".join(f"{p['ratio']:.2f}(<={p['budget']:.2f})" for p in per_phase)
            + f"  mean {mean_ratio:.2f} vs budget {mean_budget:.2f}",
            flush=True,
        )
    return out


def qp_share(size: int, batch_size: int, gem_step_s: float) -> dict:
    v = _Variant("naive", 0, size, batch_size)
    n = sum(x.size for x in jax.tree.leaves(v.params))
    rng = np.random.default_rng(0)
    G = jnp.asarray(rng.standard_normal((EXPERIENCES - 1, n)), jnp.float32)
    g = -jnp.sum(G, axis=0)  # violates every constraint: the QP runs
    project = jax.jit(lambda g, G: qp.gem_project(g, G, jnp.ones(EXPERIENCES - 1, bool)))
    jax.block_until_ready(project(g, G))
    t0 = time.perf_counter()
    for _ in range(20):
        jax.block_until_ready(project(g, G))
    s = (time.perf_counter() - t0) / 20
    print(f"gem_project t=3 n={n}: {s * 1e3:.2f} ms = {100 * s / gem_step_s:.2f}% of GEM's step")
    return {"params": n, "project_s": s, "share_of_gem_step": s / gem_step_s}


def conv_in_cond(impl: str = "xla") -> dict:
    """A 4-conv gradient plain and inside ``lax.cond``, with XLA's or oneDNN's convolutions."""
    k = jax.random.PRNGKey(0)
    x = jax.random.normal(k, (32, 32, 32, 16))
    w = jax.random.normal(k, (3, 3, 16, 16))

    def f(w):
        y = x
        for _ in range(4):
            y = jax.nn.relu(layers.conv2d(y, w, impl=impl))
        return jnp.sum(y)

    g = jax.grad(f)
    plain = jax.jit(g)
    cond = jax.jit(lambda w, b: lax.cond(b, lambda: g(w), lambda: jnp.zeros_like(w)))
    out = {"conv_impl": impl}
    for name, fn, args in (("plain_s", plain, (w,)), ("in_cond_s", cond, (w, True))):
        jax.block_until_ready(fn(*args))
        t0 = time.perf_counter()
        for _ in range(5):
            jax.block_until_ready(fn(*args))
        out[name] = (time.perf_counter() - t0) / 5
    out["slowdown"] = out["in_cond_s"] / out["plain_s"]
    print(
        f"conv grad ({impl}): plain {out['plain_s'] * 1e3:.1f} ms, "
        f"in lax.cond x{out['slowdown']:.1f}"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps-per-round", type=int, default=4)
    parser.add_argument("--out", default="experiments/results/bench_memory.json")
    parser.add_argument("--cond-only", action="store_true", help="part 3 alone (printed, no JSON)")
    args = parser.parse_args()
    print(hostmem.keep_freed_memory(), flush=True)  # before JAX's threads allocate
    if args.cond_only:
        conv_in_cond("xla")
        conv_in_cond("onednn")
        return
    steps = step_costs(args.size, args.batch_size, args.rounds, args.steps_per_round)
    gem_step = steps["naive_step_s"] * steps["gem"]["per_phase"][-1]["ratio"]
    result = {
        "workload": "W2 model and batch (W1 UNet 64x64, batch 32, SGD), 4 experiences",
        "device": str(jax.devices()[0]),
        "backend": jax.default_backend(),
        "conv_impl": setup.model_config(w2.get_config(), 1).conv_impl,
        "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "steps": steps,
        "qp": qp_share(args.size, args.batch_size, gem_step),
        "conv_in_cond": conv_in_cond("xla"),
        "conv_in_cond_onednn": conv_in_cond("onednn")
        if select.why_not_onednn("float32", 1) is None
        else None,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
