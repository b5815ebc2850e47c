"""Multi-label class-incremental digits: 64x64 canvases with 1-3 real MNIST digits, 3 tasks
(digits 0-3, 4-6, 7-9); sigmoid/BCE head over the classes seen so far; R holds mAP per task.

Task t trains on the canvases holding one of its digits, with the other tasks' digits unlabelled
(``data/class_steps.py``), the multi-label CL protocol of the PPI paper's VOC split.

  python -m clseg_jax.main --config=configs/multilabel_digits.py:strategy=ppi --workdir=runs/ml
  python -m clseg_jax.main --config=configs/multilabel_digits.py:compare --workdir=runs/ml_cmp
"""

from __future__ import annotations

from clseg_jax import config as config_lib
from clseg_jax import models

EXAMPLE_ARGS = (None, "strategy=ppi", "strategy=lwf", "strategy=replay", "strategy=gem")


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, strategy="naive", compare=False, seed=0)
    c = config_lib.base_config()
    c.seed = a.seed
    c.data.name = "digits_ml"
    c.data.seed = a.seed
    c.data.image_size = 32
    c.data.max_digits = 3
    c.data.classes_per_step = (4, 3, 3)
    c.data.train_per_exp = 256
    c.data.test_per_exp = 128
    c.model.name = "resnet18"
    c.model.kwargs = models.kwargs_config("resnet18", small_input=True, widths=(8, 16, 32, 64))
    c.batch_size = 16
    c.eval_batch_size = 64
    c.epochs = 2
    c.optimizer.name = "adam"
    c.optimizer.lr = 1e-3
    c.optimizer.momentum = 0.0
    c.log_every_steps = 16
    c.strategy.name = a.strategy
    c.strategy.replay_batch = 16
    c.compare = ("naive", "lwf", "ppi", "replay", "gem", "agem", "cumulative") if a.compare else ()
    return c
