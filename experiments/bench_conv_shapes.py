"""Every convolution of the models' train steps, XLA against oneDNN, one geometry at a time.

What ``model.conv_impl=auto`` rests on (docs/cpu_speed.md): oneDNN on a one-device CPU run for
every float32 convolution, if it is at least as fast as XLA for each geometry the models use.
The geometries are read from the models' own forward passes (``conv_general_dilated`` in the
jaxpr of ``conv_impl=xla``), at the sizes of the benchmarks' workloads: W1's UNet (batch 32,
64x64), W4's ResNet-18 teacher (batch 256, 32x32, small input), DeepLab-v3 on ResNet-50
(output stride 16) and BiSeNet (batch 8, 128x128). Each geometry is timed as a forward plus
both gradients (what a train step runs), jitted per implementation, in interleaved rounds:

    python experiments/bench_conv_shapes.py --out experiments/results/bench_conv_shapes.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clseg_jax import hostmem

WORKLOADS = {
    # name: (model name, kwargs, batch, size, classes)
    "unet_w1": ("unet", {}, 32, 64, 5),
    "resnet18_w4": ("resnet18", {"small_input": True}, 256, 32, 10),
    "deeplabv3_r50": ("deeplabv3_r50", {}, 4, 128, 21),
    "bisenet": ("bisenet", {}, 8, 128, 21),
}


def geometries(name: str, kwargs: dict, batch: int, size: int, classes: int) -> list[tuple]:
    """``(x shape, kernel shape, strides, padding, dilation)`` of every convolution (unique)."""
    import jax
    import jax.extend
    import jax.numpy as jnp
    import ml_collections

    from clseg_jax import models
    from clseg_jax import step as step_lib

    cfg = ml_collections.ConfigDict({"name": name, "kwargs": kwargs, "conv_impl": "xla"})
    graphdef, params, stats = models.init(cfg, classes, seed=0)
    forward = step_lib.make_forward(graphdef)
    x = jnp.zeros((batch, size, size, 3), jnp.uint8)
    jaxpr = jax.make_jaxpr(lambda p: forward(p, stats, x, True))(params)
    found: dict[tuple, None] = {}

    def visit(jp) -> None:
        for eqn in jp.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                lhs, rhs = (v.aval.shape for v in eqn.invars)
                p = eqn.params
                if p["feature_group_count"] != 1 or any(d != 1 for d in p["lhs_dilation"]):
                    continue
                found[
                    (
                        tuple(lhs),
                        tuple(rhs),
                        tuple(p["window_strides"]),
                        tuple(tuple(q) for q in p["padding"]),
                        tuple(p["rhs_dilation"]),
                    )
                ] = None
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr.jaxpr)
    return list(found)


def time_geometry(geometry: tuple, rounds: int, reps: int) -> dict:
    """Median seconds of forward + both gradients, per implementation, interleaved rounds."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from clseg_jax.kernels import onednn

    x_shape, k_shape, strides, padding, dilation = geometry
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape, np.float32))
    k = jnp.asarray(rng.standard_normal(k_shape, np.float32) * 0.1)
    # The kernel itself on the oneDNN side (layers.conv2d keeps some shapes XLA's).
    convs = {
        "xla": lambda x, k: jax.lax.conv_general_dilated(
            x,
            k,
            strides,
            padding,
            rhs_dilation=dilation,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        ),
        "onednn": lambda x, k: onednn.conv2d(x, k, strides, padding, dilation),
    }
    fns = {}
    for impl, conv in convs.items():
        fns[impl] = jax.jit(jax.grad(lambda x, k, conv=conv: jnp.sum(conv(x, k) ** 2), (0, 1)))
        jax.block_until_ready(fns[impl](x, k))
    times: dict[str, list[float]] = {impl: [] for impl in fns}
    for _ in range(rounds):
        for impl, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                jax.block_until_ready(fn(x, k))
            times[impl].append((time.perf_counter() - t0) / reps)
    out = {impl: statistics.median(t) * 1e3 for impl, t in times.items()}
    return {"ms_xla": out["xla"], "ms_onednn": out["onednn"], "speedup": out["xla"] / out["onednn"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default="experiments/results/bench_conv_shapes.json")
    args = parser.parse_args()
    print(hostmem.keep_freed_memory(), flush=True)  # before JAX's threads allocate

    from experiments.bench_step import cpu_model, environment, write_json

    rows = []
    for workload in args.workloads.split(","):
        if workload not in WORKLOADS:
            raise SystemExit(f"unknown workload {workload!r}; valid: {sorted(WORKLOADS)}")
        for geometry in geometries(*WORKLOADS[workload]):
            row = {"workload": workload, "geometry": geometry}
            row.update(time_geometry(geometry, args.rounds, args.reps))
            rows.append(row)
            x, k, s, _, d = geometry
            print(
                f"{workload:14s} x{list(x)} k{list(k)} s{list(s)} d{list(d)}: XLA "
                f"{row['ms_xla']:7.2f} ms  oneDNN {row['ms_onednn']:7.2f} ms  "
                f"{row['speedup']:5.2f}x",
                flush=True,
            )
    slower = [r for r in rows if r["speedup"] < 1.0]
    print(f"{len(rows)} geometries; oneDNN slower than XLA on {len(slower)}")
    write_json(args.out, {"rows": rows, "cpu_model": cpu_model(), **environment()})


if __name__ == "__main__":
    main()
