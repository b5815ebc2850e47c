"""Behaviour: each regulariser forgets less than naive *and* still learns, on seeds 0 and 1.

The stream and strengths are ``configs/behaviour_di.py`` (binary shapes over three looks, 32 Adam
steps per look: each run takes seconds). The criterion is ``metrics.beats_reference``; the last
two tests show it can fail: a frozen model and an over-regularised one do.
"""

from __future__ import annotations

import numpy as np
import pytest

from clseg_jax import metrics, train
from configs import behaviour_di

SEEDS = (0, 1)


def _run(workdir, strategy: str, seed: int, **hparams) -> dict:
    cfg = behaviour_di.get_config(f"strategy={strategy},seed={seed}")
    cfg.progress = False
    cfg.log.tensorboard = False
    cfg.strategy.update(hparams)
    return train.run(cfg, str(workdir / f"{strategy}_{seed}"))


@pytest.fixture(scope="module")
def naive(tmp_path_factory) -> dict[int, dict]:
    workdir = tmp_path_factory.mktemp("behaviour")
    return {seed: _run(workdir, "naive", seed) for seed in SEEDS}


def test_naive_learns_and_forgets(naive):
    # The premise of the stream: each look is learnt, and much of it is lost.
    for r in naive.values():
        assert r["avg_diag"] > 0.85 and r["forgetting"] > 0.2


@pytest.mark.parametrize("strategy", sorted(behaviour_di.TUNED))
def test_forgets_less_than_naive_and_still_learns(strategy, naive, tmp_path):
    for seed in SEEDS:
        r = _run(tmp_path, strategy, seed)
        verdict = metrics.beats_reference(r["accuracy_matrix"], naive[seed]["accuracy_matrix"])
        assert verdict["passes"], f"{strategy} seed {seed}: {verdict}"


def test_frozen_model_fails_the_criterion(naive):
    # A model that never trains scores its initial row after every experience.
    for r in naive.values():
        frozen = np.tile(r["initial_row"], (len(r["initial_row"]), 1))
        assert not metrics.beats_reference(frozen, r["accuracy_matrix"])["passes"]


def test_huge_lambda_fails_the_criterion(naive, tmp_path):
    r = _run(tmp_path, "ewc", 0, ewc_lambda=1e7)
    verdict = metrics.beats_reference(r["accuracy_matrix"], naive[0]["accuracy_matrix"])
    assert not verdict["passes"], verdict
    assert verdict["avg_diag"] < verdict["ref_avg_diag"] - 0.05  # it stopped learning
