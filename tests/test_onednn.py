"""The oneDNN convolution kernel (``clseg_jax/kernels``) against XLA's convolutions.

Forward, backward-data and backward-weights on every convolution geometry the models use,
``jit``/``grad``/``vmap``/donation, a whole train step of each model family, and runs resumed
across implementations. Tolerances: float32 convolutions summed in another order, relative to
the largest magnitude of the reference: 1e-5 for single convolutions, 1e-4 for whole models'
losses and gradients (dozens of layers and BatchNorm).

Skipped where the kernel is not built, unless ``CLSEG_ONEDNN_REQUIRE=1`` (CI), where that fails.
"""

from __future__ import annotations

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clseg_jax import compiles, models, setup, train
from clseg_jax import step as step_lib
from clseg_jax.kernels import onednn, select
from clseg_jax.models import layers
from tests import tiny

if onednn.problem():
    if os.environ.get("CLSEG_ONEDNN_REQUIRE") == "1":
        raise RuntimeError(f"CLSEG_ONEDNN_REQUIRE=1 but {onednn.problem()}")
    pytest.skip(onednn.problem(), allow_module_level=True)

# (input [N,H,W,I], kernel size, O, stride, dilation, padding): UNet's 3x3 and 1x1 head, ResNet's
# 7x7/2 stem, strided 3x3 and 1x1 shortcut, DeepLab's dilated 3x3 (output stride 16/8, ASPP
# rates), BiSeNet's spatial path (3x3/2) and odd sizes whose SAME padding is asymmetric.
GEOMETRIES = [
    ((4, 16, 16, 8), 3, 16, 1, 1, "SAME"),
    ((2, 16, 16, 16), 1, 5, 1, 1, "SAME"),
    ((2, 32, 32, 3), 7, 8, 2, 1, ((3, 3), (3, 3))),
    ((2, 17, 15, 8), 3, 16, 2, 1, ((1, 1), (1, 1))),
    ((2, 16, 16, 8), 1, 16, 2, 1, ((0, 0), (0, 0))),
    ((2, 12, 12, 8), 3, 8, 1, 2, ((2, 2), (2, 2))),
    ((2, 12, 12, 8), 3, 8, 1, 6, ((6, 6), (6, 6))),
    ((3, 9, 10, 4), 3, 6, 2, 1, "SAME"),
    ((1, 8, 8, 4), 3, 4, 1, 1, ((0, 1), (1, 0))),
]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def _conv(impl, strides, padding, dilation):
    return lambda x, k: layers.conv2d(
        x, k, strides=strides, padding=padding, dilation=dilation, impl=impl
    )


def _operands(shape, ksize, out, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    k = jnp.asarray(rng.normal(size=(ksize, ksize, shape[-1], out)) / ksize, jnp.float32)
    return x, k


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}k{g[1]}s{g[3]}d{g[4]}")
def test_forward_and_both_backward_passes_match_xla(geometry):
    shape, ksize, out, s, d, padding = geometry
    x, k = _operands(shape, ksize, out)
    args = ((s, s), padding, (d, d))
    ours, ref = _conv("onednn", *args), _conv("xla", *args)
    y = jax.jit(ours)(x, k)
    assert y.shape == ref(x, k).shape
    assert _rel(y, ref(x, k)) <= 1e-5
    # A cotangent that is not all ones, so that every output position weighs differently.
    loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))
    gx, gk = jax.jit(jax.grad(loss(ours), (0, 1)))(x, k)
    rx, rk = jax.grad(loss(ref), (0, 1))(x, k)
    assert _rel(gx, rx) <= 1e-5, "backward data"
    assert _rel(gk, rk) <= 1e-5, "backward weights"


def test_vmap_folds_activations_and_loops_kernels():
    x, k = _operands((6, 8, 8, 4), 3, 5)
    args = ((1, 1), "SAME", (1, 1))
    ours, ref = _conv("onednn", *args), _conv("xla", *args)

    def per_sample(f):
        sample_loss = lambda k, x: jnp.sum(jnp.sin(f(x[None], k)))
        return jax.vmap(jax.grad(sample_loss), (None, 0))

    # Per-sample weight gradients (EWC's Fisher, MAS): the kernel gradient of each row.
    assert _rel(jax.jit(per_sample(ours))(k, x), per_sample(ref)(k, x)) <= 1e-5
    # A batch of kernels (a vmapped ensemble): one convolution per member.
    ks = jnp.stack([k, 2 * k, -k])
    xs = jnp.stack([x, x + 1, x * 0.5])
    members = lambda f: jax.vmap(jax.grad(lambda x, k: jnp.sum(jnp.sin(f(x, k))), (0, 1)))
    for a, b in zip(jax.jit(members(ours))(xs, ks), members(ref)(xs, ks), strict=True):
        assert _rel(a, b) <= 1e-5
    # One kernel over a batch of batches folds into one call: no loop in the program.
    hlo = jax.jit(jax.vmap(ours, (0, None))).lower(xs, k).as_text()
    assert hlo.count("clseg_conv_forward") == 1 and "while" not in hlo


def test_donated_operands_and_a_second_call_compile_once():
    x, k = _operands((4, 8, 8, 4), 3, 4)
    f = jax.jit(lambda x, k: (_conv("onednn", (1, 1), "SAME", (1, 1))(x, k), k), donate_argnums=0)
    again = jnp.array(x)
    y, _ = f(x, k)
    assert x.is_deleted()
    with compiles.Counter() as counter:
        y2, _ = f(again, k)
    assert counter.count == 0
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y2))


