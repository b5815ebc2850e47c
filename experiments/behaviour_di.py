"""Regularisers vs naive on the behaviour-test stream (configs/behaviour_di.py), several seeds.

    python experiments/behaviour_di.py --methods ewc,si --seeds 0,1 --set si_c=3 \\
        --out experiments/results/behaviour_di.json

Each run reports the criterion of ``tests/test_behaviour.py`` (``metrics.beats_reference``:
forgetting below naive's, final average mIoU >= naive's, mean of diag(R) >= naive's - 0.05).
Without ``--set`` the strengths are the config's ``TUNED`` values; this script is how they were
chosen (experiments/README.md has the sweep).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clseg_jax import metrics, train
from configs import behaviour_di


def run(strategy: str, seed: int, hparams: dict, workdir: str) -> dict:
    cfg = behaviour_di.get_config(f"strategy={strategy},seed={seed}")
    cfg.progress = False
    cfg.strategy.update(hparams)
    return train.run(cfg, workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(behaviour_di.TUNED))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--set", action="append", default=[], help="hparam=value (Python literal)")
    parser.add_argument("--out", default="experiments/results/behaviour_di.json")
    args = parser.parse_args()
    hparams = {k: ast.literal_eval(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        naive = {s: run("naive", s, {}, f"{tmp}/naive{s}") for s in seeds}
        for method in args.methods.split(","):
            for s in seeds:
                r = run(method, s, hparams, f"{tmp}/{method}{s}")
                v = metrics.beats_reference(r["accuracy_matrix"], naive[s]["accuracy_matrix"])
                rows.append({"method": method, "seed": s, **v})
                print(
                    f"{method:6s} seed {s}: avg {v['avg_miou']:.3f} ({v['ref_avg_miou']:.3f}) "
                    f"diag {v['avg_diag']:.3f} ({v['ref_avg_diag']:.3f}) forgetting "
                    f"{v['forgetting']:.3f} ({v['ref_forgetting']:.3f}) passes={v['passes']}",
                    flush=True,
                )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"hparams": hparams, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
