"""W2 of ../shared/BENCHMARKS.md: the `unet64` stream, the side-by-side workload.

Domain-incremental shapes at 64x64, 4 experiences x 512 training images (128 test), W1's UNet
and recipe (batch 32, SGD lr 0.01 momentum 0.9, PyTorch initialisation), 2 epochs per
experience, no augmentation. Strategy hyperparameters are BENCHMARKS.md's side-by-side values
(EWC lambda 100 separate with the Fisher over the whole experience, SI 0.1, LwF alpha 1 T 2),
which are the registry defaults except EWC's sample count.

  python -m clseg_jax.main --config=configs/w2.py:strategy=ewc --workdir=runs/w2_ewc
  python -m clseg_jax.main --config=configs/w2.py:compare --workdir=runs/w2_cmp
"""

from __future__ import annotations

from clseg_jax import config as config_lib

EXAMPLE_ARGS = (None, "compare", *(f"strategy={s}" for s in ("ewc", "si", "mas", "lfl", "lwf")))
STRATEGIES = (
    "naive",
    "ewc",
    "si",
    "mas",
    "rwalk",
    "lfl",
    "lwf",
    "replay",
    "gem",
    "agem",
    "cumulative",
    "joint",
)


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, strategy="naive", compare=False, seed=0)
    c = config_lib.base_config()
    c.seed = a.seed
    c.data.name = "shapes_di"
    c.data.seed = a.seed
    c.data.image_size = 64
    c.data.num_experiences = 4
    c.data.train_per_exp = 512
    c.data.test_per_exp = 128
    c.strategy.name = a.strategy
    # "Fisher over the experience's training set".
    c.strategy.ewc_samples = c.data.train_per_exp
    c.compare = STRATEGIES if a.compare else ()
    return c
