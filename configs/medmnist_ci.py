"""Class-incremental MedMNIST (CCSI's benchmark): one 2D MedMNIST dataset, its classes over steps.

Reads ``<root>/<name>.npz`` (``<name>_<size>.npz`` for MedMNIST+ sizes) as the ``medmnist``
package stores it (its default root is ``~/.medmnist``); nothing is downloaded. Steps default to
the CCSI code's splits: BloodMNIST and TissueMNIST 2+2+2+2, PathMNIST 3+2+2+2, OrganAMNIST
3+3+3+2; ``steps=3-2-2-2`` sets them for any dataset. Scored class-incrementally (argmax over every
class seen so far) and task-incrementally (``results.json["task_il"]``).

  python -m clseg_jax.main \\
      --config=configs/medmnist_ci.py:name=bloodmnist,root=~/.medmnist,strategy=naive,seed=0 \\
      --workdir=runs/medmnist/bloodmnist_naive
  python -m clseg_jax.main --config=configs/medmnist_ci.py:name=pathmnist,compare \\
      --workdir=runs/medmnist/pathmnist_cmp
  python -m clseg_jax.main --config=configs/medmnist_ci.py:name=bloodmnist,quick \\
      --workdir=runs/medmnist/blood_quick

Recipe (the CCSI code, github.com/sanaAyrml/Class-Impresion-for-Data-free-Incremental-Learning,
``main.py`` and ``configs/<data>/sweep_task_*.yaml``): 28 px images zero-padded to 32
(``Pad(4)`` + ``CenterCrop(32)``), no augmentation, batch 40, 100 epochs per step, plain SGD at lr
0.1 without momentum or weight decay, class order 0..K-1. Two departures, both stated:

* the backbone is a small-input ResNet-18 (the code's ``small_model`` is a three-stage ResNet with
  one block per stage; its non-small model is ResNet-18-like [2,2,2,2]);
* the code lowers the rate by 0.3 when accuracy on its evaluation loader, the *test* split,
  plateaus for 5 epochs; choosing a schedule on test data is not allowed here, so the rate follows
  a per-step cosine decay instead.

``norm=continual`` switches to Continual Normalization (CCSI's). ``strategy=ccsi`` (alone or in a
chain) brings CCSI's model: the cosine head and, unless ``norm=`` says otherwise, Continual
Normalization. ``size=64|128|224`` reads the MedMNIST+ files; 128 and 224 px use the ImageNet stem
(7x7 stride 2 + max-pool). ``quick`` is a CPU-sized run (256 training / 100 test images per step,
ResNet widths 8-64, 3 epochs, batch 16) and scales the synthesis iterations of the data-free
strategies like the epochs (3 / 100: CCSI's 5000 -> 150, DeepInversion's 200 -> 6), keeps 400
class impressions (``configs/digits_data_free.py``'s, measured for 256 images per step) and starts
the cosine head's scale at 10 (the same config measured why).

Results: none yet. The MedMNIST files are not in this repository and cannot be downloaded where it
is developed; docs/data_free.md's MedMNIST table is filled from runs of the commands above.
"""

from __future__ import annotations

from clseg_jax import config as config_lib
from clseg_jax import models, strategies

EXAMPLE_ARGS = (
    None,
    "name=pathmnist,strategy=lwf",
    "name=organamnist,strategy=replay,norm=continual",
    "name=dermamnist,steps=3-2-2,size=64",
    "quick,compare",
    "quick,strategy=ccsi",
)
ARGS = dict(
    name="bloodmnist",
    root="~/.medmnist",
    size=28,
    strategy="naive",
    seed=0,
    steps="",
    norm="",  # "batch", or "continual" with strategy=ccsi
    quick=False,
    compare=False,
)


FULL_EPOCHS = 100  # per step, the CCSI code's


def parse_steps(steps: str) -> tuple[int, ...]:
    """``"3-2-2-2"`` -> ``(3, 2, 2, 2)``; ``""`` -> ``()`` (the loader's default split)."""
    try:
        return tuple(int(s) for s in steps.split("-")) if steps else ()
    except ValueError:
        msg = f"steps must look like 3-2-2-2 (classes per step), got {steps!r}"
        raise ValueError(msg) from None


def get_config(arg: str | None = None):
    a = config_lib.parse_arg(arg, **ARGS)
    c = config_lib.base_config()
    c.seed = a.seed
    c.data.name = "medmnist"
    c.data.flag = a.name
    c.data.root = a.root
    c.data.size = a.size
    c.data.seed = a.seed
    c.data.classes_per_step = parse_steps(a.steps)
    c.data.class_order = ()
    c.data.train_splits = ("train",)
    c.data.test_split = "test"
    # The CCSI code's 28 -> 32 zero pad; MedMNIST+ sizes are used as they are.
    c.data.image_size = 32 if a.size == 28 else 0
    c.data.train_per_exp = 256 if a.quick else 0
    c.data.test_per_exp = 100 if a.quick else 0
    ccsi = "ccsi" in strategies.names(a.strategy)
    c.model.name = "resnet18"
    norm = a.norm or ("continual" if ccsi else "batch")
    c.model.kwargs = models.kwargs_config("resnet18", small_input=a.size <= 64, norm=norm)
    if ccsi:
        c.model.kwargs.head = "cosine"
    if a.quick:
        c.model.kwargs.widths = (8, 16, 32, 64)
        if ccsi:
            c.model.kwargs.sigma_init = 10.0
    c.batch_size = 16 if a.quick else 40
    c.eval_batch_size = 100 if a.quick else 256
    c.eval_task_il = True
    c.epochs = 3 if a.quick else FULL_EPOCHS
    c.optimizer.name = "sgd"
    c.optimizer.lr = 0.1
    c.optimizer.momentum = 0.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.schedule = "cosine"
    c.log_every_steps = 16 if a.quick else 100
    c.strategy.name = a.strategy
    # As many replayed rows as new ones per step.
    c.strategy.replay_batch = c.batch_size
    if a.quick:  # synthesis scaled like the epochs (3 of the recipe's 100)
        for key in ("ccsi_iterations", "di_iterations"):
            c.strategy[key] = max(1, round(c.strategy[key] * c.epochs / FULL_EPOCHS))
        # configs/digits_data_free.py's measured memory for 256 real images per step (640, for
        # thousands per step, made the first quick synthesis take minutes).
        c.strategy.ccsi_mem_size = 400
    c.compare = ("naive", "lwf", "replay", "cumulative") if a.compare else ()
    return c
