"""docs/data_free.md's table: fine-tuning, DeepInversion replay and CCSI on split digits.

    python experiments/data_free_table.py --seeds 0,1 --workdir runs/data_free \\
        --out experiments/results/data_free_digits.json

Each row is one ``train.run`` of ``configs/digits_data_free.py:<arg>,seed=<s>`` (the runs of
``tests/test_behaviour_data_free.py``): fine-tuning on the plain ResNet and on CCSI's model, the
``deepinversion`` and ``ccsi`` strategies. A finished run is read back from its ``results.json``.
Writes every run's summary and accuracy matrix as JSON and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clseg_jax import metrics, train
from configs import digits_data_free

ROWS = (
    ("fine-tuning (ResNet-18 small)", "strategy=naive,model=plain"),
    ("deepinversion, ABD loss", "strategy=deepinversion"),
    ("fine-tuning (CN + cosine head)", "strategy=naive,model=ccsi"),
    ("ccsi", "strategy=ccsi"),
)


def run(arg: str, workdir: str) -> dict:
    done = os.path.join(workdir, "results.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    cfg = digits_data_free.get_config(arg)
    cfg.progress = False
    return train.run(cfg, workdir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--workdir", default="runs/data_free")
    p.add_argument("--out", default="experiments/results/data_free_digits.json")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    out = []
    print("| seed | method (model) | final avg acc | forgetting | mean diag R[i][i] |")
    print("|---|---|---|---|---|")
    for seed in seeds:
        for name, arg in ROWS:
            tag = arg.replace("strategy=", "").replace(",model=", "_")
            r = run(f"{arg},seed={seed}", os.path.join(a.workdir, f"{tag}_s{seed}"))
            s = metrics.cl_summary(r["accuracy_matrix"])
            row = {
                "seed": seed,
                "method": name,
                "config": f"configs/digits_data_free.py:{arg},seed={seed}",
                "avg_acc": s["avg_miou"],
                "forgetting": s["forgetting"],
                "avg_diag": s["avg_diag"],
                "accuracy_matrix": r["accuracy_matrix"],
            }
            out.append(row)
            print(
                f"| {seed} | {name} | {row['avg_acc']:.2f} | {row['forgetting']:.2f} | "
                f"{row['avg_diag']:.2f} |",
                flush=True,
            )
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"command": " ".join(sys.argv), "runs": out}, f, indent=1)


if __name__ == "__main__":
    main()
