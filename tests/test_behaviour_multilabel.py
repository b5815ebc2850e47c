"""Behaviour on the multi-label digits stream (configs/multilabel_digits.py), seeds 0 and 1.

Naive fine-tuning treats the unlabelled past classes of new images as negatives and forgets them.
LwF (per-class sigmoid distillation) and PPI (the same distillation as GEM-style constraints,
margin 1) must both beat it (``metrics.beats_reference`` on the mAP matrix); PPI, the paper's
claim, must end at least as high as LwF on average over the two seeds.
"""

from __future__ import annotations

import numpy as np
import pytest

from clseg_jax import metrics, train
from configs import multilabel_digits

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[int, dict]]:
    workdir = tmp_path_factory.mktemp("multilabel")
    out = {}
    for strategy in ("naive", "lwf", "ppi"):
        out[strategy] = {}
        for seed in SEEDS:
            cfg = multilabel_digits.get_config(f"strategy={strategy},seed={seed}")
            cfg.progress = False
            cfg.log.tensorboard = False
            out[strategy][seed] = train.run(cfg, str(workdir / f"{strategy}_{seed}"))
    return out


@pytest.mark.parametrize("strategy", ["lwf", "ppi"])
def test_beats_naive(runs, strategy):
    for seed in SEEDS:
        R, R_ref = runs[strategy][seed]["accuracy_matrix"], runs["naive"][seed]["accuracy_matrix"]
        verdict = metrics.beats_reference(R, R_ref)
        assert verdict["passes"], f"{strategy} seed {seed}: {verdict}"


def test_ppi_at_least_matches_lwf(runs):
    ppi = np.mean([runs["ppi"][s]["avg_miou"] for s in SEEDS])
    lwf = np.mean([runs["lwf"][s]["avg_miou"] for s in SEEDS])
    assert ppi >= lwf, (ppi, lwf)
