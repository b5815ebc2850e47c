"""Class-incremental procedural shapes: the 4 shape classes arrive over steps (default 2 + 2).

In training, pixels of classes outside the current step are background; at test, each
experience's images carry the labels of every class seen up to that experience. results.json adds
old/new/all mIoU per step.

  python -m clseg_jax.main --config=configs/shapes_ci.py:strategy=naive --workdir=runs/shapes_ci
  python -m clseg_jax.main --config=configs/shapes_ci.py:compare --workdir=runs/shapes_ci_cmp
"""

from __future__ import annotations

from clseg_jax import config as config_lib

EXAMPLE_ARGS = (None, "strategy=joint", "steps=1-1-1-1")


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, strategy="naive", compare=False, seed=0, steps="2-2")
    c = config_lib.base_config()
    c.seed = a.seed
    c.data.name = "shapes_ci"
    c.data.seed = a.seed
    c.data.image_size = 64
    c.data.classes_per_step = tuple(int(s) for s in a.steps.split("-"))
    c.data.train_per_exp = 512
    c.data.test_per_exp = 128
    c.strategy.name = a.strategy
    c.compare = ("naive", "cumulative", "joint") if a.compare else ()
    return c
