"""W4 of BENCHMARKS.md: DeepInversion synthesis, clseg_jax vs NVlabs' loop in PyTorch, one run.

    .venv/bin/python experiments/bench_w4.py --out experiments/results/bench_w4_cpu.json
    .venv/bin/python experiments/bench_w4.py --gpu --out experiments/results/bench_w4_gpu.json

The workload: a ResNet-18 teacher on 32x32 inputs (``resnet.ResNet(depth=18, small_input=True)``,
10 classes), 256 synthetic images per batch, Adam on the pixels with the BatchNorm-statistics
loss, TV (L1, L2) and L2 priors, random-roll jitter and flips, clipping to [-1, 1]; every
hyperparameter is ``clseg_jax.synthesis.deepinversion.DIConfig``'s default, handed to the PyTorch
side unchanged. Our side is ``deepinversion.synthesize``, both of its paths (the whole loop one
compiled program, for accelerators; one compiled iteration per step, its CPU default); the
PyTorch side is
``experiments/baselines/deepinversion_torch.py`` (the reference's eager loop
with BatchNorm forward hooks), run by the baselines venv's Python in a subprocess, one side after
the other so they never share the cores.

Same teacher on both sides: ``models.init`` with ``--seed``, its BatchNorm scales, shifts and
running statistics then randomised (a freshly initialised network has mean 0 / variance 1 / scale
1 / shift 0 everywhere, which would hide a mis-mapped statistic), written with
``models.weights.save`` and loaded by the PyTorch side through ``convert_torchvision``'s mapping;
or a trained teacher from ``--teacher FILE.npz``.

Before timing, a check (``--check-batch`` images, ``--check-iters`` iterations): the teacher's
logits and every BatchNorm layer's statistics distance agree (layers in call order, named by
PyTorch's hooks); which layer each side weights by ``first_bn_multiplier`` (the reference: the
stem's); from the same start, with the config's hyperparameters but no jitter or flips (so both
sides see the same pixels), every iteration's loss parts of ``synthesize`` agree with the PyTorch
loop's, and so do the final images (the same Adam, schedule and clipping); our two timed paths
(below) give the same images for the same key, jitter and flips on. Its figures go into the JSON
next to the timings.

Timing interleaves every path in blocks: each of ``--blocks`` blocks runs ``--block-iters``
iterations of every path in turn, the order rotating from block to block, so a shared machine's
changing load hits every path alike; a path's figure is the median over blocks of its mean
seconds per iteration, and a speed-up is the median over blocks of the same block's ratio
(PyTorch's seconds over ours: > 1 means ours is faster). The default 5 blocks x 2 iterations time
10 steady-state iterations per path. The paths:

* ``ours synthesize``: the library's ``lax.scan`` loop, one program, compiled ahead of time; per
  iteration ``(t(k) - t(0)) / k`` from one call of ``k = --block-iters`` iterations and one of 0
  iterations (the call's fixed cost: the random start and the final un-jittered forward).
* ``ours host_loop``: ``synthesize(..., loop="host")``, the default on CPU: the library's jitted
  iteration dispatched from Python (the same images for the same key, see the check). The two
  differ on XLA:CPU, which runs convolutions inside control flow (the scan's while loop) far
  slower than at a program's top level (``clseg_jax/strategies/gem.py`` measured it for
  ``lax.cond``).
* ``torch nchw``: the reference's loop and layout with the teacher frozen (only the pixels'
  gradient, as ours); ``torch channels_last`` (PyTorch's fastest CPU layout in W1);
  ``torch reference_grads``: as the reference is written, the teacher's parameters trainable, so
  each backward also computes weight gradients it throws away. One PyTorch process (``serve``
  mode) builds and warms up (``--warmup`` iterations) each variant once, on its own copy of the
  teacher, and runs the blocks it is sent through a pipe.

Threads: ``torch.set_num_threads`` = the cores XLA's CPU client uses (this process's CPU
affinity; ``--cores N`` pins both sides to N CPUs); the two processes never compute at the same
time.

On a 2-core CPU one iteration takes seconds, so this times 10-20 iterations per path; the full
2,000-iteration synthesis of BENCHMARKS.md is for a GPU (``--gpu``: both sides on the
accelerator, one block of 2,000 iterations; needs a CUDA jaxlib and the baselines venv's CUDA
torch; not run here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata


def _pin_cores(argv: list[str]) -> None:
    """``--cores N``: keep this process (and the PyTorch child, which inherits it) on the first N
    CPUs it may use. Before jax is imported: XLA sizes its CPU thread pool from the affinity."""
    if "--cores" in argv:
        n = int(argv[argv.index("--cores") + 1])
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])


_pin_cores(sys.argv)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from clseg_jax import hostmem, models  # noqa: E402
from clseg_jax.models import layers, weights  # noqa: E402
from clseg_jax.synthesis import deepinversion  # noqa: E402

TORCH_SCRIPT = os.path.join(REPO, "experiments", "baselines", "deepinversion_torch.py")
TORCH_PYTHON = os.path.join(REPO, ".venv-baselines", "bin", "python")
NUM_CLASSES = 10


# ----------------------------------------------------------------------------- the teacher


def make_teacher(
    seed: int, path: str | None, conv_impl: str = "auto"
) -> tuple[nnx.GraphDef, dict, dict]:
    """ResNet-18 (small input), from ``path`` or freshly initialised with randomised BatchNorms;
    convolutions by ``conv_impl`` (``auto``: oneDNN on a CPU where built, as a run's default)."""
    cfg = ml_collections.ConfigDict(
        {"name": "resnet18", "kwargs": {"small_input": True}, "conv_impl": conv_impl}
    )
    graphdef, params, stats = models.init(cfg, NUM_CLASSES, seed)
    if path:
        params, stats = weights.load(path, params, stats)
        return graphdef, params, stats
    rng = np.random.default_rng(seed)

    def randomise(tree: dict, leaf: str, draw) -> dict:
        return {
            k: randomise(v, leaf, draw) if isinstance(v, dict) else (draw(v) if k == leaf else v)
            for k, v in tree.items()
        }

    f32 = lambda a: jnp.asarray(a, jnp.float32)
    params = randomise(params, "scale", lambda v: f32(rng.uniform(0.5, 1.5, v.shape)))
    params = randomise(params, "bias", lambda v: f32(v + rng.normal(0, 0.1, v.shape)))
    stats = randomise(stats, "mean", lambda v: f32(rng.normal(0, 0.2, v.shape)))
    stats = randomise(stats, "var", lambda v: f32(rng.uniform(0.5, 2.0, v.shape)))
    return graphdef, params, stats


def teacher_reference(graphdef, params, stats, images) -> tuple[np.ndarray, list[float]]:
    """Logits and each BatchNorm's ``||var - running_var|| + ||mean - running_mean||`` (in
    ``layers.captured_moments`` order) from the model directly, without the synthesis module."""
    model = layers.capture_moments(nnx.merge(graphdef, params, stats))
    logits = model(jnp.asarray(images), train=False)["logits"]
    dist = [
        float(jnp.linalg.norm(rv - v) + jnp.linalg.norm(rm - m))
        for m, v, rm, rv in layers.captured_moments(model)
    ]
    return np.asarray(logits), dist


# ----------------------------------------------------------------------------- the two sides


def torch_config(cfg: deepinversion.DIConfig, **sizes) -> dict:
    """The PyTorch loop's hyperparameters (``cfg``'s) and the run's sizes, as JSON values."""
    return {
        "lr": cfg.lr,
        "betas": list(cfg.betas),
        "eps": cfg.eps,
        "bn_scale": cfg.bn_scale,
        "first_bn_multiplier": cfg.first_bn_multiplier,
        "tv_l1": cfg.tv_l1,
        "tv_l2": cfg.tv_l2,
        "l2": cfg.l2,
        "main_scale": cfg.main_scale,
        "jitter": int(cfg.jitter),
        "flip": bool(cfg.flip),
        "warmup_iterations": int(cfg.warmup_iterations),
        "schedule_iterations": int(cfg.iterations),
        **sizes,
    }


def run_torch(python: str, workdir: str, tag: str, teacher: str, config: dict, *extra) -> dict:
    """One PyTorch subprocess; its JSON."""
    cfg_path = os.path.join(workdir, f"{tag}_cfg.json")
    out_path = os.path.join(workdir, f"{tag}_out.json")
    with open(cfg_path, "w") as f:
        json.dump(config, f)
    cmd = [python, TORCH_SCRIPT, "--weights", teacher, "--config", cfg_path, "--out", out_path]
    subprocess.run([*cmd, *extra], check=True)
    with open(out_path) as f:
        return json.load(f)


def jax_inputs(cfg, batch: int, size: int, seed: int):
    """``(targets [N], key)`` of a timed synthesis."""
    return jnp.arange(batch, dtype=jnp.int32) % NUM_CLASSES, jax.random.key(seed)


def compile_synthesize(graphdef, params, stats, cfg, targets, key, shape):
    """``synthesize`` compiled ahead of time (one program: ``jax.jit`` inlines its inner jit), so
    compilation and the timed run are separate."""
    teacher = deepinversion.make_teacher_fn(graphdef)

    def run(tvars, targets, key):
        return deepinversion.synthesize(
            teacher, tvars, targets, key, cfg, image_shape=shape, loop="scan"
        )

    t0 = time.perf_counter()
    compiled = jax.jit(run).lower((params, stats), targets, key).compile()
    return compiled, time.perf_counter() - t0


def make_step(graphdef, cfg, shape):
    """The library's CPU path (``synthesize(..., loop="host")``) one iteration at a time:
    ``step(carry, i, tvars, targets, k_loop) -> (carry, parts)`` is ``deepinversion``'s own
    jitted iteration, ``start(key, targets, tvars) -> (carry, k_loop)`` its start."""
    teacher = deepinversion.make_teacher_fn(graphdef)

    def problem(tvars, targets):
        return deepinversion._prepare(
            teacher, tvars, cfg, targets, None, None, None, shape, None, 0
        )

    def step(carry, i, tvars, targets, k_loop):
        fns, ctx = problem(tvars, targets)
        return deepinversion._host_iteration(fns, ctx, k_loop, carry, i, None)

    def start(key, targets, tvars):
        fns, ctx = problem(tvars, targets)
        return deepinversion._host_start(fns.static, ctx["hyper"], targets, key, None, False)

    return step, start


def compile_jax(graphdef, params, stats, cfg, args) -> dict:
    """Our timed programs, compiled ahead of time: ``synthesize`` of ``--block-iters``
    iterations and of 0 (its fixed cost: the random start and the final forward), and the host
    loop's step. ``{name: (compiled, compile_s)}``."""
    shape = (args.size, args.size, 3)
    targets, key = jax_inputs(cfg, args.batch, args.size, args.seed)
    out = {}
    for name, iterations in (("synthesize", args.block_iters), ("synthesize_0", 0)):
        c = cfg._replace(iterations=iterations)
        out[name] = compile_synthesize(graphdef, params, stats, c, targets, key, shape)
    if args.host_loop:
        step, start = make_step(graphdef, cfg, shape)
        carry, k_loop = start(key, targets, (params, stats))
        t0 = time.perf_counter()
        carry, _ = step(carry, jnp.int32(0), (params, stats), targets, k_loop)
        jax.block_until_ready(carry)
        out["host_loop"] = (step, time.perf_counter() - t0)
        out["host_state"] = [carry, k_loop, 1]
    return out


def jax_block(path: str, compiled: dict, params, stats, cfg, args, block: int) -> list[float]:
    """Seconds per iteration of ``--block-iters`` iterations of one of our paths.

    ``synthesize``: ``(t(k) - t(0)) / k`` from one call of each program, so the call's fixed
    cost (start, final forward) is not counted as iterations (one value, repeated k times). The
    host loop: each step's seconds, continuing one synthesis from block to block."""
    k = args.block_iters
    targets, key = jax_inputs(cfg, args.batch, args.size, args.seed + block)
    if path == "synthesize":
        seconds = []
        for name in ("synthesize", "synthesize_0"):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled[name][0]((params, stats), targets, key))
            seconds.append(time.perf_counter() - t0)
        return [(seconds[0] - seconds[1]) / k] * k
    step = compiled["host_loop"][0]
    state = compiled["host_state"]
    carry, k_loop, i = state
    times = []
    for _ in range(k):
        t0 = time.perf_counter()
        carry, parts = step(carry, jnp.int32(i), (params, stats), targets, k_loop)
        jax.block_until_ready((carry, parts["total"]))
        times.append(time.perf_counter() - t0)
        i += 1
    state[:] = [carry, k_loop, i]
    return times


