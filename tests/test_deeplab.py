"""DeepLab-v3 and the bottleneck ResNets: shapes per output stride, dilation, parameter counts
(torchvision's published ones), ASPP and bilinear upsampling against NumPy references written
from the papers / PyTorch's documented formulas, bf16, weight files, and (with torch installed)
converted torchvision weights giving torchvision's outputs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clseg_jax import models
from clseg_jax import step as step_lib
from clseg_jax.models import deeplab, layers, resnet, weights
from experiments.baselines import convert_torchvision

HW = 32


def _count(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def drawn(build, seed: int = 0) -> tuple[nnx.GraphDef, dict, dict]:
    """``build()``'s graphdef and NumPy-drawn params and non-trivial running statistics.

    ``nnx.eval_shape`` skips the eager initialisers (one XLA compile each on two shared cores).
    """
    graphdef, params, stats = nnx.split(nnx.eval_shape(build), nnx.Param, nnx.BatchStat)
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = path[-1].key
        if name == "kernel":
            scale = np.sqrt(2.0 / np.prod(x.shape[:-1]))
            return jnp.asarray(rng.normal(size=x.shape) * scale, x.dtype)
        if name in ("scale", "var"):
            return jnp.asarray(1.0 + 0.2 * np.abs(rng.normal(size=x.shape)), x.dtype)
        return jnp.asarray(0.1 * rng.normal(size=x.shape), x.dtype)  # bias, mean

    params = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(params))
    stats = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(stats))
    return graphdef, params, stats


def _small(**kw):
    return lambda: models.MODELS["deeplabv3_small"](5, rngs=nnx.Rngs(0), **kw)


def _images(n: int = 2, hw: int = HW) -> jax.Array:
    return jax.random.randint(jax.random.key(0), (n, hw, hw, 3), 0, 256).astype(jnp.uint8)


# --- Independent references -------------------------------------------------------------------


def conv_ref(x, k, stride=1, dilation=1):
    """NumPy conv, ``x [B,H,W,Ci]``, ``k [kh,kw,Ci,Co]``, zero padding ``dilation * (kh // 2)``."""
    kh, kw = k.shape[:2]
    p = dilation * (kh // 2)
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    ho = (x.shape[1] + 2 * p - dilation * (kh - 1) - 1) // stride + 1
    wo = (x.shape[2] + 2 * p - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, k.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            patch = xp[
                :,
                i * dilation : i * dilation + stride * (ho - 1) + 1 : stride,
                j * dilation : j * dilation + stride * (wo - 1) + 1 : stride,
            ]
            out += patch @ k[i, j]
    return out


def resize_ref(x, out_h, out_w):
    """PyTorch's documented bilinear, align_corners=False: source ``(dst + 0.5) * in / out - 0.5``
    clamped below at 0, linear between the two neighbours (the upper clamped to the last)."""

    def taps(n_out, n_in):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, wy = taps(out_h, x.shape[1])
    x0, x1, wx = taps(out_w, x.shape[2])
    rows = x[:, y0] * (1 - wy)[None, :, None, None] + x[:, y1] * wy[None, :, None, None]
    return rows[:, :, x0] * (1 - wx)[None, None, :, None] + rows[:, :, x1] * wx[None, None, :, None]


def bn_ref(x, bn):
    """Eval-mode BatchNorm from its running statistics (eps 1e-5)."""
    g = lambda v: np.asarray(v[...], np.float64)
    return (x - g(bn.mean)) / np.sqrt(g(bn.var) + 1e-5) * g(bn.scale) + g(bn.bias)


def resnet_count(depth: int, num_classes: int = 1000) -> int:
    """ResNet-``depth``'s parameters (ImageNet stem, torchvision widths) from the paper's table."""
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    total = 7 * 7 * 3 * 64 + 2 * 64  # stem conv + BN
    c_in = 64
    for n, planes in zip(blocks, (64, 128, 256, 512), strict=True):
        for i in range(n):
            total += c_in * planes + 2 * planes  # 1x1 + BN
            total += 9 * planes * planes + 2 * planes  # 3x3 + BN
            total += planes * 4 * planes + 2 * 4 * planes  # 1x1 (expand) + BN
            if i == 0:  # every stage's first block changes the width: projection shortcut
                total += c_in * 4 * planes + 2 * 4 * planes
            c_in = 4 * planes
    return total + c_in * num_classes + num_classes


# --- ResNet-50/101 ----------------------------------------------------------------------------


@pytest.mark.parametrize("depth, published", [(50, 25_557_032), (101, 44_549_160)])
def test_bottleneck_resnet_parameter_counts_match_torchvision(depth, published):
    build = models.MODELS[f"resnet{depth}"]
    model = nnx.eval_shape(lambda: build(1000, small_input=False, rngs=nnx.Rngs(0)))
    assert resnet_count(depth) == published
    assert _count(model) == published
    assert model.channels == (256, 512, 1024, 2048)


@pytest.mark.parametrize(
    "output_stride, first, rest",
    # (dilation of each stage's first block, of its other blocks), torchvision's semantics.
    [
        (32, (1, 1, 1, 1), (1, 1, 1, 1)),
        (16, (1, 1, 1, 1), (1, 1, 1, 2)),
        (8, (1, 1, 1, 2), (1, 1, 2, 4)),
    ],
)
def test_output_stride_swaps_strides_for_dilation(output_stride, first, rest):
    bb = nnx.eval_shape(
        lambda: resnet.Backbone(depth=101, output_stride=output_stride, rngs=nnx.Rngs(0))
    )
    for s, stage in enumerate((bb.layer1, bb.layer2, bb.layer3, bb.layer4)):
        assert stage[0].conv2.dilation == first[s] and stage[0].conv1.dilation == 1
        assert all(b.conv2.dilation == rest[s] for b in stage[1:])
        # The stride sits on the 3x3 conv (v1.5) and goes where dilation replaced it: stage s
        # (from 0) halves the resolution iff it does not push the stride past the target.
        halves = s > 0 and 2 ** (s + 2) <= output_stride
        assert stage[0].conv2.stride == (2 if halves else 1) == stage[0].downsample.conv.stride
        assert stage[0].conv1.stride == 1


@pytest.mark.parametrize("stride, dilation, hw", [(1, 2, 9), (2, 1, 9), (2, 3, 10), (1, 4, 7)])
def test_conv_padding_stride_dilation_match_numpy(stride, dilation, hw):
    conv = resnet.Conv(3, 4, 3, stride=stride, dilation=dilation, rngs=nnx.Rngs(1))
    x = np.random.default_rng(0).normal(size=(2, hw, hw, 3)).astype(np.float32)
    ref = conv_ref(x, np.asarray(conv.kernel[...]), stride, dilation)
    np.testing.assert_allclose(np.asarray(conv(jnp.asarray(x))), ref, rtol=1e-4, atol=1e-4)


# --- DeepLab-v3 -------------------------------------------------------------------------------


def _deeplab_head_count(c4: int, a: int, k: int, head_conv: bool) -> int:
    """ASPP + [3x3 head conv] + classifier, from the paper: 5 branches of conv + BN(2a)."""
    aspp = (c4 * a + 2 * a) + 3 * (9 * c4 * a + 2 * a) + (c4 * a + 2 * a)
    aspp += 5 * a * a + 2 * a  # projection of the concatenation
    extra = 9 * a * a + 2 * a if head_conv else 0
    return aspp + extra + a * k + k


def test_deeplab_r101_parameter_count():
    model = nnx.eval_shape(lambda: models.MODELS["deeplabv3_r101"](21, rngs=nnx.Rngs(0)))
    backbone = resnet_count(101) - (2048 * 1000 + 1000)  # no fc
    assert _count(model) == backbone + _deeplab_head_count(2048, 256, 21, head_conv=False)
    assert _count(model.backbone) == backbone


@pytest.mark.parametrize("depth, published", [(50, 42_004_074), (101, 60_996_202)])
def test_torchvision_layout_matches_published_counts(depth, published):
    # torchvision's deeplabv3_resnet50/101 (21 classes) include the FCN auxiliary head:
    # 3x3 conv 1024 -> 256 (no bias) + BN + 1x1 conv 256 -> 21 with bias.
    aux = 9 * 1024 * 256 + 2 * 256 + 256 * 21 + 21
    build = functools.partial(deeplab.DeepLabV3, depth=depth, output_stride=8, head_conv=True)
    model = nnx.eval_shape(lambda: build(21, rngs=nnx.Rngs(0)))
    assert _count(model) == published - aux


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_small_deeplab_shapes_per_output_stride(output_stride):
    graphdef, params, stats = drawn(_small(output_stride=output_stride))
    forward = jax.jit(step_lib.make_forward(graphdef), static_argnums=3)
    out, _ = forward(params, stats, _images(), False)
    h = HW // output_stride
    assert out["logits"].shape == (2, HW, HW, 5) and out["logits"].dtype == jnp.float32
    assert out["features"].shape == (2, h, h, 64)
    assert out["penultimate"].shape == (2, h, h, 32)
    stage_hw = [HW // 4, HW // 8, HW // 16, HW // 32]
    if output_stride <= 16:
        stage_hw[3] = stage_hw[2]
    if output_stride == 8:
        stage_hw[2] = stage_hw[3] = stage_hw[1]
    expected = [(2, s, s, c) for s, c in zip(stage_hw, (8, 16, 32, 64), strict=True)]
    assert [p.shape for p in out["pod"]] == [*expected, (2, h, h, 32)]
    np.testing.assert_array_equal(np.asarray(out["pod"][-1]), np.asarray(out["penultimate"]))
    assert np.isfinite(np.asarray(out["logits"])).all()
    model = nnx.merge(graphdef, params, stats)
    assert [c.conv.dilation for c in model.aspp.convs] == [
        1,
        *deeplab.atrous_rates(output_stride),
    ]


def test_atrous_rates_follow_the_paper():
    assert deeplab.atrous_rates(16) == (6, 12, 18)
    assert deeplab.atrous_rates(8) == (12, 24, 36)


def test_logits_are_the_upsampled_head_of_penultimate():
    graphdef, params, stats = drawn(_small())
    forward = jax.jit(step_lib.make_forward(graphdef), static_argnums=3)
    out, _ = forward(params, stats, _images(hw=35), False)
    pen = np.asarray(out["penultimate"], np.float64)  # [B,3,3,A] at OS16, rounded up
    assert pen.shape[1:3] == (3, 3)
    k, b = (np.asarray(params["head"][n], np.float64) for n in ("kernel", "bias"))
    ref = resize_ref(pen @ k[0, 0] + b, 35, 35)
    np.testing.assert_allclose(np.asarray(out["logits"]), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size_in, size_out", [((2, 3), (32, 32)), ((5, 7), (9, 4))])
def test_resize_bilinear_matches_pytorch_formula(size_in, size_out):
    x = np.random.default_rng(1).normal(size=(2, *size_in, 3)).astype(np.float32)
    out = layers.resize_bilinear(jnp.asarray(x), size_out)
    np.testing.assert_allclose(np.asarray(out), resize_ref(x, *size_out), rtol=1e-5, atol=1e-5)


def test_aspp_matches_numpy_reference():
    abstract = nnx.eval_shape(
        lambda: deeplab.ASPP(4, 3, (1, 2, 3), norm="batch", rngs=nnx.Rngs(0), dtype=None)
    )
    graphdef, params, stats = drawn(lambda: abstract)
    aspp = nnx.merge(graphdef, params, stats)
    x = np.random.default_rng(2).normal(size=(2, 6, 5, 4))
    relu = lambda v: np.maximum(v, 0)
    assert [c.conv.dilation for c in aspp.convs] == [1, 1, 2, 3]
    branches = []
    for c in aspp.convs:  # the 1x1 conv, then the atrous 3x3s at rates 1, 2, 3
        y = conv_ref(x, np.asarray(c.conv.kernel[...]), 1, c.conv.dilation)
        branches.append(relu(bn_ref(y, c.bn)))
    pooled = x.mean(axis=(1, 2), keepdims=True) @ np.asarray(aspp.pool.conv.kernel[0, 0])
    branches.append(np.broadcast_to(relu(bn_ref(pooled, aspp.pool.bn)), branches[0].shape))
    cat = np.concatenate(branches, axis=-1)
    ref = relu(bn_ref(cat @ np.asarray(aspp.project.conv.kernel[0, 0]), aspp.project.bn))
    out = aspp(jnp.asarray(x, jnp.float32), train=False)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)


def test_bf16_computes_convs_in_bf16_and_returns_float32_logits():
    graphdef, params, stats = drawn(_small(dtype="bfloat16"))
    forward = step_lib.make_forward(graphdef)
    jaxpr = str(jax.make_jaxpr(lambda p, s, x: forward(p, s, x, True))(params, stats, _images()))
    assert "conv_general_dilated" in jaxpr and "bf16[2,16,16,8]" in jaxpr  # the stem, in bf16
    out, new_stats = jax.jit(forward, static_argnums=3)(params, stats, _images(), True)
    assert out["logits"].dtype == jnp.float32
    assert np.isfinite(np.asarray(out["logits"])).all()
    f32_graphdef, _, _ = drawn(_small())
    ref, _ = jax.jit(step_lib.make_forward(f32_graphdef), static_argnums=3)(
        params, stats, _images(), True
    )
    scale = np.abs(np.asarray(ref["logits"])).max()
    np.testing.assert_allclose(out["logits"], ref["logits"], atol=0.1 * scale)
    assert jax.tree.map(lambda a: a.dtype, new_stats) == jax.tree.map(lambda a: a.dtype, stats)


def test_dropout_needs_a_key_in_training_only():
    graphdef, params, stats = drawn(_small(dropout=0.5))

    @functools.partial(jax.jit, static_argnums=2)
    def penultimate(x, key, train):
        return nnx.merge(graphdef, params, stats)(x, train, dropout_key=key)["penultimate"]

    x = jnp.asarray(_images(), jnp.float32) / 127.5 - 1
    with pytest.raises(ValueError, match="dropout_key"):
        penultimate(x, None, True)
    kept = np.asarray(penultimate(x, None, False))  # eval: no key needed, nothing dropped
    dropped = np.asarray(penultimate(x, jax.random.key(0), True))
    # Train mode uses batch statistics, so compare the zero fractions: ReLU's plus about half.
    assert 0.3 < (dropped == 0).mean() < 0.85 and (dropped == 0).mean() > (kept == 0).mean()


def test_registry_names_build_with_documented_shapes():
    x = jax.ShapeDtypeStruct((1, HW, HW, 3), jnp.uint8)
    expect = {"deeplabv3_r101": (2048, 256), "deeplabv3_small": (64, 32)}  # (C4, A) at OS16
    for name, (c4, a) in expect.items():
        abstract = nnx.eval_shape(lambda name=name: models.MODELS[name](7, rngs=nnx.Rngs(0)))
        graphdef, params, stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
        out, _ = jax.eval_shape(
            functools.partial(step_lib.make_forward(graphdef), train=False),
            nnx.to_pure_dict(params),
            nnx.to_pure_dict(stats),
            x,
        )
        assert out["logits"].shape == (1, HW, HW, 7), name
        assert out["features"].shape == (1, 2, 2, c4), name
        assert out["penultimate"].shape == (1, 2, 2, a), name
        assert len(out["pod"]) == 5, name
    # The other names differ in the backbone only; "deeplabv3" defaults to MiB's ResNet-101.
    for name, blocks in (("deeplabv3", 23), ("deeplabv3_r50", 6), ("deeplabv3_r101", 23)):
        model = nnx.eval_shape(lambda name=name: models.MODELS[name](3, rngs=nnx.Rngs(0)))
        assert len(model.backbone.layer3) == blocks, name
        assert model.backbone.channels[-1] == 2048 and model.aspp.convs[1].conv.dilation == 6


def test_weights_roundtrip_and_imagenet_backbone(tmp_path):
    src = nnx.merge(*drawn(_small(), seed=1))
    x = jnp.asarray(_images(), jnp.float32) / 127.5 - 1
    src(x, train=True)  # non-trivial running statistics
    path = tmp_path / "w.npz"
    weights.save_model(path, src)
    with np.load(path) as npz:
        assert npz["params/head/kernel"].shape == (1, 1, 32, 5)
        assert npz["params/aspp/convs/3/conv/kernel"].shape == (3, 3, 64, 32)
        assert npz["batch_stats/backbone/layer4/0/downsample/bn/mean"].shape == (64,)
    dst = nnx.merge(*drawn(_small(), seed=2))
    weights.load_into(path, dst)
    np.testing.assert_array_equal(
        np.asarray(dst(x)["logits"]), np.asarray(src(x, train=False)["logits"])
    )
    # An ImageNet classifier's file goes under ``backbone`` (head skipped, the rest kept).
    _, cp, cs = drawn(
        lambda: resnet.ResNet(10, base_width=8, small_input=False, rngs=nnx.Rngs(0)), seed=3
    )
    weights.save(tmp_path / "clf.npz", cp, cs)
    _, params, stats = nnx.split(dst, nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
    new_p, new_s = weights.load(tmp_path / "clf.npz", params, stats, into="backbone")
    got = new_p["backbone"]["layer3"][1]["conv2"]["kernel"]
    np.testing.assert_array_equal(got, cp["layer3"][1]["conv2"]["kernel"])
    np.testing.assert_array_equal(new_s["backbone"]["stem"]["bn"]["var"], cs["stem"]["bn"]["var"])
    kept = params["aspp"]["project"]["conv"]["kernel"]
    np.testing.assert_array_equal(new_p["aspp"]["project"]["conv"]["kernel"], kept)


# --- Converter --------------------------------------------------------------------------------


def test_converter_maps_deeplab_names_and_rejects_unknown_ones():
    params, stats = convert_torchvision.convert(
        {
            "backbone.conv1.weight": np.zeros((64, 3, 7, 7)),
            "classifier.0.convs.4.1.weight": np.zeros((256, 2048, 1, 1)),
            "classifier.0.convs.2.1.running_var": np.ones(256),
            "classifier.4.weight": np.zeros((21, 256, 1, 1)),
            "aux_classifier.4.bias": np.zeros(21),  # dropped: no counterpart
        }
    )
    assert params["backbone"]["stem"]["conv"]["kernel"].shape == (7, 7, 3, 64)
    assert params["aspp"]["pool"]["conv"]["kernel"].shape == (1, 1, 2048, 256)
    assert stats["aspp"]["convs"][2]["bn"]["var"].shape == (256,)
    assert params["head"]["kernel"].shape == (1, 1, 256, 21)
    with pytest.raises(ValueError, match=r"'classifier\.3\.weight'"):
        convert_torchvision.convert({"classifier.3.weight": np.zeros((1, 1, 1, 1))})
    with pytest.raises(ValueError, match=r"'backbone\.fc\.weight'"):
        convert_torchvision.convert({"backbone.fc.weight": np.zeros((2, 2))})
    # A block with a Bottleneck's conv3 but a BasicBlock's norms is neither.
    names = [f"layer2.1.{m}.weight" for m in ("conv1", "bn1", "conv2", "bn2", "conv3")]
    partial_block = {n: np.zeros((4, 4, 1, 1) if "conv" in n else 4) for n in names}
    with pytest.raises(ValueError, match=r"block 'layer2\.1'.*'conv3'"):
        convert_torchvision.convert(partial_block)


def _randomise_bn(torch, model):
    with torch.no_grad():  # random BN statistics and affines, so eval mode is not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _load(params, stats, depth=None):
    model, _ = convert_torchvision.template(params, depth)
    graphdef, p_ref, s_ref = nnx.split(model, nnx.Param, nnx.BatchStat)
    arrays = {**weights.flatten(params, "params"), **weights.flatten(stats, "batch_stats")}
    new_p, new_s = weights.from_arrays(arrays, nnx.to_pure_dict(p_ref), nnx.to_pure_dict(s_ref))
    return graphdef, new_p, new_s


def test_converted_torchvision_deeplab_gives_torchvision_logits():
    torch = pytest.importorskip("torch")
    seg = pytest.importorskip("torchvision.models.segmentation")
    torch.manual_seed(0)
    tv = seg.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5, aux_loss=True)
    tv = _randomise_bn(torch, tv)
    x = np.random.default_rng(0).normal(size=(2, 3, 33, 33)).astype(np.float32)  # NCHW
    with torch.no_grad():
        ref = tv(torch.from_numpy(x))["out"].numpy().transpose(0, 2, 3, 1)
    params, stats = convert_torchvision.convert({k: v.numpy() for k, v in tv.state_dict().items()})
    assert convert_torchvision.infer_depth(params) == 50
    graphdef, params, stats = _load(params, stats)
    forward = jax.jit(step_lib.make_forward(graphdef), static_argnums=3)
    out, _ = forward(params, stats, jnp.asarray(x.transpose(0, 2, 3, 1)), False)
    logits = np.asarray(out["logits"])
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("depth", [50, 101])
def test_converted_torchvision_bottleneck_resnets_load(depth):
    torch = pytest.importorskip("torch")
    tv_models = pytest.importorskip("torchvision.models")
    seg = pytest.importorskip("torchvision.models.segmentation")
    torch.manual_seed(0)
    clf = getattr(tv_models, f"resnet{depth}")(num_classes=10)
    params, stats = convert_torchvision.convert({k: v.numpy() for k, v in clf.state_dict().items()})
    assert convert_torchvision.infer_depth(params) == depth
    _, p, _ = _load(params, stats)  # every key and shape checked against ResNet(depth)
    assert p["head"]["kernel"].shape == (4 * 512, 10)
    dl = getattr(seg, f"deeplabv3_resnet{depth}")(
        weights=None, weights_backbone=None, num_classes=4
    )
    params, stats = convert_torchvision.convert({k: v.numpy() for k, v in dl.state_dict().items()})
    assert convert_torchvision.infer_depth(params) == depth
    _, p, _ = _load(params, stats)
    assert p["head_conv"]["conv"]["kernel"].shape == (3, 3, 256, 256)
    assert sum(v.numel() for v in dl.parameters()) == sum(x.size for x in jax.tree.leaves(p))


def test_converted_torchvision_resnet50_gives_torchvision_logits():
    torch = pytest.importorskip("torch")
    tv_models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    tv = _randomise_bn(torch, tv_models.resnet50(num_classes=10))
    x = np.random.default_rng(0).normal(size=(2, 3, 33, 33)).astype(np.float32)
    with torch.no_grad():
        ref = tv(torch.from_numpy(x)).numpy()
    converted = convert_torchvision.convert({k: v.numpy() for k, v in tv.state_dict().items()})
    graphdef, params, stats = _load(*converted)
    out, _ = jax.jit(step_lib.make_forward(graphdef), static_argnums=3)(
        params, stats, jnp.asarray(x.transpose(0, 2, 3, 1)), False
    )
    np.testing.assert_allclose(out["logits"], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
