"""Any registered strategy on a user folder of ``exp0.npz, exp1.npz, ...``.

The folder's format: docs/data_and_models.md.

Defaults are BENCHMARKS.md's W1 recipe: the W1 UNet (widths 16-32-64-128, batch norm, PyTorch
initialisation), batch 32, SGD lr 0.01 momentum 0.9, 2 epochs per experience, no augmentation.

  python -m clseg_jax.main --config=configs/npz.py:strategy=naive \\
      --config.data.path=/path/to/folder --workdir=runs/npz_naive

``--config.data.num_classes=K`` fixes the class count (default: inferred from the labels);
``--config.data.kind=class`` treats the folder as class-incremental (classes present in each
file's training labels are that experience's classes). ``model=resnet18`` (or another
``clseg_jax.models.MODELS`` name) swaps the model with its own ``model.kwargs``: a folder with
``[N]`` class ids (classification) needs one of the ResNets.
"""

from __future__ import annotations

from clseg_jax import config as config_lib
from clseg_jax import models

EXAMPLE_ARGS = (None, "strategy=joint", "model=resnet18")


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, strategy="naive", seed=0, model="unet")
    c = config_lib.base_config()
    c.seed = a.seed
    c.data.name = "npz"
    c.data.path = ""
    c.data.num_classes = 0
    c.data.kind = "domain"
    c.strategy.name = a.strategy
    if a.model != "unet":
        c.model.name = a.model
        c.model.kwargs = models.kwargs_config(a.model)
    return c
