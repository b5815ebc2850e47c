"""BENCHMARKS.md W1 train step in PyTorch ``channels_last``, timed as ``bench_step.py`` times ours.

    python experiments/baselines/torch_step.py --batch 32 --size 64 --steps 20

Prints one ``RESULT {json}`` line: the median step seconds over ``--steps`` steps after
``--warmup`` (each step a forward, pixel cross-entropy, backward and SGD with momentum 0.9). Run
by ``experiments/bench_step.py --torch`` in the PyTorch venv, between its own measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from torch_unet import UNet

NUM_CLASSES = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = UNet(NUM_CLASSES)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    shape = (args.batch, args.size, args.size)
    images = torch.from_numpy(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, NUM_CLASSES, shape)).long()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(images), labels, ignore_index=255)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    out = {
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
