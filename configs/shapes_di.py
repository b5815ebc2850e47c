"""Domain-incremental procedural shapes with the W1 UNet: the default demo.

Four domains (plain, dark striped, blurred noisy, low contrast) of the same 5 classes
(background, circle, square, triangle, cross), 32x32, 1,024 training and 128 test images per
domain, 4 epochs of batch 32 (128 steps per domain), Adam 3e-3, W1's UNet (482,805 parameters).

Demo (naive fine-tuning against joint training; what `make demo` runs):
  python -m clseg_jax.main --config=configs/shapes_di.py:compare --workdir=runs/demo

One strategy (any registry name, or a chain such as ewc+lwf; hyperparameters with
--config.strategy.<field>=<value>, e.g. --config.strategy.ewc_lambda=1000):
  python -m clseg_jax.main --config=configs/shapes_di.py:strategy=ewc --workdir=runs/shapes_ewc

Result of the demo (2-core CPU, seed 0; runs/demo/<strategy>/results.json, rerun 2026-12-06):
naive avg mIoU 0.267, forgetting 0.272, BWT -0.272, FWT 0.078, mean diag 0.471; joint avg mIoU
0.399 (about 3 minutes for both on an idle machine).
"""

from __future__ import annotations

from clseg_jax import config as config_lib

EXAMPLE_ARGS = (
    None,
    "compare",
    "strategy=cumulative",
    *(f"strategy={s}" for s in ("ewc", "si", "mas", "rwalk", "lfl", "lwf", "ewc+lwf")),
)


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, strategy="naive", compare=False, seed=0, train_per_exp=1024)
    c = config_lib.base_config()
    c.seed = a.seed
    c.data.name = "shapes_di"
    c.data.seed = a.seed
    # 32x32 keeps the demo within minutes on 2 CPU cores; the model is W1's UNet.
    c.data.image_size = 32
    c.data.num_experiences = 4
    c.data.looks = ()  # names from clseg_jax.data.shapes.DOMAINS; () = all, in their order
    c.data.binary = False  # True: background / shape
    c.data.train_per_exp = a.train_per_exp
    c.data.test_per_exp = 128
    c.epochs = 4
    # Adam learns these shapes in ~100 steps per domain, where W1's SGD needs several hundred.
    c.optimizer.name = "adam"
    c.optimizer.lr = 3e-3
    c.optimizer.momentum = 0.0
    c.strategy.name = a.strategy
    c.compare = ("naive", "joint") if a.compare else ()
    return c
