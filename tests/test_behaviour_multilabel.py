"""Behaviour on the multi-label digits stream (configs/multilabel_digits.py), seeds 0 and 1.

Naive fine-tuning treats the unlabelled past classes of new images as negatives and forgets them.
LwF (per-class sigmoid distillation) and PPI (the same distillation as GEM-style constraints,
margin 1) must both beat it (``metrics.beats_reference`` on the mAP matrix); PPI, whose paper
claims it does at least as well, must end within the measured seed spread of LwF (0.03) on
average over the two seeds, and well above naive.
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


# PPI's final average mAP minus LwF's, per seed (seeds 0-3, AMD EPYC, 2026-12-06): +0.038,
# +0.016, +0.007, +0.015 (mean +0.019); an Intel Xeon gave -0.006 as the mean of seeds 0-1. Both
# beat naive by 0.05-0.15 on every seed, so "matches" is held to that spread: within 0.03.
PPI_LWF_SPREAD = 0.03


def test_ppi_matches_lwf_within_seed_spread(runs):
    ppi = np.mean([runs["ppi"][s]["avg_miou"] for s in SEEDS])
    lwf = np.mean([runs["lwf"][s]["avg_miou"] for s in SEEDS])
    naive = np.mean([runs["naive"][s]["avg_miou"] for s in SEEDS])
    assert ppi >= lwf - PPI_LWF_SPREAD, (ppi, lwf)
    assert ppi - naive > PPI_LWF_SPREAD, (ppi, naive)  # far above naive: not a tie at its level
