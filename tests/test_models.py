"""The UNet: W1's parameter count, and the fast formulations equal the textbook ops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clseg_jax import models
from clseg_jax.models import layers, unet
from configs import npz as npz_config


def _count(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_w1_config_has_482805_parameters():
    cfg = npz_config.get_config()
    model = models.make(cfg.model, num_classes=5, seed=0)
    assert _count(model) == 482_805


def test_unet_shapes_and_bottleneck():
    model = unet.UNet(7, widths=(8, 16, 32), rngs=nnx.Rngs(0))
    out = model(jnp.zeros((2, 32, 32, 3)), train=False)
    assert out["logits"].shape == (2, 32, 32, 7)
    assert out["features"].shape == (2, 8, 8, 32)


def test_upconv_equals_transposed_conv():
    up = layers.UpConv2x2(6, 4, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6))
    k = up.kernel[...]  # [2,2,Cin,Cout]
    # Reference: input pixel (h, w) writes x[h,w] @ k[i,j] to output (2h+i, 2w+j).
    ref = np.zeros((2, 10, 14, 4), np.float32)
    xn, kn = np.asarray(x), np.asarray(k)
    for i in range(2):
        for j in range(2):
            ref[:, i::2, j::2] = np.einsum("bhwc,cd->bhwd", xn, kn[i, j])
    ref += np.asarray(up.bias[...])
    np.testing.assert_allclose(np.asarray(up(x)), ref, rtol=1e-5, atol=1e-5)
    # And against XLA's transposed conv, which flips the kernel spatially (PyTorch does not).
    lax_ref = jax.lax.conv_transpose(
        x,
        k[::-1, ::-1],
        strides=(2, 2),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_allclose(
        np.asarray(up(x)), np.asarray(lax_ref + up.bias[...]), rtol=1e-5, atol=1e-5
    )


def test_split_conv_equals_conv_on_concatenation():
    conv = layers.Conv(5, 4, 3, use_bias=True, in_splits=(2, 3), rngs=nnx.Rngs(2))
    a = jax.random.normal(jax.random.key(1), (2, 8, 8, 2))
    b = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    whole = layers.Conv(5, 4, 3, use_bias=True, rngs=nnx.Rngs(3))
    whole.kernel[...] = conv.kernel[...]
    whole.bias[...] = conv.bias[...]
    np.testing.assert_allclose(
        np.asarray(conv(a, b)), np.asarray(whole(jnp.concatenate([a, b], -1))), atol=1e-5
    )


def test_max_pool_equals_reduce_window():
    x = jax.random.normal(jax.random.key(3), (2, 8, 6, 3))
    ref = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    np.testing.assert_array_equal(np.asarray(layers.max_pool_2x2(x)), np.asarray(ref))


def test_torch_default_init_bounds():
    conv = layers.Conv(16, 32, 3, use_bias=False, rngs=nnx.Rngs(0))
    bound = 1 / np.sqrt(16 * 9)
    k = np.asarray(conv.kernel[...])
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound


def test_batchnorm_momentum_matches_pytorch():
    norm = layers.make_norm("batch", 3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (4, 5, 5, 3)) + 2.0
    layers.apply_norm(norm, x, train=True)
    expected = 0.1 * np.asarray(x).mean(axis=(0, 1, 2))  # running = 0.9 * 0 + 0.1 * batch
    np.testing.assert_allclose(np.asarray(norm.mean[...]), expected, rtol=1e-5)


def test_unknown_model_lists_valid_names():
    cfg = npz_config.get_config()
    cfg.model.name = "vgg"
    try:
        models.make(cfg.model, num_classes=5, seed=0)
    except ValueError as e:
        assert "vgg" in str(e) and "unet" in str(e)
    else:
        raise AssertionError("no error for an unknown model")
