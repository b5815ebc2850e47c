"""W1 of BENCHMARKS.md: the `unet64` train step, bare and through the `naive` strategy.

    python experiments/bench_step.py --torch --out experiments/results/bench_step.json

Each ``model.conv_impl`` of ``--impls`` (default: ``xla,onednn``) and, with ``--torch``, PyTorch
``channels_last`` (experiments/baselines/torch_step.py, in the PyTorch venv) are measured once
per round, ``--rounds`` interleaved rounds; ratios are of the medians over rounds.

Measures, in one process: steady-state images/s (median step time over >= 20 steps after warm-up,
each timed after ``block_until_ready``), compile seconds (ahead-of-time), achieved GFLOP/s from the
analytic 0.868 GFLOP per training image and as a fraction of a 2048x2048 float32 matmul measured in
the same run, and XLA's own FLOP count for reference. The bare step is model + pixel CE + SGD
written directly; the naive step is the library's train step (strategy hooks, class mask, metrics,
monitor, shardings), so plumbing costs cannot hide.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clseg_jax import hostmem, losses, models, sharding, strategies
from clseg_jax import step as step_lib
from clseg_jax.strategies import base
from configs import npz as npz_config

GFLOP_PER_TRAIN_IMAGE = 0.868  # BENCHMARKS.md W1, analytic (forward 0.2905)
NUM_CLASSES = 5


def _time_steps(fn, args, steps: int, warmup: int):
    """``(median seconds per call, all of them, minor page faults per call)``; ``fn`` returns the
    new ``args`` (donated state threads through)."""
    for _ in range(warmup):
        args = fn(*args)
    jax.block_until_ready(args)
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        t0 = time.perf_counter()
        args = fn(*args)
        jax.block_until_ready(args)
        times.append(time.perf_counter() - t0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return statistics.median(times), times, faults / steps


def matmul_gflops(n: int = 2048, reps: int = 10, dtype=jnp.float32) -> float:
    """GFLOP/s of an ``n x n`` matmul in ``dtype``: the peak a device reaches in practice."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def _xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost.get("flops")) if cost and "flops" in cost else None
    except Exception:  # cost analysis is best-effort reference information
        return None


