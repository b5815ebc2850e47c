"""ResNet-18/34: shapes, torchvision's parameter count, the weight file and the converter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from clseg_jax import models
from clseg_jax.models import resnet, weights
from experiments.baselines import convert_torchvision

TINY = (8, 16, 32, 64)


def _tiny(num_classes: int = 5, seed: int = 0, **kw) -> resnet.ResNet:
    # rbg keys: XLA:CPU compiles their initialisers much faster than threefry's (models.make).
    rngs = nnx.Rngs(jax.random.key(seed, impl="rbg"))
    return resnet.ResNet(num_classes, widths=TINY, rngs=rngs, **kw)


def _pure(model) -> tuple[dict, dict]:
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def _count(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _expected_count(depth: int, widths, num_classes: int, small_input: bool) -> int:
    """Parameters of the architecture, counted layer by layer from the paper's description."""
    conv = lambda k, cin, cout: k * k * cin * cout  # no conv has a bias
    bn = lambda c: 2 * c  # scale and bias
    total = conv(3 if small_input else 7, 3, widths[0]) + bn(widths[0])
    c_in = widths[0]
    for s, (n, w) in enumerate(zip(resnet.STAGES[depth], widths, strict=True)):
        for i in range(n):
            stride = 2 if (s > 0 and i == 0) else 1
            total += conv(3, c_in, w) + bn(w) + conv(3, w, w) + bn(w)
            if stride != 1 or c_in != w:
                total += conv(1, c_in, w) + bn(w)
            c_in = w
    return total + c_in * num_classes + num_classes


@pytest.mark.parametrize("depth", [18, 34])
def test_parameter_count_matches_torchvision(depth):
    # eval_shape: no initialiser runs, so the full-size model costs nothing.
    model = nnx.eval_shape(
        lambda: resnet.ResNet(1000, depth=depth, small_input=False, rngs=nnx.Rngs(0))
    )
    expected = _expected_count(depth, (64, 128, 256, 512), 1000, small_input=False)
    assert _count(model) == expected
    # torchvision's published counts.
    assert expected == {18: 11_689_512, 34: 21_797_672}[depth]


@pytest.mark.parametrize(
    "small_input, hw, feat_hw", [(True, 32, 4), (False, 32, 1), (False, 50, 2)]
)
def test_shapes(small_input, hw, feat_hw):
    model = _tiny(7, small_input=small_input)
    assert _count(model) == _expected_count(18, TINY, 7, small_input)
    out = model(jnp.zeros((2, hw, hw, 3)), train=False)
    assert out["logits"].shape == (2, 7) and out["logits"].dtype == jnp.float32
    assert out["features"].shape == (2, feat_hw, feat_hw, TINY[-1])
    assert out["penultimate"].shape == (2, TINY[-1])
    np.testing.assert_allclose(
        np.asarray(out["penultimate"]), np.asarray(out["features"].mean(axis=(1, 2))), atol=1e-6
    )


def test_train_mode_updates_batch_stats_and_eval_does_not():
    model = _tiny()
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3)) + 1.0
    model(x, train=False)
    assert float(jnp.abs(model.stem.bn.mean[...]).max()) == 0.0
    model(x, train=True)
    assert float(jnp.abs(model.stem.bn.mean[...]).max()) > 0.0


def test_jitted_gradient_through_the_imagenet_stem():
    # The max-pool must stay differentiable under jit (a traced init value breaks reduce_window's
    # autodiff); the step differentiates a pure forward over pure dicts, as here.
    graphdef, params, stats = nnx.split(_tiny(small_input=False), nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)

    def loss(params, stats, x):
        model = nnx.merge(graphdef, params, stats)
        out = model(x, train=True)
        return out["logits"].sum(), nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    (_, new_stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, stats, x)
    assert float(jnp.abs(grads["stem"]["conv"]["kernel"]).max()) > 0
    assert float(jnp.abs(new_stats["stem"]["bn"]["mean"]).max()) > 0


def test_registry_builds_resnet():
    cfg = ml_collections.ConfigDict({"name": "resnet18", "kwargs": {"widths": TINY}})
    model = models.make(cfg, num_classes=3, seed=0)
    assert isinstance(model, resnet.ResNet)
    assert model(jnp.zeros((1, 32, 32, 3)))["logits"].shape == (1, 3)
    resnet34 = nnx.eval_shape(lambda: models.MODELS["resnet34"](3, rngs=nnx.Rngs(0)))
    assert [len(s) for s in (resnet34.layer1, resnet34.layer2, resnet34.layer3)] == [3, 4, 6]


