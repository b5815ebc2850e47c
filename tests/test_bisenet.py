"""BiSeNet v1: shapes, the parameter count, ARM / FFM / the whole head against NumPy written from
the paper's equations, auxiliary heads, bf16, gradients through the trainer's forward, weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clseg_jax import models
from clseg_jax import step as step_lib
from clseg_jax.models import bisenet, resnet, weights
from tests.test_deeplab import bn_ref, conv_ref, drawn, resize_ref

HW = 32


def _small(**kw):
    return lambda: models.MODELS["bisenet_small"](5, rngs=nnx.Rngs(0), **kw)


def _images(n: int = 2, hw: int = HW) -> jax.Array:
    return jax.random.randint(jax.random.key(0), (n, hw, hw, 3), 0, 256).astype(jnp.uint8)


def _run(build, hw: int = HW, train: bool = False, seed: int = 0):
    graphdef, params, stats = drawn(build, seed)
    forward = jax.jit(step_lib.make_forward(graphdef), static_argnums=3)
    out, new_stats = forward(params, stats, _images(hw=hw), train)
    return nnx.merge(graphdef, params, stats), out, new_stats


def _count(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _relu(x):
    return np.maximum(x, 0)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _np(v) -> np.ndarray:
    return np.asarray(v[...], np.float64)


def arm_ref(x, arm):
    """Paper Fig. 2(b): x * sigmoid(BN(conv1x1(global average of x)))."""
    pooled = x.mean(axis=(1, 2), keepdims=True)  # [B,1,1,C]
    return x * _sigmoid(bn_ref(pooled @ _np(arm.attention.conv.kernel)[0, 0], arm.attention.bn))


def ffm_ref(x, ffm):
    """Paper Fig. 2(c): f = ReLU(BN(conv(x))); f + f * sigmoid(conv(ReLU(conv(gap(f)))))."""
    f = _relu(bn_ref(conv_ref(x, _np(ffm.fuse.conv.kernel)), ffm.fuse.bn))
    g = f.mean(axis=(1, 2), keepdims=True)
    h = _relu(g @ _np(ffm.conv1.kernel)[0, 0] + _np(ffm.conv1.bias))
    a = _sigmoid(h @ _np(ffm.conv2.kernel)[0, 0] + _np(ffm.conv2.bias))
    return f + f * a


def test_shapes_and_no_aux_by_default():
    _, out, _ = _run(_small())
    assert out["logits"].shape == (2, HW, HW, 5) and out["logits"].dtype == jnp.float32
    assert out["features"].shape == (2, HW // 32, HW // 32, 64)
    assert out["penultimate"].shape == (2, HW // 8, HW // 8, 32)
    assert [p.shape[1:] for p in out["pod"]] == [
        (8, 8, 8),
        (4, 4, 16),
        (2, 2, 32),
        (1, 1, 64),
        (4, 4, 32),
    ]
    assert "aux" not in out


def test_parameter_count_resnet18_context_path():
    model = nnx.eval_shape(lambda: models.MODELS["bisenet"](21, rngs=nnx.Rngs(0)))
    backbone = 11_689_512 - (512 * 1000 + 1000)  # torchvision's resnet18 without its fc
    spatial = sum(9 * ci * co + 2 * co for ci, co in ((3, 64), (64, 128), (128, 256)))
    arms = sum(c * c + 2 * c for c in (256, 512))  # 1x1 conv (no bias, BN follows) + BN
    ffm_in = 256 + 256 + 512
    ffm = 9 * ffm_in * 256 + 2 * 256 + 2 * (256 * 256 + 256)
    head = 256 * 21 + 21
    assert _count(model.backbone) == backbone
    assert _count(model) == backbone + spatial + arms + ffm + head
    aux = nnx.eval_shape(lambda: models.MODELS["bisenet"](21, aux_heads=True, rngs=nnx.Rngs(0)))
    assert _count(aux) - _count(model) == (256 * 21 + 21) + (512 * 21 + 21)


def test_arm_and_ffm_match_the_paper():
    kw = dict(norm="batch", dtype=None)
    arm = nnx.merge(*drawn(lambda: bisenet.AttentionRefinement(6, rngs=nnx.Rngs(0), **kw)))
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 6))
    np.testing.assert_allclose(
        np.asarray(arm(jnp.asarray(x, jnp.float32), False)), arm_ref(x, arm), atol=1e-5
    )
    ffm = nnx.merge(*drawn(lambda: bisenet.FeatureFusion(7, 4, rngs=nnx.Rngs(0), **kw), seed=1))
    x = np.random.default_rng(1).normal(size=(2, 4, 3, 7))
    np.testing.assert_allclose(
        np.asarray(ffm(jnp.asarray(x, jnp.float32), False)), ffm_ref(x, ffm), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("hw", [32, 35])
def test_whole_head_matches_numpy_given_the_backbone_stages(hw):
    model, out, _ = _run(_small(aux_heads=True), hw=hw)
    x = np.asarray(_images(hw=hw), np.float64) / 127.5 - 1.0
    s = x
    for block in model.spatial:  # three 3x3 stride-2 conv-BN-ReLU
        s = _relu(bn_ref(conv_ref(s, _np(block.conv.kernel), stride=2), block.bn))
    c3, c4 = (np.asarray(p, np.float64) for p in out["pod"][2:4])
    c16 = arm_ref(c3, model.arm16)
    c32 = arm_ref(c4, model.arm32) * c4.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(np.asarray(out["features"]), c32, rtol=1e-4, atol=1e-4)
    ups = [resize_ref(c, *s.shape[1:3]) for c in (c16, c32)]
    y = ffm_ref(np.concatenate([s, *ups], axis=-1), model.ffm)
    np.testing.assert_allclose(np.asarray(out["penultimate"]), y, rtol=1e-3, atol=1e-3)
    logits = resize_ref(y @ _np(model.head.kernel)[0, 0] + _np(model.head.bias), hw, hw)
    np.testing.assert_allclose(np.asarray(out["logits"]), logits, rtol=1e-3, atol=1e-3)
    aux = [
        resize_ref(c @ _np(h.kernel)[0, 0] + _np(h.bias), hw, hw)
        for h, c in ((model.aux16, c16), (model.aux32, c32))
    ]
    assert len(out["aux"]) == 2 and all(a.dtype == jnp.float32 for a in out["aux"])
    for got, ref in zip(out["aux"], aux, strict=True):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-3, atol=1e-3)


def test_bf16_convolves_in_bf16_and_stays_near_float32():
    """Same weights: every convolution of the bf16 model runs in bfloat16 (lowered StableHLO),
    its outputs come back float32, and they differ from the float32 model's by bf16 rounding
    (8-bit mantissa, relative 2^-8 per op) over ~20 layers: not 0, under 5% in norm (1.2% seen).

    Compared in eval mode: in train mode the batch statistics of 2 images at 1x1 resolution
    (1/32 of 32 px) normalise two values to about +-1, so any rounding can flip a sign (63% seen).
    """
    _, ref, _ = _run(_small(aux_heads=True))
    _, out, _ = _run(_small(dtype="bfloat16", aux_heads=True))
    assert out["logits"].dtype == jnp.float32 and out["aux"][0].dtype == jnp.float32
    for got, want in ((out["logits"], ref["logits"]), (out["aux"][0], ref["aux"][0])):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert 0.0 < rel < 0.05, rel
    graphdef, params, stats = drawn(_small(dtype="bfloat16"))
    forward = jax.jit(step_lib.make_forward(graphdef), static_argnums=3)
    text = forward.lower(params, stats, _images(), True).as_text()
    convs = [line for line in text.splitlines() if "stablehlo.convolution" in line]
    assert convs and all("bf16" in line for line in convs), [c for c in convs if "bf16" not in c]


def test_gradients_and_batch_stats_through_the_trainer_forward():
    graphdef, params, stats = drawn(_small())
    forward = step_lib.make_forward(graphdef)

    def loss(params, stats, images):
        out, new_stats = forward(params, stats, images, True)
        return jnp.mean(out["logits"] ** 2), new_stats

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, new_stats), grads = grad_fn(params, stats, _images())
    for path in (
        ("head", "kernel"),
        ("spatial", 0, "conv", "kernel"),
        ("backbone", "stem", "conv", "kernel"),
        ("arm16", "attention", "conv", "kernel"),
        ("ffm", "conv2", "bias"),
    ):
        g = grads
        for key in path:
            g = g[key]
        assert float(jnp.abs(g).max()) > 0, path
    moved = new_stats["ffm"]["fuse"]["bn"]["mean"] - stats["ffm"]["fuse"]["bn"]["mean"]
    assert float(jnp.abs(moved).max()) > 0


def test_registry_and_weights_roundtrip(tmp_path):
    abstract = nnx.eval_shape(lambda: models.MODELS["bisenet"](3, rngs=nnx.Rngs(0)))
    assert abstract.backbone.channels == (64, 128, 256, 512)
    assert [b.conv.stride for b in abstract.spatial] == [2, 2, 2]
    model = nnx.merge(*drawn(_small(aux_heads=True), seed=1))  # random running statistics
    path = tmp_path / "w.npz"
    weights.save_model(path, model)
    with np.load(path) as npz:
        assert npz["params/head/kernel"].shape == (1, 1, 32, 5)
        assert npz["params/aux32/kernel"].shape == (1, 1, 64, 5)
    dst = nnx.merge(*drawn(_small(aux_heads=True), seed=2))
    weights.load_into(path, dst)
    x = jnp.asarray(_images(), jnp.float32) / 127.5 - 1
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lambda m, x: m(x)["logits"])(dst, x)),
        np.asarray(jax.jit(lambda m, x: m(x)["logits"])(model, x)),
    )
    # An ImageNet ResNet-18-style classifier fills the context path's backbone.
    _, cp, cs = drawn(lambda: resnet.ResNet(4, base_width=8, small_input=False, rngs=nnx.Rngs(0)))
    weights.save(tmp_path / "clf.npz", cp, cs)
    _, p, s = nnx.split(dst, nnx.Param, nnx.BatchStat)
    new_p, _ = weights.load(
        tmp_path / "clf.npz", nnx.to_pure_dict(p), nnx.to_pure_dict(s), into="backbone"
    )
    got = new_p["backbone"]["layer4"][1]["conv2"]["kernel"]
    np.testing.assert_array_equal(got, cp["layer4"][1]["conv2"]["kernel"])
