"""Full-size runs (minutes each on 2 CPU cores): ``make test-slow``, not part of ``make test``."""

from __future__ import annotations

import numpy as np
import pytest

from clseg_jax import train
from configs import shapes_di

pytestmark = pytest.mark.slow


def test_demo_stream_naive_forgets_and_cumulative_does_not(tmp_path):
    runs = {}
    for name in ("naive", "cumulative"):
        cfg = shapes_di.get_config(f"strategy={name}")
        cfg.progress = False
        runs[name] = train.run(cfg, str(tmp_path / name))
    naive, cumulative = runs["naive"], runs["cumulative"]
    assert np.mean(np.diag(naive["accuracy_matrix"])) > 0.5  # every domain gets learnt
    assert naive["forgetting"] > 0.1  # ... and fine-tuning forgets it
    assert cumulative["forgetting"] < naive["forgetting"] / 2
    assert cumulative["avg_miou"] > naive["avg_miou"]
