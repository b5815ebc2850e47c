"""Issue 17: the input pipeline alone, and the W1 trainer loop with device prefetch on and off.

    python experiments/bench_input.py --out experiments/results/bench_input.json

1. Pipeline only (no model): W3's input on a generated VOC-layout folder (``tiny_layouts``, 512 px
   JPEGs and palette PNGs, 4 object classes) through ``configs/voc_ci.py``'s papers' recipe:
   random scale 0.5-2.0, 512 crop padded with ignore labels, flip, batch 24, read by
   ``data.feed`` with 0, 1 and 2 grain worker processes (``data.workers``) and no device copy.
   Images/s over ``--batches`` batches after the first (workers start before it), rounds
   interleaved, median.
2. W1 in the trainer (``train.run``: UNet (16, 32, 64, 128), 64x64, batch 32, SGD 0.01, one
   experience of the shapes stream), ``data.device_prefetch`` 2 against 0: the trainer's
   ``timing.train_s`` (steps and their input, compilation and evaluation excluded), rounds
   interleaved, median.

Run with nothing else on the machine and say what else ran: on 2 cores the workers compete with
the main process, so the figures say what a small machine gains, not a TPU VM host's 100+ cores.
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
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clseg_jax import hostmem, setup, sharding, train
from clseg_jax.data import feed, tiny_layouts
from configs import shapes_di, voc_ci
from experiments.bench_step import environment


def pipeline_rates(root: str, workers: tuple[int, ...], batches: int, rounds: int) -> dict:
    cfg = voc_ci.get_config(f"root={root},task=2-2,method=finetune,size=512,batch=24")
    cfg.data.train_split = "train"
    cfg.data.cache_dir = os.path.join(root, "cache")
    parts = setup.build(cfg)
    dataset = parts.datasets[0]
    placed = sharding.batch_sharding(parts.mesh)
    rates = {w: [] for w in workers}
    for _ in range(rounds):
        for w in workers:
            it = feed.iterate(dataset, placed, workers=w, prefetch=0)
            jax.block_until_ready(next(it))  # workers started, first batch out
            t0 = time.perf_counter()
            for _ in range(batches):
                jax.block_until_ready(next(it))
            rates[w].append(batches * cfg.batch_size / (time.perf_counter() - t0))
            it.close()
    return {
        "images_per_s": {str(w): statistics.median(r) for w, r in rates.items()},
        "rounds": {str(w): r for w, r in rates.items()},
        "batch": cfg.batch_size,
        "batches_timed": batches,
        "steps_per_epoch": len(dataset),
    }


def w1_loop(prefetches: tuple[int, ...], rounds: int, workdir: str) -> dict:
    rates = {p: [] for p in prefetches}
    for r in range(rounds):
        for p in prefetches:
            c = shapes_di.get_config()
            c.data.image_size = 64
            c.data.num_experiences = 1
            c.data.train_per_exp = 640
            c.data.test_per_exp = 32
            c.batch_size, c.epochs = 32, 2
            c.optimizer.name, c.optimizer.lr = "sgd", 0.01
            c.data.device_prefetch = p
            c.progress, c.log.tensorboard, c.log_every_steps = False, False, 20
            out = train.run(c, os.path.join(workdir, f"w1-{p}-{r}"))
            t = out["timing"]
            rates[p].append(t["train_steps"] * c.batch_size / t["train_s"])
    return {
        "images_per_s": {str(p): statistics.median(v) for p, v in rates.items()},
        "rounds": {str(p): v for p, v in rates.items()},
    }


def main() -> None:
    print(hostmem.keep_freed_memory(), flush=True)  # before JAX's threads allocate
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="experiments/results/bench_input.json")
    p.add_argument("--images", type=int, default=96, help="training images in the VOC folder")
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", default="0,1,2")
    args = p.parse_args()
    workers = tuple(int(w) for w in args.workers.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        root = tiny_layouts.write_voc(
            os.path.join(tmp, "voc"), num_classes=4, n_train=args.images, n_val=8, size=512
        )
        pipeline = pipeline_rates(str(root), workers, args.batches, args.rounds)
        print("pipeline images/s by workers:", pipeline["images_per_s"])
        loop = w1_loop((2, 0), args.rounds, tmp)
        print("W1 trainer images/s by device_prefetch:", loop["images_per_s"])
    out = {
        **environment(),
        "cpu_model": _cpu_model(),
        "pipeline_w3_voc512": pipeline,
        "w1_trainer_device_prefetch": loop,
        "seed_images": args.images,
        "median_of_rounds": args.rounds,
        "note": "numpy " + np.__version__,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
