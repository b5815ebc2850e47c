"""W1 step with glibc's defaults against clseg_jax.hostmem's kept memory, interleaved.

The allocator setting applies to a whole process (threads take their arena at their first
allocation), so each round runs ``bench_step.py --rounds 1`` once per setting, in fresh
processes, alternating; PyTorch ``channels_last`` runs in each round's first process when
``--torch`` is given. bench_step records each step's minor page faults too.

    python experiments/bench_hostmem.py --rounds 2 --torch .venv-baselines/bin/python \
        --out experiments/results/bench_hostmem.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = ("release", "keep")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--torch", default=None, help="a Python with PyTorch (bench_step --torch)")
    parser.add_argument("--which", default="bare,naive")
    parser.add_argument("--impls", default="xla,onednn")
    parser.add_argument("--out", default="experiments/results/bench_hostmem.json")
    args = parser.parse_args()
    runs: dict = {s: [] for s in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, setting in enumerate(SETTINGS):
                out = os.path.join(tmp, f"{setting}{r}.json")
                cmd = [sys.executable, os.path.join(HERE, "bench_step.py"), "--rounds", "1"]
                cmd += ["--which", args.which, "--impls", args.impls, "--out", out]
                if args.torch and i == 0:
                    cmd += ["--torch", args.torch]
                env = {**os.environ, "CLSEG_HOST_MEMORY": setting}
                print(f"round {r} CLSEG_HOST_MEMORY={setting}", flush=True)
                subprocess.run(cmd, env=env, check=True)
                with open(out) as f:
                    runs[setting].append(json.load(f))
    summary = {}
    for setting, rounds in runs.items():
        for key in rounds[0]["results"]:
            name = key if key.startswith("torch") else f"{key}/{setting}"
            if name in summary:
                continue
            summary[name] = statistics.median(
                x["results"][key][0]["images_per_s"] for x in rounds if key in x["results"]
            )
    for name, ips in summary.items():
        print(f"{name:32s} {ips:7.1f} images/s")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"images_per_s_median": summary, "runs": runs}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