def environment() -> dict:
    """Package versions and machine of a benchmark run, for its JSON."""
    return {
        "versions": {
            **{name: metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax")},
            "python": platform.python_version(),
        },
        "machine": {
            "platform": platform.platform(),
            "devices": [str(d) for d in jax.devices()],
            "cpu_count": os.cpu_count(),
        },
        # clseg_jax/hostmem.py: "keep" where the bench called keep_freed_memory first thing.
        "host_memory": os.environ.get("CLSEG_HOST_MEMORY", "keep"),
    }


def write_json(path: str, out: dict) -> None:
    """A benchmark's results file (its folder made if needed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(f"wrote {path}")


def _batch(batch_size: int, size: int):
    rng = np.random.default_rng(0)
    return {
        "image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, NUM_CLASSES, (batch_size, size, size), dtype=np.uint8),
    }


def bench_bare(cfg, batch_size: int, size: int, steps: int, warmup: int):
    graphdef, params, stats = models.init(cfg.model, NUM_CLASSES, seed=0)
    forward = step_lib.make_forward(graphdef)
    tx = optax.sgd(0.01, momentum=0.9)

    def step(params, stats, opt_state, batch):
        def loss_fn(p):
            out, new_stats = forward(p, stats, batch["image"], True)
            return losses.cross_entropy(out["logits"], batch["label"]), new_stats

        (_, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state

    batch = jax.device_put(_batch(batch_size, size))
    opt_state = tx.init(params)
    t0 = time.perf_counter()
    compiled = (
        jax.jit(step, donate_argnums=(0, 1, 2)).lower(params, stats, opt_state, batch).compile()
    )
    compile_s = time.perf_counter() - t0
    med, times, faults = _time_steps(
        lambda p, s, o: compiled(p, s, o, batch), (params, stats, opt_state), steps, warmup
    )
    return med, times, faults, compile_s, _xla_flops(compiled)


def bench_naive(cfg, batch_size: int, size: int, steps: int, warmup: int):
    graphdef, params, stats = models.init(cfg.model, NUM_CLASSES, seed=0)
    forward = step_lib.make_forward(graphdef)
    strategy = strategies.make(cfg.strategy, base.Env(forward, NUM_CLASSES, 4))
    tx = step_lib.make_optimizer(cfg.optimizer, 1000)
    mesh = sharding.make_mesh(cfg.sharding.mesh)
    state = step_lib.TrainState(params, stats, tx.init(params), jnp.array(0, jnp.int32))
    arrays = {"state": state, "sstate": strategy.init(params, stats)}
    shardings = step_lib.array_shardings(arrays, mesh)
    arrays = jax.device_put(arrays, shardings)
    jitted = step_lib.jit_train_step(
        step_lib.make_train_step(forward, strategy, tx), shardings, mesh
    )
    repl = sharding.replicated(mesh)
    batch = sharding.global_batch(_batch(batch_size, size), sharding.batch_sharding(mesh))
    key = jax.device_put(jax.random.PRNGKey(0), repl)
    mask = jax.device_put(jnp.ones(NUM_CLASSES, bool), repl)
    carried = (
        arrays["state"],
        arrays["sstate"],
        step_lib.TrainMetrics.empty(),
        step_lib.new_monitor(),
    )
    t0 = time.perf_counter()
    compiled = jitted.lower(*carried, batch, key, mask).compile()
    compile_s = time.perf_counter() - t0
    med, times, faults = _time_steps(
        lambda *c: compiled(*c, batch, key, mask), carried, steps, warmup
    )
    return med, times, faults, compile_s, _xla_flops(compiled)


BENCHES = {"bare": bench_bare, "naive": bench_naive}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_PYTHON = os.path.join(ROOT, ".venv-baselines", "bin", "python")


def torch_step(python: str, batch: int, size: int, steps: int, warmup: int) -> dict:
    """PyTorch channels_last's W1 step timed in its own process (experiments/baselines)."""
    script = os.path.join(ROOT, "experiments", "baselines", "torch_step.py")
    argv = [python, script, f"--batch={batch}", f"--size={size}", f"--steps={steps}"]
    proc = subprocess.run([*argv, f"--warmup={warmup}"], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"--torch: the PyTorch step failed: {proc.stderr.strip()[-500:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo): figures differ between machines of one kind."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--which", default="bare,naive")
    parser.add_argument(
        "--impls", default="xla,onednn", help="model.conv_impl values, compared in one run"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--torch",
        nargs="?",
        const=TORCH_PYTHON,
        default=None,
        help="also time PyTorch channels_last's W1 step in each round, with this Python "
        f"(default {TORCH_PYTHON}, `make baselines`' venv); fails if it is missing",
    )
    parser.add_argument("--out", default="experiments/results/bench_step.json")
    args = parser.parse_args()
    print(hostmem.keep_freed_memory(), flush=True)  # before JAX's threads allocate

    if args.torch and not os.path.exists(args.torch):
        raise SystemExit(
            f"--torch: {args.torch} does not exist; create the PyTorch venv (`make baselines`) "
            "or pass its python"
        )
    peak = matmul_gflops()
    results: dict = {}
    # Interleaved rounds: each round measures every (implementation, step) once, so that a
    # change in the machine's load hits all of them alike.
    for r in range(args.rounds):
        if args.torch:
            t = torch_step(args.torch, args.batch, args.size, args.steps, args.warmup)
            ips = args.batch / t["step_s_median"]
            t["images_per_s"] = ips
            results.setdefault("torch/channels_last", []).append(t)
            print(f"round {r} torch  channels_last {ips:7.1f} images/s", flush=True)
        for impl in args.impls.split(","):
            cfg = npz_config.get_config()
            cfg.model.conv_impl = impl
            for which in args.which.split(","):
                if which not in BENCHES:
                    raise SystemExit(f"unknown --which {which!r}; valid: {sorted(BENCHES)}")
                med, times, faults, compile_s, xla = BENCHES[which](
                    cfg, args.batch, args.size, args.steps, args.warmup
                )
                ips = args.batch / med
                gflops = ips * GFLOP_PER_TRAIN_IMAGE * (args.size / 64) ** 2
                results.setdefault(f"{which}/{impl}", []).append(
                    {
                        "images_per_s": ips,
                        "step_ms_median": med * 1e3,
                        "step_ms_all": [t * 1e3 for t in times],
                        "page_faults_per_step": faults,
                        "compile_s": compile_s,
                        "gflops_analytic": gflops,
                        "fraction_of_matmul_peak": gflops / peak,
                        "xla_gflop_per_step": xla / 1e9 if xla else None,
                    }
                )
                print(
                    f"round {r} {which:6s} {impl:6s} {ips:7.1f} images/s  {med * 1e3:7.1f} "
                    f"ms/step  compile {compile_s:5.1f} s  {gflops / peak:.0%} of matmul peak  "
                    f"{faults:6.0f} page faults/step",
                    flush=True,
                )
    summary = {
        key: statistics.median(x["images_per_s"] for x in rounds) for key, rounds in results.items()
    }
    impls = args.impls.split(",")
    ratios = {
        f"{which}: {a} / {impls[0]}": summary[f"{which}/{a}"] / summary[f"{which}/{impls[0]}"]
        for which in args.which.split(",")
        for a in impls[1:]
    }
    if args.torch:  # the claim against PyTorch only from a run where PyTorch ran
        torch_ips = summary["torch/channels_last"]
        ratios.update(
            {
                f"{which}: {impl} / torch channels_last": summary[f"{which}/{impl}"] / torch_ips
                for which in args.which.split(",")
                for impl in impls
            }
        )
    for k, v in ratios.items():
        print(f"{k} = {v:.2f}x")
    cfg = npz_config.get_config()
    params = sum(x.size for x in jax.tree.leaves(models.init(cfg.model, NUM_CLASSES, 0)[1]))
    out = {
        "workload": "W1 unet64 train step",
        "batch": args.batch,
        "image_size": args.size,
        "parameters": int(params),
        "matmul_2048_gflops": peak,
        "results": results,
        "median_images_per_s": summary,
        "ratios": ratios,
        "cpu_model": cpu_model(),
        "config": cfg.to_dict(),
        **environment(),
    }
    print(f"matmul peak {peak:.0f} GFLOP/s")
    write_json(args.out, out)


if __name__ == "__main__":
    main()
