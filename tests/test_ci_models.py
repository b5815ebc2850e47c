"""DeepLab-v3 and BiSeNet (small variants) through the whole class-incremental trainer.

The VOC-layout tiny stream, two steps, each paper method whose loss reads more than the logits
(PLOP's pooled maps, ILT's encoder features, MiB's head): the run finishes, compiles its train
step once for the stream, and reports old/new/all on the full test set.
"""

from __future__ import annotations

import pytest

from clseg_jax import train
from configs import voc_ci


@pytest.mark.parametrize(
    "model,method",
    [("deeplabv3_small", "mib"), ("bisenet_small", "plop"), ("deeplabv3_small", "ilt")],
)
def test_model_runs_a_protocol(model, method, tmp_path):
    cfg = voc_ci.get_config(f"tiny,task=3-1,method={method},model={model},epochs=1")
    assert cfg.model.name == model
    cfg.progress = False
    cfg.log.tensorboard = False
    results = train.run(cfg, str(tmp_path))
    assert results["timing"]["compiles_per_phase"][1] == 0
    assert len(results["old_new_all"]) == 2
    assert results["old_new_all_on"] == "full test set"
    assert all(0.0 <= v <= 1.0 for v in results["old_new_all"][-1].values())
