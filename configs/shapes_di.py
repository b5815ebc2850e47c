"""Domain-incremental procedural shapes with the W1 UNet: the default demo.

Four domains (plain, dark striped, blurred noisy, low contrast) of the same 5 classes
(background, circle, square, triangle, cross), 64x64, 512 training images per domain.

Demo (naive fine-tuning against joint training; what `make demo` runs):
  python -m clseg_jax.main --config=configs/shapes_di.py:compare --workdir=runs/demo

One strategy:
  python -m clseg_jax.main --config=configs/shapes_di.py:strategy=naive --workdir=runs/shapes_naive

Result (2-core CPU, seed 0): see README "Quick start" for the table this printed.
"""

from __future__ import annotations

from configs import common

EXAMPLE_ARGS = (None, "compare", "strategy=cumulative")


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, strategy="naive", compare=False, seed=0, train_per_exp=512)
    c = common.base_config()
    c.seed = a.seed
    c.data.name = "shapes_di"
    c.data.seed = a.seed
    c.data.image_size = 64
    c.data.num_experiences = 4
    c.data.train_per_exp = a.train_per_exp
    c.data.test_per_exp = 128
    c.strategy.name = a.strategy
    c.compare = ("naive", "joint") if a.compare else ()
    return c
