"""W3 of BENCHMARKS.md: the class-incremental segmentation train step (DeepLab-v3, MiB / PLOP).

    python experiments/bench_w3.py --preset cpu --out experiments/results/bench_w3_cpu.json
    python experiments/bench_w3.py --preset gpu --out experiments/results/bench_w3_gpu.json

Times the library's own compiled train step (strategy hooks, class mask, metrics, monitor,
shardings) for each ``--strategies`` entry on a second-phase state: the frozen old model's forward
and the distillation terms run inside the same compiled step. Reports steady-state images/s
(median over ``--steps`` after warm-up, each step timed after ``block_until_ready``), compile
seconds, XLA's FLOP count per step and MFU = achieved FLOP/s over the device's peak
(``--peak-tflops``; by default a table of known accelerators, on CPU a float32 2048x2048 matmul
measured in the same run).

``--flops-only`` prints XLA's FLOP count per training image of the lowered step (no
compilation, so the full-size GPU preset can be counted on a laptop).

Presets: ``cpu`` is a correctness-sized shape (the small DeepLab, 64x64, batch 4, float32); ``gpu``
is W3's (DeepLab-v3 ResNet-101, OS16, crop 512, global batch 24, 21 classes, bf16 compute).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clseg_jax import hostmem, models, sharding, strategies
from clseg_jax import step as step_lib
from clseg_jax.strategies import base
from experiments.bench_step import _time_steps, _xla_flops, environment, matmul_gflops

NUM_CLASSES = 21
PRESETS = {
    "cpu": {"model": "deeplabv3_small", "size": 64, "batch": 4, "dtype": None},
    "gpu": {"model": "deeplabv3_r101", "size": 512, "batch": 24, "dtype": "bfloat16"},
}
# Dense bf16 peak TFLOP/s by device kind (vendor data sheets; SXM parts).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5e": 197.0}


def _peak_tflops(explicit: float | None) -> tuple[float, str]:
    if explicit:
        return explicit, "given"
    kind = jax.devices()[0].device_kind
    for name, value in PEAK_TFLOPS.items():
        if name in kind:
            return value * jax.device_count(), f"data sheet ({kind})"
    return matmul_gflops() / 1e3, "measured f32 matmul"


def _phase(num_classes: int, old: int) -> base.Phase:
    """The second phase of a 15-5-like protocol: classes 0..old-1 known, the rest new."""
    seen = tuple(range(num_classes))
    mask = np.ones(num_classes, bool)
    return base.Phase(1, (1,), seen[old:], seen, mask, lambda b: iter(()))


def bench(
    preset: dict, strategy_name: str, steps: int, warmup: int, flops_only: bool = False
) -> dict:
    cfg = ml_collections.ConfigDict(
        {"name": preset["model"], "kwargs": {"dtype": preset["dtype"]} if preset["dtype"] else {}}
    )
    graphdef, params, stats = models.init(cfg, NUM_CLASSES, seed=0)
    forward = step_lib.make_forward(graphdef)
    size, batch_size = preset["size"], preset["batch"]
    env = base.Env(
        forward, NUM_CLASSES, 2, image_shape=(size, size, 3), label_shape=(size, size), seed=0
    )
    scfg = ml_collections.ConfigDict({**strategies.default_hparams(), "name": strategy_name})
    strategy = strategies.make(scfg, env)
    opt = ml_collections.ConfigDict(
        {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "poly"}
    )
    tx = step_lib.make_optimizer(opt, 1000)
    # One program, as the trainer does: distinct output buffers (the step donates its state).
    sstate = jax.jit(strategy.init)(params, stats)
    # A finished first phase: the snapshot is active and the old model is the current one.
    sstate = strategy.after_phase(params, stats, sstate, _phase(NUM_CLASSES, 0)._replace(index=0))
    mesh = sharding.make_mesh((("data", -1),))
    state = step_lib.TrainState(params, stats, tx.init(params), jnp.array(0, jnp.int32))
    arrays = {"state": state, "sstate": sstate}
    shardings = step_lib.array_shardings(arrays, mesh)
    arrays = jax.device_put(arrays, shardings)
    jitted = step_lib.jit_train_step(
        step_lib.make_train_step(forward, strategy, tx), shardings, mesh
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, NUM_CLASSES, (batch_size, size, size), dtype=np.uint8),
    }
    batch = sharding.global_batch(batch, sharding.batch_sharding(mesh))
    repl = sharding.replicated(mesh)
    key = jax.device_put(jax.random.PRNGKey(0), repl)
    mask = jax.device_put(jnp.ones(NUM_CLASSES, bool), repl)
    carried = (
        arrays["state"],
        arrays["sstate"],
        step_lib.TrainMetrics.empty(),
        step_lib.new_monitor(),
    )
    lowered = jitted.lower(*carried, batch, key, mask)
    if flops_only:  # XLA's count on the lowered program: no compilation, any machine
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return {"gflop_per_image": float(cost["flops"]) / 1e9 / batch_size}
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    med, times, _ = _time_steps(lambda *c: compiled(*c, batch, key, mask), carried, steps, warmup)
    flops = _xla_flops(compiled)
    return {
        "images_per_s": batch_size / med,
        "step_ms_median": med * 1e3,
        "step_ms_all": [t * 1e3 for t in times],
        "compile_s": compile_s,
        "xla_gflop_per_step": flops / 1e9 if flops else None,
        "achieved_tflops": flops / med / 1e12 if flops else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--strategies", default="naive,mib,plop")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument(
        "--flops-only", action="store_true", help="GFLOP per image from XLA, no timing"
    )
    parser.add_argument("--batch", type=int, default=None, help="override the preset's batch")
    parser.add_argument("--out", default="experiments/results/bench_w3_cpu.json")
    args = parser.parse_args()
    print(hostmem.keep_freed_memory(), flush=True)  # before JAX's threads allocate

    preset = dict(PRESETS[args.preset])
    if args.batch:
        preset["batch"] = args.batch
    if args.flops_only:
        for name in args.strategies.split(","):
            r = bench(preset, name, 0, 0, flops_only=True)
            print(f"{name:6s} {r['gflop_per_image']:8.1f} GFLOP per training image")
        return
    peak, peak_source = _peak_tflops(args.peak_tflops)
    results = {}
    for name in args.strategies.split(","):
        r = bench(preset, name, args.steps, args.warmup)
        r["mfu"] = r["achieved_tflops"] / peak if r["achieved_tflops"] else None
        results[name] = r
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(
            f"{name:6s} {r['images_per_s']:8.2f} images/s  {r['step_ms_median']:8.1f} ms/step  "
            f"compile {r['compile_s']:6.1f} s  MFU {mfu}"
        )
    naive = results.get("naive")
    if naive:
        for r in results.values():
            r["step_vs_naive"] = r["step_ms_median"] / naive["step_ms_median"]
    out = {
        "workload": "W3 class-incremental segmentation train step",
        "preset": args.preset,
        **preset,
        "num_classes": NUM_CLASSES,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "results": results,
        **environment(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
