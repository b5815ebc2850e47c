"""The workloads of ``bench_accel.py``, imported once the library's dependencies are there.

Each is the library's own compiled program under ``precision=auto`` on fixed synthetic batches;
see ``bench_accel.py`` for what they are and what is reported.
"""

from __future__ import annotations

import time
from importlib import metadata

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clseg_jax import models, precision, setup
from clseg_jax.synthesis import deepinversion
from configs import shapes_di
from experiments import bench_w3, bench_w4
from experiments.bench_step import _time_steps, _xla_flops, environment, matmul_gflops, write_json

WARMUP = 2


def _step_config(strategy: str, w1: dict) -> ml_collections.ConfigDict:
    """W1's model and batch on the demo stream (a batch's worth of images per experience)."""
    c = shapes_di.get_config(f"strategy={strategy}")
    c.data.image_size = w1["size"]
    c.data.train_per_exp = c.data.test_per_exp = w1["batch"]
    c.model.kwargs.widths = tuple(w1["widths"])
    c.batch_size = w1["batch"]
    c.optimizer.name, c.optimizer.lr, c.optimizer.momentum = "sgd", 0.01, 0.9
    c.precision = "auto"
    c.progress = False
    return c


def step_bench(config: ml_collections.ConfigDict, steps: int, peak_tflops: float) -> dict:
    """The run's compiled train step (``setup.compile_step``) on one synthetic batch."""
    parts = setup.build(config)
    t0 = time.perf_counter()
    compiled = setup.compile_step(parts)
    compile_s = time.perf_counter() - t0
    b, env = config.batch_size, parts.env
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (b, *env.image_shape), dtype=np.uint8),
        "label": rng.integers(0, parts.stream.num_classes, (b, *env.label_shape), dtype=np.uint8),
    }
    batch = jax.device_put(batch, setup.feed_sharding(parts))
    key, mask = parts.arrays["rng"], jnp.ones(parts.stream.num_classes, bool)
    carried = (parts.arrays["state"], parts.arrays["sstate"], *setup.fresh_accumulators(parts))
    med, times, _ = _time_steps(lambda *c: compiled(*c, batch, key, mask), carried, steps, WARMUP)
    return _figures(b / med, med, times, compile_s, _xla_flops(compiled), peak_tflops)


def _figures(ips, med, times, compile_s, flops, peak_tflops) -> dict:
    achieved = flops / med / 1e12 if flops else None
    return {
        "images_per_s": ips,
        "step_ms_median": med * 1e3,
        "step_ms_all": [t * 1e3 for t in times],
        "compile_s": compile_s,
        "xla_gflop_per_step": flops / 1e9 if flops else None,
        "achieved_tflops": achieved,
        "mfu_vs_matmul": achieved / peak_tflops if achieved else None,
    }


def w4(spec: dict, peak_tflops: float) -> dict:
    """DeepInversion's compiled ``lax.scan`` synthesis: per iteration ``(t(k) - t(0)) / k``."""
    cfg = ml_collections.ConfigDict({"name": "resnet18", "kwargs": {"small_input": True}})
    graphdef, params, stats = models.init(precision.model_config(cfg, "auto"), 10, 0)
    k, n, size = spec["iters"], spec["batch"], spec["size"]
    di = deepinversion.DIConfig()
    targets, key = bench_w4.jax_inputs(di, n, size, 0)
    shape = (size, size, 3)
    runs = {}
    for iters in (k, 0):
        runs[iters] = bench_w4.compile_synthesize(
            graphdef, params, stats, di._replace(iterations=iters), targets, key, shape
        )
    seconds = {}
    for iters, (compiled, _) in runs.items():
        jax.block_until_ready(compiled((params, stats), targets, key))  # warm
        t0 = time.perf_counter()
        jax.block_until_ready(compiled((params, stats), targets, key))
        seconds[iters] = time.perf_counter() - t0
    per_iter = max(seconds[k] - seconds[0], 1e-9) / k
    return {
        "iterations_per_s": 1 / per_iter,
        "synthetic_images_x_iterations_per_s": n / per_iter,
        "compile_s": runs[k][1],
        "call_s": seconds,
        # XLA counts a loop body once whatever its trip count: the figure is per program.
        "xla_gflop_per_program": (_xla_flops(runs[k][0]) or 0) / 1e9,
    }


def run(preset: dict, name: str, workloads: list[str], out_path: str) -> None:
    peak = matmul_gflops(preset["matmul"], dtype=jnp.bfloat16) / 1e3
    sheet, sheet_source = bench_w3._peak_tflops(None)
    print(f"{jax.devices()[0].device_kind}: bf16 matmul {peak:.1f} TFLOP/s", flush=True)
    out = {
        "preset": name,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "precision": precision.describe(_step_config("naive", preset["w1"])),
        "matmul_bf16_tflops": peak,
        "data_sheet_tflops": sheet if sheet_source.startswith("data sheet") else None,
        "workloads": {},
        **environment(),
        "library_deps": {
            n: metadata.version(n) for n in ("grain", "clu", "ml-collections", "orbax-checkpoint")
        },
    }
    results = out["workloads"]
    if "w1" in workloads:
        results["w1"] = step_bench(_step_config("naive", preset["w1"]), preset["steps"], peak)
        _say("W1", results["w1"])
    if "w2" in workloads:
        results["w2"] = {}
        for strategy in preset["w2"]:
            config = _step_config(strategy, preset["w1"])
            results["w2"][strategy] = step_bench(config, preset["steps"], peak)
            _say(f"W2 {strategy}", results["w2"][strategy])
    if "w3" in workloads:
        results["w3"] = {}
        for strategy in ("mib", "plop"):
            r = bench_w3.bench(bench_w3.PRESETS[preset["w3"]], strategy, preset["steps"], WARMUP)
            r["mfu_vs_matmul"] = r["achieved_tflops"] / peak if r["achieved_tflops"] else None
            results["w3"][strategy] = r
            _say(f"W3 {strategy}", r)
    if "w4" in workloads:
        results["w4"] = w4(preset["w4"], peak)
        print(
            f"W4: {results['w4']['iterations_per_s']:.1f} it/s, compile "
            f"{results['w4']['compile_s']:.1f} s",
            flush=True,
        )
    write_json(out_path, out)


def _say(label: str, r: dict) -> None:
    mfu = f"{r['mfu_vs_matmul']:.1%}" if r.get("mfu_vs_matmul") else "-"
    print(
        f"{label}: {r['images_per_s']:.1f} images/s, MFU {mfu}, compile {r['compile_s']:.1f} s",
        flush=True,
    )
