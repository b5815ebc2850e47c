"""The outputs that strategies read from a model (``models.OUTPUTS``), on every model family.

Shapes only, through ``jax.eval_shape`` (nothing is compiled): segmentation models give per-pixel
logits, a feature map, a penultimate map whose channels feed the head, and PLOP's ``pod`` maps;
classifiers give ``[B,K]`` logits, a feature map and a pooled penultimate ``[B,F]`` matching the
head kernel's input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from flax import nnx

from clseg_jax import models
from clseg_jax import step as step_lib

K, B, S = 5, 2, 32
FAMILIES = {
    "unet": ({"widths": (4, 8)}, True),
    "resnet18": ({"small_input": True, "widths": (4, 4, 8, 8)}, False),
    "deeplabv3_small": ({}, True),
    "bisenet_small": ({}, True),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_model_outputs_follow_the_contract(name):
    kwargs, dense = FAMILIES[name]
    cfg = ml_collections.ConfigDict({"name": name, "kwargs": kwargs})
    abstract = nnx.eval_shape(lambda: models.make(cfg, K, 0))
    graphdef, params, stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
    forward = step_lib.make_forward(graphdef)
    images = jax.ShapeDtypeStruct((B, S, S, 3), jnp.uint8)
    out, _ = jax.eval_shape(
        lambda p, s, x: forward(p, s, x, True), params.to_pure_dict(), stats.to_pure_dict(), images
    )
    assert set(out) >= {"logits", "features", "penultimate"}
    assert set(out) <= set(models.OUTPUTS), set(out) - set(models.OUTPUTS)
    logits, feats, pen = out["logits"], out["features"], out["penultimate"]
    assert logits.dtype == jnp.float32
    assert feats.ndim == 4 and feats.shape[0] == B
    head = params.to_pure_dict()["head"]
    fan_in = head["kernel"].shape[-2]
    if dense:
        assert logits.shape == (B, S, S, K)
        assert pen.ndim == 4 and pen.shape[0] == B and pen.shape[-1] == fan_in
        pod = out["pod"]
        assert isinstance(pod, tuple) and len(pod) >= 2
        assert all(p.ndim == 4 and p.shape[0] == B for p in pod)
        assert pod[-1].shape == pen.shape  # the last pod map is the head's input
    else:
        assert logits.shape == (B, K)
        assert pen.shape == (B, fan_in)
        assert "pod" not in out