class TorchServer:
    """The PyTorch side in ``serve`` mode: its variants built and warmed up once, then driven
    block by block through a pipe."""

    def __init__(self, args, workdir: str, teacher_path: str, config: dict, variants: str):
        cfg_path = os.path.join(workdir, "serve_cfg.json")
        self.out_path = os.path.join(workdir, "serve_out.json")
        with open(cfg_path, "w") as f:
            json.dump(config, f)
        cmd = [args.torch_python, TORCH_SCRIPT, "--weights", teacher_path, "--config", cfg_path]
        cmd += ["--out", self.out_path, "--mode", "serve", "--variants", variants]
        cmd += ["--device", args.torch_device]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the PyTorch side did not start; see its messages above")

    def block(self, variant: str, n: int) -> list[float]:
        self.proc.stdin.write(f"{variant} {n}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        if self.proc.wait() != 0:
            raise RuntimeError("the PyTorch side failed")
        with open(self.out_path) as f:
            return json.load(f)


# ----------------------------------------------------------------------------- the check


def _xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost["flops"]) if cost and "flops" in cost else None
    except Exception:  # cost analysis is best-effort reference information
        return None


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def check(graphdef, params, stats, cfg, args, workdir: str, teacher_path: str) -> dict:
    """Both sides from the same start, the config's hyperparameters without jitter and flips
    (module docstring); which layer each side weights by ``first_bn_multiplier`` is named."""
    n, size = args.check_batch, args.size
    rng = np.random.default_rng(args.seed + 1)
    init = np.clip(rng.normal(0, 0.5, (n, size, size, 3)), -1, 1).astype(np.float32)
    targets = (np.arange(n) % NUM_CLASSES).astype(np.int32)
    np.savez(os.path.join(workdir, "check_init.npz"), images=init, targets=targets)
    loop_cfg = cfg._replace(iterations=args.check_iters, jitter=0, flip=False)
    theirs = run_torch(
        args.torch_python,
        workdir,
        "check",
        teacher_path,
        torch_config(loop_cfg, **sizes(args, n, args.check_iters)),
        *("--mode", "check", "--init", os.path.join(workdir, "check_init.npz")),
        *("--device", args.torch_device),
    )

    # The teacher itself: logits, and every layer's distance in call order (the PyTorch hooks
    # fire in modules() order, which for a ResNet-18 is the call order).
    logits, dist = teacher_reference(graphdef, params, stats, init)
    layer_dist = dict(zip(theirs["bn_order"], dist, strict=True))
    per_layer = {name: _rel(d, theirs["bn_layers"][name]) for name, d in layer_dist.items()}

    # The first layer's weight: each side's own first layer (ours: captured_moments()[0],
    # identified by its distance; the reference's: modules()' first BatchNorm, the stem's bn1).
    teacher = deepinversion.make_teacher_fn(graphdef)
    _, moments = teacher((params, stats), jnp.asarray(init))
    m = cfg.first_bn_multiplier
    ours_bn = float(deepinversion.bn_statistics_loss(moments, m))
    ref_bn = sum(d * (m if name == "bn1" else 1.0) for name, d in theirs["bn_layers"].items())
    ours_first = min(theirs["bn_layers"], key=lambda k: abs(theirs["bn_layers"][k] - dist[0]))

    # The loop: every iteration's loss parts, the final images.
    images, info = deepinversion.synthesize(
        teacher, (params, stats), jnp.asarray(targets), jax.random.key(0), loop_cfg, init=init
    )
    ours = {k: np.asarray(info[k]).tolist() for k in theirs["parts"]}
    loop = {k: _rel(ours[k], v) for k, v in theirs["parts"].items()}
    image_diff = np.abs(np.asarray(images) - np.asarray(theirs["images"], np.float32))

    # Our two paths (synthesize's scan, the host loop) agree, with jitter and flips on.
    jcfg = cfg._replace(iterations=args.check_iters)
    key, shape = jax.random.key(args.seed + 2), (size, size, 3)
    scan_images, loop_images = (
        deepinversion.synthesize(
            teacher, (params, stats), jnp.asarray(targets), key, jcfg, image_shape=shape, loop=lp
        )[0]
        for lp in ("scan", "host")
    )
    paths = np.abs(np.asarray(scan_images) - np.asarray(loop_images))

    out = {
        "batch": n,
        "iterations": args.check_iters,
        "logits_max_abs_diff": float(np.max(np.abs(logits - np.asarray(theirs["logits"])))),
        "logits_max_abs": float(np.max(np.abs(logits))),
        "bn_layer_distance_rel_diff_max": max(per_layer.values()),
        "bn_layer_distances": layer_dist,
        "first_bn_weighted": {
            "multiplier": m,
            "ours_weights": ours_first,
            "reference_weights": theirs["bn_order"][0] + " (the stem)",
            "ours": ours_bn,
            "reference": ref_bn,
            "rel_diff": abs(ours_bn - ref_bn) / ref_bn,
        },
        "loop_rel_diff_max": loop,
        "loop_ours": ours,
        "loop_torch": theirs["parts"],
        # Adam's first steps are ~lr * sign(gradient): a pixel whose gradient is ~0 may step
        # either way on the two sides, so the maximum is about one step; the mean says more.
        "images_max_abs_diff": float(np.max(image_diff)),
        "images_mean_abs_diff": float(np.mean(image_diff)),
        "images_moved_max": float(np.max(np.abs(np.asarray(images) - init))),
        "images_moved_mean": float(np.mean(np.abs(np.asarray(images) - init))),
        "host_loop_vs_synthesize_abs_diff_mean_max": [float(np.mean(paths)), float(np.max(paths))],
    }
    print(
        f"check: logits {out['logits_max_abs_diff']:.1e} apart (max |logit| "
        f"{out['logits_max_abs']:.2f}); per-layer BN distances {max(per_layer.values()):.1e} rel; "
        f"loop "
        + ", ".join(f"{k} {v:.1e}" for k, v in loop.items())
        + f"; images {out['images_mean_abs_diff']:.1e} apart on average, "
        f"{out['images_max_abs_diff']:.1e} at most (moved {out['images_moved_mean']:.1e}, "
        f"{out['images_moved_max']:.1e})"
        f"; host loop vs synthesize {np.mean(paths):.1e} on average, {np.max(paths):.1e} at "
        f"most; R_feature at first_bn_multiplier {m:g}: ours {ours_bn:.3f} (weighting "
        f"{ours_first}) vs reference {ref_bn:.3f} (bn1, the stem)",
        flush=True,
    )
    return out