def test_an_explicit_onednn_that_cannot_apply_is_one_line():
    x, k = _operands((1, 8, 8, 4), 3, 4)
    with pytest.raises(ValueError, match="float32 only"):
        _conv("onednn", (1, 1), "SAME", (1, 1))(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="2 devices"):
        select.resolve("onednn", dtype="float32", devices=2)
    with pytest.raises(ValueError, match="bfloat16"):
        select.resolve("onednn", dtype="bfloat16", devices=1)
    with pytest.raises(ValueError, match="valid"):
        select.resolve("cudnn", dtype="float32", devices=1)
    assert select.resolve("auto", dtype="float32", devices=1) == "onednn"
    assert select.resolve("auto", dtype="float32", devices=8) == "xla"
    assert select.resolve("auto", dtype="bfloat16", devices=1) == "xla"
    assert select.resolve("auto", dtype="float32", devices=1, backend="gpu") == "xla"


# One model of each family with its smallest CPU variant.
FAMILIES = {
    "unet": ("unet", {"widths": (8, 16)}, (32, 32)),
    "resnet": ("resnet18", {"base_width": 8}, (32, 32)),
    "deeplab": ("deeplabv3_small", {}, (32, 32)),
    "bisenet": ("bisenet_small", {}, (64, 64)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_train_steps_loss_and_gradients_match_xla(family):
    name, kwargs, hw = FAMILIES[family]
    cfg = tiny.config().model
    cfg.name = name
    cfg.kwargs = models.kwargs_config(name, **kwargs)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (4, *hw, 3)), jnp.uint8)
    out = {}
    for impl in ("xla", "onednn"):
        cfg.conv_impl = impl
        graphdef, params, stats = models.init(cfg, 3, seed=0)
        forward = step_lib.make_forward(graphdef)

        def loss(p, forward=forward, stats=stats):
            logits = forward(p, stats, images, True)[0]["logits"]
            return jnp.mean(jnp.square(logits)) + jnp.mean(logits[..., 0])

        out[impl] = jax.jit(jax.value_and_grad(loss))(params)
        hlo = jax.jit(loss).lower(params).as_text()
        assert ("clseg_conv_forward" in hlo) == (impl == "onednn"), impl
    (la, ga), (lb, gb) = out["xla"], out["onednn"]
    assert _rel(lb, la) <= 1e-4
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(ga), jax.tree.leaves(gb), strict=True
    ):
        assert _rel(b, a) <= 1e-4 or np.max(np.abs(a)) < 1e-6, jax.tree_util.keystr(path)


def _stop_after(steps: int):
    count = itertools.count()
    return train.Hooks(should_stop=lambda: next(count) >= steps)


def _leaves(workdir):
    from clseg_jax import checkpoint

    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        arrays, _ = ckpt.read()
    finally:
        ckpt.close()
    return [np.asarray(x) for x in jax.tree.leaves(arrays["state"]["params"])]


def test_runs_resume_across_implementations_and_a_resumed_onednn_run_is_identical(tmp_path):
    fields = {"data.num_experiences": 2, "strategy.name": "ewc"}
    whole = train.run(tiny.config(**fields, **{"model.conv_impl": "onednn"}), tmp_path / "whole")
    # Stopped in the middle of the first experience, resumed: bit for bit the same run.
    for impl in ("onednn", "xla"):
        cfg = tiny.config(**fields, **{"model.conv_impl": impl})
        assert train.run(cfg, tmp_path / impl, _stop_after(20)) == {}
    resumed = train.run(tiny.config(**fields, **{"model.conv_impl": "onednn"}), tmp_path / "onednn")
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    for a, b in zip(_leaves(tmp_path / "whole"), _leaves(tmp_path / "onednn"), strict=True):
        np.testing.assert_array_equal(a, b)
    # An XLA checkpoint resumed with oneDNN, and back: both finish; the same run up to rounding.
    cfg = tiny.config(**fields, **{"model.conv_impl": "onednn"})
    mixed = train.run(cfg, tmp_path / "xla", _stop_after(20))
    assert mixed == {}
    mixed = train.run(tiny.config(**fields, **{"model.conv_impl": "xla"}), tmp_path / "xla")
    np.testing.assert_allclose(mixed["accuracy_matrix"], whole["accuracy_matrix"], atol=0.05)


def test_a_1x1_kernel_over_a_1x1_map_stays_a_matrix_product():
    # Global-pooling branches (ASPP, BiSeNet): measured faster as XLA's dot (layers.conv2d).
    x, k = _operands((4, 1, 1, 32), 1, 16)
    conv = jax.jit(_conv("onednn", (1, 1), "SAME", (1, 1)))
    assert "clseg_conv" not in conv.lower(x, k).as_text()
    np.testing.assert_allclose(conv(x, k), _conv("xla", (1, 1), "SAME", (1, 1))(x, k), rtol=1e-6)
    x, k = _operands((4, 2, 2, 32), 1, 16)
    assert "clseg_conv_forward" in conv.lower(x, k).as_text()


def test_auto_is_onednn_on_this_cpu_run():
    parts = setup.build(tiny.config())
    assert parts.env.conv_impl == "onednn"
    assert "clseg_conv_forward" in setup.compile_step(parts).as_text()
