"""Issue 17: how far an ensemble's members drift from their separate runs over a whole stream.

    python experiments/ensemble_drift.py --out experiments/results/ensemble_drift.json

The demo stream (``configs/shapes_di.py``, 4 domains, the demo's Adam) at 32 px with 128
training images per experience, 2 epochs: ``ensemble.seeds=(0,1)`` for ``naive`` and ``ewc``,
the members computed one by one (``chunk=1``, the CPU default) and side by side (``vmap``), each
member's accuracy matrix and final parameters against the separate run it stands for (its
seed, the shared data order: ``members.make(config)[m].config``). The tests
assert 1e-5 after a few steps; over a whole run, rounding differences of batched convolutions
(and Adam's amplification of them) are measured here, not asserted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clseg_jax import checkpoint, hostmem, members, train
from configs import shapes_di
from experiments.bench_step import environment, write_json


def _config(strategy: str, optimizer: str = "adam", **ensemble):
    c = shapes_di.get_config(f"strategy={strategy}")
    if optimizer == "sgd":  # W1's optimizer
        c.optimizer.name, c.optimizer.lr, c.optimizer.momentum = "sgd", 0.01, 0.9
    c.data.image_size, c.data.train_per_exp, c.data.test_per_exp = 32, 128, 64
    c.model.kwargs.widths = (8, 16, 32)
    c.epochs, c.batch_size = 2, 16
    c.progress, c.log.tensorboard = False, False
    for key, value in ensemble.items():
        c.ensemble[key] = value
    return c


def _params(workdir: str):
    """The final parameters, from the run's last checkpoint."""
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    arrays, _ = ckpt.read()
    ckpt.close()
    return arrays["state"]["params"]


def main() -> None:
    print(hostmem.keep_freed_memory(), flush=True)  # before JAX's threads allocate
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategies", default="naive,ewc")
    p.add_argument("--optimizers", default="adam,sgd")
    p.add_argument("--out", default="experiments/results/ensemble_drift.json")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy, opt in itertools.product(
            args.strategies.split(","), args.optimizers.split(",")
        ):
            alone = {}
            # The separate run a member stands for: its seed, the shared data order.
            for m in members.make(_config(strategy, opt, seeds=(0, 1))):
                work = os.path.join(tmp, f"{strategy}_{opt}_{m.seed}")
                alone[m.seed] = (train.run(m.config, work), _params(work))
            for chunk, label in ((1, "one by one"), (2, "vmap")):
                work = os.path.join(tmp, f"{strategy}_{opt}_ens_{chunk}")
                res = train.run(_config(strategy, opt, seeds=(0, 1), chunk=chunk), work)
                params = _params(work)
                for m in res["members"]:
                    r_alone, p_alone = alone[m["seed"]]
                    dr = np.nanmax(
                        np.abs(np.array(m["accuracy_matrix"]) - r_alone["accuracy_matrix"])
                    )
                    dp = max(
                        float(np.max(np.abs(np.asarray(a)[m["index"]] - np.asarray(b))))
                        for a, b in zip(
                            jax.tree.leaves(params), jax.tree.leaves(p_alone), strict=True
                        )
                    )
                    rows.append(
                        {
                            "strategy": strategy,
                            "optimizer": opt,
                            "members": label,
                            "seed": m["seed"],
                            "max_abs_R_diff": float(dr),
                            "max_abs_param_diff": dp,
                            "avg_miou": m["avg_miou"],
                            "avg_miou_alone": r_alone["avg_miou"],
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    out = {"workload": __doc__.splitlines()[0], "rows": rows, **environment()}
    write_json(args.out, out)


if __name__ == "__main__":
    main()
