"""Issue 19, item 1: does a lineage recipe learn every experience of an unseen stream?

The stream is built like ``configs/shapes_di.py``'s four domains (plain, dark striped, blurred
noisy, low contrast; 5 classes) at 64x64 with 512 training images per domain, from another seed
than the tests' usual 0. Each version is trained as the service's job trains it
(``lineage.run_experience`` on the stream staged so far, resuming the previous version's
checkpoint), timed, and scored: diag(R) per experience and the trivial predictor's score for
the same experience (``lineage.trivial_score``).

``--task classification``: the same four looks with one shape per image, labelled by its kind
(``example.class_experiences``: 4 classes, no background), at 32x32, trained by a ResNet-18
lineage (the default widths 16-32-64-128); R holds accuracies and the trivial predictor is the
majority class.

    python experiments/serve_recipe.py --out experiments/results/serve_recipe.json
    python experiments/serve_recipe.py --spec '{"epochs": 2, "model_widths": [8, 16, 32]}'
    python experiments/serve_recipe.py --task classification --strategies naive,replay \
        --seeds 0 --n-train 2048 --out experiments/results/serve_recipe_classification_2048.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clseg_jax.serve import example, lineage


def stream(
    seed: int, n_train: int, n_test: int, size: int, task: str = "segmentation"
) -> list[dict[str, np.ndarray]]:
    """The four-domain shapes stream as npz arrays per experience: 5-class masks, or for
    ``task="classification"`` one shape per image and its kind ([N] class ids, 4 classes)."""
    if task == "classification":
        return example.class_experiences(4, size, n_train, n_test, seed)
    return example.experiences(4, size, n_train, n_test, seed, binary=False)


# Per task: the lineage fields the stream needs, and its image side.
TASKS = {
    "segmentation": ({"num_classes": 5}, 64),
    "classification": ({"num_classes": 4, "model": "resnet18"}, 32),
}


def run_lineage(spec: dict, exps: list[dict], root: str) -> list[dict]:
    """Versions 1..len(exps) of one lineage; per version: seconds, diag, trivial, R row."""
    spec = lineage.validate_spec(spec)
    os.makedirs(root, exist_ok=True)
    files, out = [], []
    workdir = os.path.join(root, "work")
    for k, arrays in enumerate(exps):
        path = os.path.join(root, f"upload{k}.npz")
        np.savez(path, **arrays)
        files.append(path)
        data_dir = os.path.join(root, "data")
        lineage.stage_stream(data_dir, files)
        t = time.perf_counter()
        results = lineage.run_experience(spec, data_dir, workdir)
        seconds = time.perf_counter() - t
        row = results["accuracy_matrix"][k]
        out.append(
            {
                "version": k + 1,
                "seconds": round(seconds, 1),
                "new": row[k],
                "trivial": lineage.trivial_score(arrays, spec["num_classes"]),
                "row": row,
            }
        )
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="{}", help="lineage fields over the defaults (JSON)")
    p.add_argument("--strategies", default="naive,replay")
    p.add_argument("--seeds", default="0,1", help="lineage seeds (the model's init, order)")
    p.add_argument("--data-seed", type=int, default=7)
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-test", type=int, default=128)
    p.add_argument("--experiences", type=int, default=4, help="the stream's first N domains")
    p.add_argument("--task", choices=sorted(TASKS), default="segmentation")
    p.add_argument("--size", type=int, default=0, help="image side (0: the task's default)")
    p.add_argument("--out", default="")
    a = p.parse_args()
    fields, size = TASKS[a.task]
    size = a.size or size
    exps = stream(a.data_seed, a.n_train, a.n_test, size, a.task)[: a.experiences]
    runs = []
    for strategy in a.strategies.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            spec = {
                **fields,
                "image_size": [size, size],
                **json.loads(a.spec),
                "strategy": strategy,
                "seed": seed,
            }
            with tempfile.TemporaryDirectory() as root:
                versions = run_lineage(spec, exps, root)
            diag = [v["new"] for v in versions]
            runs.append(
                {
                    "strategy": strategy,
                    "seed": seed,
                    "spec": spec,
                    "min_diag": min(diag),
                    "max_seconds": max(v["seconds"] for v in versions),
                    "versions": versions,
                }
            )
            print(strategy, seed, "min diag", round(min(diag), 3), flush=True)
            if a.out:  # after every lineage, so that a stopped sweep keeps what it finished
                _write(a, runs)


def _write(a: argparse.Namespace, runs: list[dict]) -> None:
    report = {
        "command": " ".join(sys.argv),
        "task": a.task,
        "size": a.size or TASKS[a.task][1],
        "data_seed": a.data_seed,
        "defaults": lineage.SPEC_DEFAULTS,
        "cpu": _cpu(),
        "runs": runs,
    }
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    except OSError:
        pass
    return f"unknown x {os.cpu_count()}"


if __name__ == "__main__":
    main()