# ----------------------------------------------------------------------------- main


def sizes(args, batch: int, iterations: int) -> dict:
    return {
        "batch": batch,
        "image_size": args.size,
        "num_classes": NUM_CLASSES,
        "iterations": iterations,
        "warmup": args.warmup,
        "threads": args.threads,
        "seed": args.seed,
    }


def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), "")
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "devices": [str(d) for d in jax.devices()],
        "loadavg_1_5_15": list(os.getloadavg()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--block-iters", type=int, default=2, help="iterations per path per block")
    parser.add_argument("--warmup", type=int, default=1, help="PyTorch warm-up iterations")
    parser.add_argument("--variants", default="nchw,channels_last,reference_grads")
    parser.add_argument(
        "--no-host-loop", dest="host_loop", action="store_false", help="time synthesize only"
    )
    parser.add_argument("--check-batch", type=int, default=16)
    parser.add_argument("--check-iters", type=int, default=3)
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--teacher", help="a trained teacher's .npz (default: randomised)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--conv-impl", default="auto", help="the teacher's model.conv_impl: auto | xla | onednn"
    )
    parser.add_argument(
        "--cores", type=int, default=None, help="pin both sides to the first N CPUs (default: all)"
    )
    parser.add_argument("--torch-python", default=TORCH_PYTHON)
    parser.add_argument("--gpu", action="store_true", help="accelerator run: 2,000 iterations")
    parser.add_argument("--out", default="experiments/results/bench_w4_cpu.json")
    args = parser.parse_args()
    print(hostmem.keep_freed_memory(), flush=True)  # before JAX's threads allocate
    args.threads = len(os.sched_getaffinity(0))  # after --cores: what XLA's thread pool got
    if not os.path.exists(args.torch_python):
        sys.exit(
            f"bench_w4: no PyTorch side at {args.torch_python}; install the baselines venv "
            "(experiments/baselines/README.md) or pass --torch-python"
        )
    args.torch_device = "cuda" if args.gpu else "cpu"
    if args.gpu:  # BENCHMARKS.md's full synthesis, in one block
        args.blocks, args.block_iters, args.warmup = 1, 2000, max(args.warmup, 10)

    total_iters = args.blocks * args.block_iters
    cfg = deepinversion.DIConfig()._replace(iterations=total_iters)
    graphdef, params, stats = make_teacher(args.seed, args.teacher, args.conv_impl)
    load = [list(os.getloadavg())]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        teacher_path = os.path.join(workdir, "teacher.npz")
        weights.save(teacher_path, params, stats)
        checked = None
        if not args.no_check:
            checked = check(graphdef, params, stats, cfg, args, workdir, teacher_path)
        compiled = compile_jax(graphdef, params, stats, cfg, args)
        compile_s = {k: v[1] for k, v in compiled.items() if k != "host_state"}
        print("ours compiled: " + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items()))
        torch_cfg = torch_config(cfg, **sizes(args, args.batch, total_iters))
        server = TorchServer(args, workdir, teacher_path, torch_cfg, args.variants)
        paths = [f"ours {p}" for p in ("synthesize", "host_loop")[: 1 + args.host_loop]]
        paths += [f"torch {v}" for v in args.variants.split(",")]
        blocks = []
        for b in range(args.blocks):
            order = paths[b % len(paths) :] + paths[: b % len(paths)]  # rotate who goes first
            got = {}
            for path in order:
                side, name = path.split(" ")
                if side == "ours":
                    got[path] = jax_block(name, compiled, params, stats, cfg, args, b)
                else:
                    got[path] = server.block(name, args.block_iters)
            load.append(list(os.getloadavg()))
            blocks.append({"order": order, "iteration_s": got})
            print(
                f"block {b}: s/iteration "
                + ", ".join(f"{p} {statistics.mean(t):.2f}" for p, t in got.items())
                + f" (load {load[-1][0]:.1f})",
                flush=True,
            )
        torch_out = server.close()

    def block_mean(b: dict, path: str) -> float:
        return statistics.mean(b["iteration_s"][path])

    seconds = {p: statistics.median(block_mean(b, p) for b in blocks) for p in paths}
    ours = [p for p in paths if p.startswith("ours")]
    theirs = [p for p in paths if p.startswith("torch")]
    ratios = {
        f"{o} / {t}": statistics.median(block_mean(b, t) / block_mean(b, o) for b in blocks)
        for o in ours
        for t in theirs
    }
    best = min(theirs, key=seconds.get)
    flops = _xla_flops(compiled["host_loop"][0]) if "host_loop" in compiled else None
    summary = {
        "iteration_s (median over blocks)": seconds,
        "iterations_per_s": {p: 1.0 / v for p, v in seconds.items()},
        "images_per_s": {p: args.batch / v for p, v in seconds.items()},
        "speedup_ours_over_torch (median of same-block ratios; > 1: ours faster)": ratios,
        "fastest_torch": best,
        "compile_s": compile_s,
        # XLA's count for one iteration of the host step (forward, input gradient, Adam), the same
        # math every path does (reference_grads adds the weight gradients).
        "xla_gflop_per_iteration": flops / 1e9 if flops else None,
        "gflops_achieved": {p: flops / v / 1e9 for p, v in seconds.items()} if flops else None,
    }
    out = {
        "workload": "W4 DeepInversion synthesis (ResNet-18 small-input teacher, 32x32)",
        "command": " ".join(["python", *sys.argv]),
        "batch": args.batch,
        "image_size": args.size,
        "num_classes": NUM_CLASSES,
        "blocks": args.blocks,
        "iterations_per_block": args.block_iters,
        "timed_iterations_per_path": total_iters,
        "torch_warmup_iterations": args.warmup,
        "teacher": args.teacher or f"models.init seed {args.seed}, BatchNorms randomised",
        "conv_impl": args.conv_impl,
        "hyperparameters": torch_cfg,
        "di_config": cfg._asdict(),
        "summary": summary,
        "check": checked,
        "per_block": blocks,
        "torch_variants": torch_out["variants"],
        "threads": {"torch": args.threads, "xla_cpu_affinity": len(os.sched_getaffinity(0))},
        "wall_s": time.perf_counter() - t_start,
        "versions": {
            **{n: metadata.version(n) for n in ("jax", "jaxlib", "flax", "optax", "numpy")},
            "python": platform.python_version(),
            "torch_side": torch_out["versions"],
        },
        "machine": {**machine(), "loadavg_1_5_15_after_each_block": load},
        "gpu_note": (
            "this run: accelerator, the full 2,000 iterations"
            if args.gpu
            else "CPU: a few steady-state iterations per path, interleaved, for the ratios; "
            "BENCHMARKS.md's full 2,000-iteration synthesis is for a GPU (--gpu; not run: no "
            "GPU on this machine)"
        ),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(
        "images/s: "
        + ", ".join(f"{k} {v:.1f}" for k, v in summary["images_per_s"].items())
        + "; speed-up ours over PyTorch: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
        + f"; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