def test_weights_roundtrip(tmp_path):
    src = _tiny(seed=1)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    src(x, train=True)  # non-trivial running statistics
    path = tmp_path / "w.npz"
    weights.save_model(path, src)
    with np.load(path) as npz:
        assert "params/stem/conv/kernel" in npz.files
        assert npz["batch_stats/layer1/0/bn1/mean"].shape == (TINY[0],)
        assert npz["params/layer2/0/downsample/conv/kernel"].shape == (1, 1, TINY[0], TINY[1])
    dst = _tiny(seed=2)
    weights.load_into(path, dst)
    jax.tree.map(np.testing.assert_array_equal, _pure(dst), _pure(src))
    np.testing.assert_array_equal(
        np.asarray(dst(x, train=False)["logits"]), np.asarray(src(x, train=False)["logits"])
    )


def test_load_errors_name_the_first_bad_key(tmp_path):
    src = _tiny(5)
    params, stats = _pure(src)
    path = tmp_path / "w.npz"
    weights.save(path, params, stats)
    with np.load(path) as npz:
        arrays = dict(npz)

    def fails(arrays, model, match, **kw):
        with pytest.raises(ValueError, match=match) as info:
            weights.from_arrays(arrays, *_pure(model), **kw)
        assert "\n" not in str(info.value)

    missing = {k: v for k, v in arrays.items() if k != "batch_stats/layer3/1/bn2/var"}
    fails(missing, src, r"missing key 'batch_stats/layer3/1/bn2/var'")
    fails({**arrays, "params/extra/kernel": np.zeros(1)}, src, r"unexpected key 'params/extra/")
    bad = {**arrays, "params/layer1/0/conv1/kernel": np.zeros((3, 3, 8, 9))}
    fails(bad, src, r"'params/layer1/0/conv1/kernel' has shape \(3, 3, 8, 9\), model expects")
    # A different class count: the head is named, with the way out.
    fails(arrays, _tiny(9), r"'params/head/bias' has shape \(5,\).*skip_head=True")
    # A different depth: ResNet-34's extra blocks are missing.
    fails(arrays, _tiny(5, depth=34), r"missing key 'params/layer1/2/")


def test_load_backbone_under_a_new_head(tmp_path):
    src, dst = _tiny(5, seed=1), _tiny(9, seed=2)
    path = tmp_path / "w.npz"
    weights.save_model(path, src)
    head_before = np.asarray(dst.head.kernel[...])
    weights.load_into(path, dst, skip_head=True)
    np.testing.assert_array_equal(np.asarray(dst.head.kernel[...]), head_before)
    np.testing.assert_array_equal(
        np.asarray(dst.layer4[1].conv2.kernel[...]), src.layer4[1].conv2.kernel[...]
    )
    x = jnp.ones((1, 32, 32, 3))
    np.testing.assert_array_equal(
        np.asarray(dst(x)["penultimate"]), np.asarray(src(x)["penultimate"])
    )


def test_converter_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"'layer1\.0\.conv9\.weight'"):
        convert_torchvision.convert({"layer1.0.conv9.weight": np.zeros((4, 4, 1, 1))})


@pytest.mark.parametrize("depth, hw", [(18, 50), (34, 33)])
def test_converted_torchvision_gives_torchvision_logits(tmp_path, depth, hw):
    torch = pytest.importorskip("torch")
    tv_models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    tv = getattr(tv_models, f"resnet{depth}")(num_classes=10)
    with torch.no_grad():  # random BN statistics and affines, so eval mode is not the identity
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    tv.eval()
    assert sum(p.numel() for p in tv.parameters()) == _expected_count(
        depth, (64, 128, 256, 512), 10, small_input=False
    )
    # An odd or non-multiple-of-32 size exercises the strided convs' and max-pool's padding.
    x = np.random.default_rng(0).normal(size=(2, 3, hw, hw)).astype(np.float32)  # NCHW
    with torch.no_grad():
        ref = tv(torch.from_numpy(x)).numpy()

    params, stats = convert_torchvision.convert({k: v.numpy() for k, v in tv.state_dict().items()})
    assert convert_torchvision.infer_depth(params) == depth
    path = tmp_path / "tv.npz"
    weights.save(path, params, stats)
    model = nnx.eval_shape(
        lambda: resnet.ResNet(10, depth=depth, small_input=False, rngs=nnx.Rngs(0))
    )
    graphdef, p_ref, s_ref = nnx.split(model, nnx.Param, nnx.BatchStat)
    new_params, new_stats = weights.load(path, nnx.to_pure_dict(p_ref), nnx.to_pure_dict(s_ref))
    nnx.replace_by_pure_dict(p_ref, new_params)
    nnx.replace_by_pure_dict(s_ref, new_stats)
    model = nnx.merge(graphdef, p_ref, s_ref)
    logits = np.asarray(model(jnp.asarray(x.transpose(0, 2, 3, 1)), train=False)["logits"])
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
