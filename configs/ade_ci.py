"""Class-incremental ADE20K (150 classes): the MiB / PLOP tables' 100-50, 100-10, 50-50, 100-5.

Same family as ``configs/voc_ci.py`` (``task``, ``setting``, ``method``, ``seed``, ``root``); the
data folder is ``ADEChallengeData2016`` (docs/class_incremental.md). A GPU user reproduces
PLOP's 100-50 row with:

  python -m clseg_jax.main \
    --config=configs/ade_ci.py:task=100-50,method=plop,root=$ADE,pretrained=$R101 \
    --workdir=runs/ade/100-50_overlapped_plop

Recipe as on VOC (DeepLab-v3, ResNet-101, OS16, crop 512, batch 24, SGD 0.01 / 0.001 with poly
decay, weight decay 1e-4) with 60 epochs per step (MiB's and PLOP's ADE scripts) and PLOP's ADE
distillation factors (0.001 on features, 0.00001 on logits). ``PAPER`` holds the published
old / new / all mIoU (PLOP Table 2, overlapped; the MiB row is PLOP's re-run of MiB).
"""

from __future__ import annotations

from clseg_jax import config as config_lib
from configs import voc_ci

METHODS = voc_ci.METHODS

PAPER: dict[tuple[str, str, str], tuple[float, float, float]] = {
    ("100-50", "overlapped", "mib"): (40.52, 17.17, 32.79),
    ("100-10", "overlapped", "mib"): (38.21, 11.12, 29.24),
    ("50-50", "overlapped", "mib"): (45.57, 21.01, 29.31),
    ("100-50", "overlapped", "plop"): (41.87, 14.89, 32.94),
    ("100-10", "overlapped", "plop"): (40.48, 13.61, 31.59),
    ("50-50", "overlapped", "plop"): (48.83, 20.99, 30.40),
}


ADE_CLASSES = 150


def get_config(arg: str | None = None):
    args = {
        **voc_ci.ARGS,
        "task": "100-50",
        "method": "plop",
        "root": "data/ADEChallengeData2016",
        "epochs": 60,
    }
    c = voc_ci.make(config_lib.parse_arg(arg, **args), "ade", ADE_CLASSES)
    if not c.data.name.startswith("tiny"):
        # PAPER's rows are PLOP's table, which scores ADE's "other" (0) as background.
        c.data.test_other = "background"
    if c.strategy.name == "plop":
        # PLOP's ADE scripts: smaller distillation factors than on VOC.
        c.strategy.plop_pod_factor = 0.001
        c.strategy.plop_pod_logits_factor = 0.00001
    return c
