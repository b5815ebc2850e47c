"""W2 side by side: clseg_jax and PyTorch/Avalanche on the same stream, one command, one table.

  .venv-baselines/bin/python experiments/baselines/compare.py \\
      [--strategies naive,replay,gem,agem] [--train-per-exp 64 --epochs 1] \\
      [--out experiments/results/baselines_w2.json]

Steps: (1) ``export.py`` writes the W2 stream and our UNet's initial weights from
``configs/w2.py``; (2) per strategy, our side runs ``clseg_jax.train.run`` on that config and then
the Avalanche side runs ``avalanche_w2.py`` on the exported files, each in its own subprocess, one
after the other, so they never compete for the cores or memory; (3) one table and one JSON file.

Columns: images/s of the training loops (new images: data loading and every per-step strategy
cost included; ours after ahead-of-time compilation, Avalanche's after 3 warm-up iterations),
each side's seconds per step relative to its own naive in the same run (when naive ran),
between-experience seconds of the strategy (Fisher, importances, memory updates, model copies,
set-up), whole-run seconds (stream, model, training, evaluation after each experience; ours also
compilation and checkpoints), final average mIoU and forgetting from the same
``clseg_jax.metrics`` on both sides. Speed-ups are clseg_jax over PyTorch: > 1 means clseg_jax is
faster.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
STRATEGIES = (
    *("naive", "ewc", "si", "mas", "rwalk", "lfl", "lwf"),
    *("replay", "gem", "agem", "cumulative", "joint"),
)
DEFAULT_OUT = os.path.join(REPO, "experiments", "results", "baselines_w2.json")


# ----------------------------------------------------------------------------- our side


def ours_hparams(s: Any, batch: int = 32) -> str:
    """One line of our strategy's hyperparameters from ``config.strategy`` (``s``) and the
    training batch size."""
    return {
        "ewc": f"lambda {s.ewc_lambda:g} {s.ewc_mode}, F=per-sample grads^2 ({s.ewc_samples})",
        "si": f"c {s.si_c:g}, xi {s.si_xi:g} (pathint)",
        "mas": f"lambda {s.mas_lambda:g}, mean over exps, per-sample |grad| ({s.mas_samples})",
        "rwalk": f"lambda {s.rwalk_lambda:g}, alpha {s.rwalk_alpha:g}, every step",
        "lfl": f"lambda {s.lfl_lambda:g} (sum over C)" + (", head frozen" * s.lfl_freeze_head),
        "lwf": f"alpha {s.lwf_alpha:g}, T {s.lwf_temperature:g}, T^2",
        "replay": f"mem {s.replay_mem_size} {s.replay_policy}, {batch} new + {s.replay_batch} "
        "replayed",
        "gem": f"{s.gem_mem_per_exp}/exp, margin {s.gem_margin:g}, every block's grad per step "
        "(CPU), QP on device",
        "agem": f"{s.agem_mem_per_exp}/exp, sample {s.agem_sample_size} uniform",
    }.get(s.name, "-")


def check_same_stream(config: Any, stream_path: str) -> None:
    """Raises unless ``config.data`` builds exactly the exported arrays (the Avalanche side's
    input): a concurrent edit of the data code between export and run must not go unnoticed."""
    import numpy as np

    from clseg_jax import data

    stream = data.make(config.data)
    with np.load(stream_path) as f:
        for t, exp in enumerate(stream.experiences):
            for split in ("train", "test"):
                source = getattr(exp, split)
                same = np.array_equal(source.images, f[f"{split}_images_{t}"]) and np.array_equal(
                    source.labels, f[f"{split}_labels_{t}"]
                )
                if not same:
                    raise RuntimeError(f"{stream_path}: experience {t} {split} differs from ours")


def run_ours(
    strategy: str,
    train_per_exp: int | None,
    epochs: int | None,
    workdir: str,
    stream_path: str | None = None,
    xla_cache: str | None = None,
) -> dict:
    """Our side in this process: ``train.run`` on ``configs/w2.py`` in a fresh workdir (an
    existing one would resume)."""
    from clseg_jax import hostmem

    print(hostmem.keep_freed_memory(), flush=True)  # as the CLI does, before JAX's threads
    sys.path.insert(0, HERE)
    import export
    import jax

    from clseg_jax import compiles, train

    config = export.w2_config(strategy, train_per_exp, epochs)
    config.progress = False
    if xla_cache:  # as the CLI does with the config's compilation_cache_dir
        compiles.use_persistent_cache(xla_cache)
    if stream_path:
        check_same_stream(config, stream_path)
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.perf_counter()
    res = train.run(config, workdir)
    run_s = time.perf_counter() - t0
    timing = res["timing"]
    keys = ("avg_miou", "forgetting", "bwt", "fwt", "avg_diag", "avg_incremental")
    return {
        "side": "clseg_jax",
        "strategy": strategy,
        "hparams": ours_hparams(config.strategy, config.batch_size),
        "accuracy_matrix": res["accuracy_matrix"],
        "initial_row": res["initial_row"],
        **{k: res[k] for k in keys},
        "timing": {
            "run_s": run_s,
            **{k: timing[k] for k in ("train_s", "train_steps", "strategy_s", "eval_s")},
            **{k: timing[k] for k in ("compile_s", "checkpoint_s", "compile_count")},
            "images_per_s": timing["train_steps"] * config.batch_size / timing["train_s"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        },
        "versions": {"jax": jax.__version__},
    }


# ----------------------------------------------------------------------------- orchestration


def _subprocess(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """Runs ``cmd`` (output passed through), raises on failure; returns its wall seconds."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    return time.perf_counter() - t0


