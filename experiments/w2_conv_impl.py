"""A whole W2 naive run (configs/w2.py: 4 experiences x 512 images, 2 epochs, batch 32) with XLA's
and with oneDNN's convolutions, interleaved rounds, in one process:

    python experiments/w2_conv_impl.py --rounds 2 --out experiments/results/w2_naive_onednn.json

Wall seconds of each ``train.run`` and its ``timing`` (training, evaluation, compile seconds,
steps/s), and the run's summary numbers (the two implementations round differently).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_step import cpu_model, environment, write_json

from clseg_jax import hostmem, train
from configs import w2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--impls", default="xla,onednn")
    parser.add_argument("--out", default="experiments/results/w2_naive_onednn.json")
    args = parser.parse_args()
    print(hostmem.keep_freed_memory(), flush=True)  # before JAX's threads allocate
    runs: dict = {}
    for r in range(args.rounds):
        for impl in args.impls.split(","):
            cfg = w2.get_config("strategy=naive")
            cfg.progress, cfg.log.tensorboard, cfg.model.conv_impl = False, False, impl
            t0 = time.perf_counter()
            res = train.run(cfg, tempfile.mkdtemp())
            wall = time.perf_counter() - t0
            timing = res["timing"]
            ips = timing["steps_per_s"] * cfg.batch_size
            runs.setdefault(impl, []).append(
                {
                    "wall_s": wall,
                    "train_images_per_s": ips,
                    "timing": timing,
                    "accuracy_matrix": res["accuracy_matrix"],
                }
            )
            print(
                f"round {r} {impl:6s} {wall:6.1f} s wall, {ips:6.1f} training images/s", flush=True
            )
    write_json(
        args.out,
        {"workload": "W2 naive run", "runs": runs, "cpu_model": cpu_model(), **environment()},
    )


if __name__ == "__main__":
    main()