def _timed_side(cmd: list[str], result_json: str, env: dict[str, str] | None = None) -> dict:
    """Runs one side's subprocess; its results JSON with the process's wall seconds and the
    1-minute load average before and after it (the machine may be shared) added to "timing"."""
    load_before = os.getloadavg()[0]
    wall = _subprocess(cmd, env)
    with open(result_json) as f:
        res = json.load(f)
    res["timing"].update(process_s=wall, load_before=load_before, load_after=os.getloadavg()[0])
    return res


def run_pair(strategy: str, args: argparse.Namespace, export_dir: str, work: str) -> dict:
    """Both sides of one strategy, each in a subprocess; returns ``{"clseg_jax", "avalanche"}``."""
    out: dict[str, Any] = {"strategy": strategy}
    ours_json = os.path.join(work, f"{strategy}_clseg_jax.json")
    cmd = [sys.executable, __file__, "--worker-ours", strategy, "--worker-result", ours_json]
    cmd += ["--workdir", os.path.join(work, "runs", strategy)]
    cmd += ["--worker-stream", os.path.join(export_dir, "stream.npz")]
    if args.train_per_exp:
        cmd += ["--train-per-exp", str(args.train_per_exp)]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    if args.xla_cache:
        cmd += ["--xla-cache", args.xla_cache]
    print(f"\n=== {strategy}: clseg_jax", flush=True)
    out["clseg_jax"] = _timed_side(cmd, ours_json)

    torch_json = os.path.join(work, f"{strategy}_avalanche.json")
    cmd = [sys.executable, os.path.join(HERE, "avalanche_w2.py"), "--strategy", strategy]
    cmd += ["--export-dir", export_dir, "--epochs", str(args.epochs or 2), "--out", torch_json]
    env = dict(os.environ)
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    print(f"=== {strategy}: Avalanche", flush=True)
    out["avalanche"] = _timed_side(cmd, torch_json, env)
    out["avalanche"]["timing"]["omp_wait_policy"] = args.omp_wait_policy or "default"
    return out


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def table(rows: list[dict]) -> str:
    """The markdown table of every strategy (see the module docstring for the columns)."""
    head = (
        "| strategy | hparams clseg_jax | hparams Avalanche | img/s jax | img/s torch | speed-up "
        "| step/naive jax | step/naive torch "
        "| between-exp s jax | torch | run s jax | run s torch | speed-up "
        "| mIoU jax | mIoU torch | forgetting jax | forgetting torch |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    naive = next((r for r in rows if r["strategy"] == "naive"), None)

    def per_naive(r: dict, side: str) -> str:
        """A step's seconds relative to the same side's naive step (same run): naive's img/s
        over this strategy's; '-' without a naive row."""
        if naive is None:
            return "-"
        ips = naive[side]["timing"]["images_per_s"] / r[side]["timing"]["images_per_s"]
        return _f(ips, ".2f") + "x"

    for r in rows:
        a, b = r["clseg_jax"], r["avalanche"]
        ta, tb = a["timing"], b["timing"]
        cells = [
            r["strategy"],
            a["hparams"],
            b["hparams"],
            _f(ta["images_per_s"], ".1f"),
            _f(tb["images_per_s"], ".1f"),
            _f(ta["images_per_s"] / tb["images_per_s"], ".2f") + "x",
            per_naive(r, "clseg_jax"),
            per_naive(r, "avalanche"),
            _f(ta["strategy_s"], ".1f"),
            _f(tb["strategy_s"], ".1f"),
            _f(ta["run_s"], ".0f"),
            _f(tb["run_s"], ".0f"),
            _f(tb["run_s"] / ta["run_s"], ".2f") + "x",
            _f(a["avg_miou"]),
            _f(b["avg_miou"]),
            _f(a["forgetting"]),
            _f(b["forgetting"]),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--train-per-exp", type=int, default=None, help="smoke runs: fewer images")
    parser.add_argument("--epochs", type=int, default=None, help="smoke runs: fewer epochs")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--workdir", default=None, help="default: a temporary folder")
    parser.add_argument("--render", default=None, help="only print the table of a results JSON")
    parser.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        help="OMP_WAIT_POLICY for PyTorch ('' leaves it unset). PASSIVE: on a shared CPU, "
        "PyTorch's spinning OpenMP threads fight the other load (baselines/README.md: 'Threads').",
    )
    # Internal: the clseg_jax side's subprocess.
    parser.add_argument(
        "--xla-cache",
        default=None,
        help="our side keeps compiled programs in this persistent cache, as the CLI does by "
        "default (config.compilation_cache_dir): a second run loads them (default: none, every "
        "run compiles)",
    )
    parser.add_argument("--worker-ours", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-stream", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker_ours:
        res = run_ours(
            args.worker_ours,
            args.train_per_exp,
            args.epochs,
            args.workdir,
            args.worker_stream,
            args.xla_cache,
        )
        with open(args.worker_result, "w") as f:
            json.dump(res, f, indent=1)
        return

    if args.render:
        with open(args.render) as f:
            print(table(json.load(f)["rows"]))
        return

    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = sorted(set(names) - set(STRATEGIES))
    if unknown:
        parser.error(f"unknown strategies {unknown}; valid: {list(STRATEGIES)}")
    work = args.workdir or tempfile.mkdtemp(prefix="baselines_w2_")
    os.makedirs(work, exist_ok=True)
    export_dir = os.path.join(work, "export")
    cmd = [sys.executable, os.path.join(HERE, "export.py"), "--out", export_dir]
    if args.train_per_exp:
        cmd += ["--train-per-exp", str(args.train_per_exp)]
    started = datetime.datetime.now().isoformat(timespec="seconds")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    _subprocess(cmd)
    rows = [run_pair(name, args, export_dir, work) for name in names]
    total_s = time.perf_counter() - t0

    text = table(rows)
    command = " ".join([os.path.relpath(sys.executable, REPO), *sys.argv])
    print(
        f"\nW2 side by side ({started}, {os.cpu_count()} cores, load before/after "
        f"{load_before[0]:.1f}/{os.getloadavg()[0]:.1f}, {total_s / 60:.1f} min)\n"
    )
    print(text)
    result = {
        "workload": "W2",
        "command": command,
        "started": started,
        "total_s": total_s,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "settings": {
            "train_per_exp": args.train_per_exp or 512,
            "epochs": args.epochs or 2,
            "omp_wait_policy": args.omp_wait_policy or "default",
            "xla_cache": args.xla_cache,
        },
        "rows": rows,
        "table": text,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
