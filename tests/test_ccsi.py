"""CCSI: the cosine head, Continual Normalization, imprinting and every loss against numpy
references written from the papers' equations (float64, loops where the paper sums), the
strategy's wiring (IdC pseudo-labels from the experience's training rows, before-phase
imprinting, means and weights), and a contract-style drive over three phases of the digits stream
(one compile, fixed state, no real image in the state).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from clseg_jax import data, setup, tasks
from clseg_jax.data import phases as phases_lib
from clseg_jax.memory import buffer
from clseg_jax.models import cosine, layers, resnet
from clseg_jax.strategies import base, ccsi, snapshot
from configs import split_digits
from tests import tiny

RNG = np.random.default_rng(0)


def _cfg(**kw) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(dict(ccsi.DEFAULTS))
    c.update(kw)
    return c


# -- numpy references ----------------------------------------------------------------------------


def np_cos(f, w):
    """cos(f_i, column k of w) for f [N,C], w [C,K]."""
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    wn = w / np.linalg.norm(w, axis=0, keepdims=True)
    return fn @ wn


def np_weighted_ce(logits, labels, weights):
    num, den = 0.0, 0.0
    for z, y in zip(logits, labels, strict=True):
        if y == 255:
            continue
        z = z - z.max()
        nll = -(z[y] - np.log(np.exp(z).sum()))
        num += weights[y] * nll
        den += weights[y]
    return num / den


def np_margin(cos, labels, old, new, m, k):
    terms = []
    new_ids = np.flatnonzero(new)
    for row, y in zip(cos, labels, strict=True):
        if y == 255 or not old[y]:
            continue
        top = np.sort(row[new_ids])[::-1][:k]
        terms += [max(0.0, m - row[y] + t) for t in top]
    return float(np.mean(terms)) if terms else 0.0


def np_idc(src, src_y, tgt, tgt_y, classes, temp, rho=1.0, prev_s=None, prev_t=None):
    """The paper's/code's centroid contrastive loss, one class at a time."""
    d = src.shape[1]

    def centroid(rows, ys, c):
        sel = [r for r, y in zip(rows, ys, strict=True) if y == c]
        return np.mean(sel, axis=0) if sel else np.zeros(d)

    def unit(v):
        return v / (np.linalg.norm(v) + 1e-10)

    s = {c: unit((1 - rho) * (0 if prev_s is None else prev_s[c]) + rho * centroid(src, src_y, c))
         for c in classes}  # fmt: skip
    t = {c: unit((1 - rho) * (0 if prev_t is None else prev_t[c]) + rho * centroid(tgt, tgt_y, c))
         for c in classes}  # fmt: skip
    diag = sum(math.exp(t[c] @ s[c] / temp) for c in classes)
    total = sum(math.exp(t[a] @ s[b] / temp) for a in classes for b in classes)
    return -math.log(diag) + math.log(total)


def np_imprint(kernel, feats, labels, new, old):
    out = kernel.astype(np.float64).copy()
    old_norm = np.mean([np.linalg.norm(kernel[:, c]) for c in np.flatnonzero(old)])
    for c in np.flatnonzero(new):
        fs = [f / np.linalg.norm(f) for f, y in zip(feats, labels, strict=True) if y == c]
        mean = np.mean(fs, axis=0)
        out[:, c] = mean / np.linalg.norm(mean) * old_norm
    return out


# -- cosine head, CN layer -----------------------------------------------------------------------


def test_cosine_linear_matches_numpy_and_code_init():
    head = cosine.CosineLinear(6, 5, rngs=nnx.Rngs(0))
    kernel = np.asarray(head.kernel[...])
    assert float(head.sigma[...]) == 1.0  # the code's sigma.data.fill_(1)
    assert np.abs(kernel).max() <= 1 / math.sqrt(6)  # uniform(+-1/sqrt(in_features))
    head.sigma[...] = jnp.asarray(3.5)
    x = RNG.normal(size=(4, 6)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(head(jnp.asarray(x))), 3.5 * np_cos(x, kernel), rtol=1e-5, atol=1e-6
    )
    # A zero feature (a dead ReLU pool) has a finite gradient.
    g = jax.grad(lambda f: cosine.cosine_scores(f, head.kernel[...]).sum())(jnp.zeros((2, 6)))
    assert np.isfinite(np.asarray(g)).all()


def test_resnet_cosine_head_logits_are_scaled_cosines():
    model = resnet.ResNet(4, rngs=nnx.Rngs(0), widths=(4, 4, 8, 8), head="cosine", norm="continual")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert set(params["head"]) == {"kernel", "sigma"}
    model.head.sigma[...] = jnp.asarray(2.0)
    out = model(jnp.asarray(RNG.uniform(-1, 1, (3, 16, 16, 3)), jnp.float32))  # 2x2 at the end
    pen = np.asarray(out["penultimate"], np.float64)
    ref = 2.0 * np_cos(pen, np.asarray(model.head.kernel[...], np.float64))
    np.testing.assert_allclose(np.asarray(out["logits"]), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown ResNet head"):
        resnet.ResNet(4, rngs=nnx.Rngs(0), widths=(4, 4, 8, 8), head="arc")


def test_continual_norm_is_group_norm_then_batch_norm():
    """GN without affine (per sample, per group of channels), then BN: batch statistics and a
    running-average update (Flax momentum 0.9, biased variance) in train mode, the running ones in
    eval mode, the BN affine transform in both."""
    b, h, w, c, g, eps = 3, 4, 4, 8, 4, 1e-5
    cn = layers.ContinualNorm(c, groups=g, rngs=nnx.Rngs(0))
    scale, bias = RNG.normal(size=c), RNG.normal(size=c)
    cn.bn.scale[...] = jnp.asarray(scale, jnp.float32)
    cn.bn.bias[...] = jnp.asarray(bias, jnp.float32)
    x = RNG.normal(2.0, 3.0, size=(b, h, w, c))

    def gn(x):
        xr = x.reshape(b, h, w, g, c // g)
        mu = xr.mean(axis=(1, 2, 4), keepdims=True)
        var = xr.var(axis=(1, 2, 4), keepdims=True)
        return ((xr - mu) / np.sqrt(var + eps)).reshape(x.shape)

    y = gn(x)
    mu, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
    want = (y - mu) / np.sqrt(var + eps) * scale + bias
    got = cn(jnp.asarray(x, jnp.float32), train=True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=1e-3)
    run_mean, run_var = 0.1 * mu, 0.9 + 0.1 * var  # from mean 0, var 1
    np.testing.assert_allclose(np.asarray(cn.bn.mean[...]), run_mean, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cn.bn.var[...]), run_var, rtol=1e-4)
    x2 = RNG.normal(size=(b, h, w, c))
    want = (gn(x2) - run_mean) / np.sqrt(run_var + eps) * scale + bias
    got = cn(jnp.asarray(x2, jnp.float32), train=False)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(np.asarray(cn.bn.mean[...]), run_mean, atol=1e-5)  # unchanged


# -- losses and imprinting vs numpy --------------------------------------------------------------


def test_cn_cross_entropy_matches_numpy():
    k = 5
    f, w = RNG.normal(size=(6, 4)), RNG.normal(size=(4, k))
    labels = np.array([0, 2, 255, 1, 2, 0])
    mask = np.array([True, True, True, False, False])
    weights = np.array([1.0, 3.0, 0.5, 7.0, 2.0])
    cos = np_cos(f, w)
    got = ccsi.cn_cross_entropy(
        jnp.asarray(cos, jnp.float32),
        jnp.asarray(4.0),
        jnp.asarray(labels),
        jnp.asarray(mask),
        jnp.asarray(weights, jnp.float32),
    )
    logits = np.where(mask, 4.0 * cos, -1e9)
    np.testing.assert_allclose(float(got), np_weighted_ce(logits, labels, weights), rtol=1e-5)


def test_class_weights_are_inverse_frequency_over_max():
    got = ccsi.class_weights_from_counts(np.array([10, 40, 0, 20]))
    np.testing.assert_allclose(got, [4.0, 1.0, 1.0, 2.0])


def test_feature_distillation_and_adaptive_weight():
    f, g = RNG.normal(size=(5, 6)), RNG.normal(size=(5, 6))
    ok = np.array([True, False, True, True, True])
    ref = np.mean([1 - np_cos(f[i : i + 1], g[i][:, None])[0, 0] for i in np.flatnonzero(ok)])
    got = ccsi.feature_distillation(jnp.asarray(f), jnp.asarray(g), jnp.asarray(ok))
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)
    assert ccsi.adaptive_weight(5.0, 6, 2) == pytest.approx(5.0 * math.sqrt(3.0))
    assert ccsi.adaptive_weight(5.0, 4, 0) == 5.0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_margin_ranking_loss_matches_numpy(k):
    cos = RNG.uniform(-1, 1, size=(7, 6))
    labels = np.array([0, 1, 4, 255, 2, 5, 1])
    old = np.array([True, True, True, False, False, False])
    new = np.array([False, False, False, True, True, False])  # 2 new classes: k=3 uses 2
    got = ccsi.margin_ranking_loss(
        jnp.asarray(cos), jnp.asarray(labels), jnp.asarray(old), jnp.asarray(new), 0.3, k
    )
    np.testing.assert_allclose(float(got), np_margin(cos, labels, old, new, 0.3, k), rtol=1e-5)
    none = ccsi.margin_ranking_loss(
        jnp.asarray(cos), jnp.asarray(labels), jnp.asarray(old), jnp.zeros(6, bool), 0.3, k
    )
    assert float(none) == 0.0


@pytest.mark.parametrize("with_prev", [False, True])
def test_idc_loss_matches_numpy(with_prev):
    k, d = 5, 5
    src, tgt = RNG.normal(size=(9, d)), RNG.normal(size=(7, d))
    src_y = np.array([0, 1, 1, 2, 0, 3, 255, 2, 1])
    tgt_y = np.array([1, 1, 0, 3, 3, 2, 1])
    src_ok, tgt_ok = src_y != 255, np.array([1, 1, 1, 1, 0, 1, 1], bool)
    mask = np.array([True, True, True, True, False])  # class 4 unseen; class 3 has no source row
    src_ok &= src_y != 3
    prev_s = RNG.normal(size=(k, d)) if with_prev else None
    prev_t = RNG.normal(size=(k, d)) if with_prev else None
    rho = 0.9
    loss, s, _ = ccsi.idc_loss(
        jnp.asarray(src),
        jnp.asarray(src_y),
        jnp.asarray(src_ok),
        jnp.asarray(tgt),
        jnp.asarray(tgt_y),
        jnp.asarray(tgt_ok),
        jnp.asarray(mask),
        2.0,
        rho,
        None if prev_s is None else jnp.asarray(prev_s),
        None if prev_t is None else jnp.asarray(prev_t),
    )
    ref = np_idc(
        src[src_ok], src_y[src_ok], tgt[tgt_ok], tgt_y[tgt_ok], [0, 1, 2, 3], 2.0, rho, prev_s,
        prev_t,
    )  # fmt: skip
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    want_s0 = (0 if prev_s is None else 0.1 * prev_s[0]) + rho * src[src_ok & (src_y == 0)].mean(0)
    np.testing.assert_allclose(np.asarray(s[0]), want_s0, rtol=1e-5)


def test_imprint_matches_numpy():
    c, k = 6, 5
    kernel = RNG.normal(size=(c, k))
    feats = RNG.normal(size=(10, c))
    labels = np.array([3, 4, 3, 3, 4, 1, 4, 3, 4, 4])  # a row of an old class is ignored
    new, old = np.array([0, 0, 0, 1, 1], bool), np.array([1, 1, 1, 0, 0], bool)
    got = ccsi.imprint(kernel, feats, labels, new, old)
    np.testing.assert_allclose(got, np_imprint(kernel, feats, labels, new, old), rtol=1e-6)
    np.testing.assert_array_equal(got[:, :3], kernel[:, :3])


# -- the strategy's wiring on a stand-in model ---------------------------------------------------

K, S = 4, 2  # classes, image side


def _forward(params, batch_stats, images, train):
    """Features = per-channel mean pixel (in [-1, 1]) times a projection; a cosine head."""
    del train
    x = images.astype(jnp.float32)
    x = x / 127.5 - 1.0 if images.dtype == jnp.uint8 else x
    feats = jnp.mean(x, axis=(1, 2)) @ params["proj"]
    logits = params["head"]["sigma"] * cosine.cosine_scores(feats, params["head"]["kernel"])
    return {"logits": logits, "penultimate": feats, "features": x}, batch_stats


def _params(seed):
    r = np.random.default_rng(seed)
    return {
        "proj": jnp.asarray(r.normal(size=(3, 3)), jnp.float32),
        "head": {"kernel": jnp.asarray(r.normal(size=(3, K)), jnp.float32), "sigma": 3.0},
    }


def _env():
    return base.Env(
        _forward, K, 3, image_shape=(S, S, 3), label_shape=(), task=tasks.CLASSIFICATION
    )


def _writable(memory: buffer.Buffer) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in buffer.to_host(memory).items()}


def _phase(index, new, seen, images, labels):
    mask = np.zeros(K, bool)
    mask[list(seen)] = True

    def batches(size):
        for i in range(0, len(images), size):
            yield {"image": images[i : i + size], "label": labels[i : i + size]}

    return base.Phase(index, (index,), tuple(new), tuple(seen), mask, batches)


def test_before_phase_imprints_and_sets_means_weights_and_lambda():
    env = _env()
    strategy = ccsi.make(_cfg(ccsi_mem_size=6), env, synthesize=ccsi.noise_synthesize)
    params = _params(0)
    st = strategy.init(params, {})
    mem = _writable(st.memory)
    mem["label"][:5], mem["valid"][:5] = [0, 0, 1, 1, 1], True  # 2 + 3 synthetic old rows
    st = st._replace(memory=buffer.from_host(mem))
    images = RNG.integers(0, 256, (9, S, S, 3), dtype=np.uint8)
    labels = np.array([2, 3, 2, 2, 3, 3, 2, 3, 2], np.uint8)
    new_params, st = strategy.before_phase(
        params, {}, st, _phase(1, (2, 3), (0, 1, 2, 3), images, labels)
    )
    x = images.astype(np.float64) / 127.5 - 1.0
    feats = x.mean(axis=(1, 2)) @ np.asarray(params["proj"], np.float64)
    new, old = np.array([0, 0, 1, 1], bool), np.array([1, 1, 0, 0], bool)
    want = np_imprint(np.asarray(params["head"]["kernel"]), feats, labels, new, old)
    np.testing.assert_allclose(np.asarray(new_params["head"]["kernel"]), want, rtol=1e-4)
    for c in (2, 3):
        np.testing.assert_allclose(np.asarray(st.means[c]), x[labels == c].mean(0), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(st.has_mean), [0, 0, 1, 1])
    np.testing.assert_allclose(np.asarray(st.class_weights), [5 / 2, 5 / 3, 1.0, 5 / 4])
    assert float(st.kd_weight) == pytest.approx(5.0)  # 5 * sqrt(2 / 2)
    np.testing.assert_array_equal(np.asarray(st.old), old)
    np.testing.assert_array_equal(np.asarray(st.new), new)


def test_loss_terms_and_idc_pseudo_labels_from_training_rows():
    """Every term of the replaced loss against numpy on a replay-extended batch; the IdC target
    is the experience's real rows with the model's argmax as labels (not the synthetic rows)."""
    env = _env()
    strategy = ccsi.make(
        _cfg(ccsi_mem_size=8, ccsi_replay_batch=4, ccsi_idc_temperature=0.5),
        env,
        synthesize=ccsi.noise_synthesize,
    )
    params, old_params = _params(1), _params(2)
    st = strategy.init(params, {})
    mem = _writable(st.memory)
    mem["image"][:6] = RNG.integers(0, 256, (6, S, S, 3), dtype=np.uint8)
    mem["label"][:6], mem["valid"][:6] = [0, 1, 0, 1, 1, 0], True
    old, new = np.array([1, 1, 0, 0], bool), np.array([0, 0, 1, 1], bool)
    weights = np.array([2.0, 1.5, 1.0, 1.2], np.float32)
    st = st._replace(
        memory=buffer.from_host(mem),
        snap=snapshot.take(old_params, {}, old),
        old=jnp.asarray(old),
        new=jnp.asarray(new),
        class_weights=jnp.asarray(weights),
        kd_weight=jnp.asarray(7.0),
    )
    batch = {
        "image": jnp.asarray(RNG.integers(0, 256, (5, S, S, 3), dtype=np.uint8)),
        "label": jnp.asarray([2, 3, 3, 2, 255], jnp.uint8),
    }
    prepared = strategy.prepare_batch(batch, st, jax.random.PRNGKey(3))
    assert prepared["image"].shape[0] == 9
    np.testing.assert_array_equal(np.asarray(prepared["synthetic"]), [0] * 5 + [1] * 4)
    seen = jnp.ones(K, bool)
    out, _ = _forward(params, {}, prepared["image"], True)
    inputs = base.LossInputs(params, {}, prepared, out, jnp.asarray(0.0), seen)
    total, m = strategy.loss(inputs, st, jax.random.PRNGKey(0))

    labels = np.asarray(prepared["label"]).astype(int)
    ok = labels != 255
    feats = np.asarray(out["penultimate"], np.float64)
    old_feats = np.asarray(_forward(old_params, {}, prepared["image"], False)[0]["penultimate"])
    cos = np_cos(feats, np.asarray(params["head"]["kernel"], np.float64))
    ce = np_weighted_ce(3.0 * cos, labels, weights)
    kd = 7.0 * np.mean([1 - np_cos(feats[i : i + 1], old_feats[i][:, None])[0, 0]
                        for i in np.flatnonzero(ok)])  # fmt: skip
    mr = np_margin(cos, labels, old, new, 0.3, 1)
    real = np.arange(9) < 5
    tgt = real & ok
    pseudo = cos.argmax(1)  # sigma > 0: the logits' argmax
    idc = np_idc(cos[ok], labels[ok], cos[tgt], pseudo[tgt], range(K), 0.5)
    np.testing.assert_allclose(float(m["ccsi_ce"]), ce, rtol=1e-4)
    np.testing.assert_allclose(float(m["ccsi_kd"]), kd, rtol=1e-4)
    np.testing.assert_allclose(float(m["ccsi_mr"]), mr, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(m["ccsi_idc"]), idc, rtol=1e-4)
    np.testing.assert_allclose(float(total), ce + kd + mr + idc, rtol=1e-4)
    # The two wrong targets would give other values: the test can tell them apart.
    synth = np_idc(cos[ok], labels[ok], cos[ok & ~real], pseudo[ok & ~real], range(K), 0.5)
    truth = np_idc(cos[ok], labels[ok], cos[tgt], labels[tgt], range(K), 0.5)
    assert abs(synth - idc) > 1e-3 and abs(truth - idc) > 1e-3

    # Old classes' weights get no gradient.
    grads = {"proj": jnp.ones((3, 3)), "head": {"kernel": jnp.ones((3, K)), "sigma": 1.0}}
    g = strategy.transform_grads(grads, inputs, st, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(g["head"]["kernel"]), np.tile([0, 0, 1, 1], (3, 1)))


def test_make_rejects_a_missing_synthesizer_and_other_tasks():
    # No synthesizer given and no graphdef to build the class impressions from.
    with pytest.raises(ValueError, match="class impressions need the model's graphdef"):
        ccsi.make(_cfg(), _env())
    cfg = _cfg()
    cfg.ccsi_synthesize = "noise"
    with pytest.raises(ValueError, match="ccsi_synthesize must be"):
        ccsi.make(cfg, _env())
    seg = base.Env(_forward, K, 3, image_shape=(S, S, 3), label_shape=(S, S))
    with pytest.raises(ValueError, match="classification"):
        ccsi.make(_cfg(), seg, synthesize=ccsi.noise_synthesize)


# -- three phases of the digits stream -----------------------------------------------------------


def _real_rows_in(tree, images: np.ndarray) -> list[str]:
    """Paths of state arrays holding one of ``images`` (uint8 as is, float in [-1, 1])."""
    flat = images.reshape(len(images), -1)
    as_float = flat.astype(np.float32) / 127.5 - 1.0
    hits = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        a = np.asarray(leaf)
        if a.ndim < 3 or a.shape[-3:] != images.shape[1:]:
            continue
        rows = a.reshape(-1, flat.shape[1])
        ref = flat if a.dtype == np.uint8 else as_float
        for r in rows:
            if np.any(np.all(np.isclose(ref, r, atol=1e-6), axis=1)):
                hits.append(jax.tree_util.keystr(path))
                break
    return hits


def test_three_phases_compile_once_and_keep_no_real_image(tmp_path):
    cfg = split_digits.get_config()
    cfg.data.classes_per_step = (4, 3, 3)
    cfg.data.train_per_exp = 16
    cfg.data.test_per_exp = 8
    cfg.model.kwargs = {
        "small_input": True,
        "widths": (4, 4, 8, 8),
        "head": "cosine",
        "norm": "continual",
    }
    cfg.batch_size, cfg.epochs = 8, 1
    stream = data.make(cfg.data)
    strategy_cfg = _cfg(ccsi_mem_size=24)
    parts = setup.build(
        cfg,
        lambda env: ccsi.make(strategy_cfg, env, synthesize=ccsi.noise_synthesize),
        stream=stream,
    )
    sig = tiny.signature(parts.arrays["sstate"])
    kernels, seen_images = {}, []
    last_kernel = [np.asarray(parts.arrays["state"].params["head"]["kernel"])]

    def on_begin(phase, state, sstate):
        # Copies: the step donates the parameters.
        kernels[phase.index] = (last_kernel[0], np.asarray(state.params["head"]["kernel"]))

    def on_end(phase, state, sstate):
        last_kernel[0] = np.asarray(state.params["head"]["kernel"])
        assert tiny.signature(sstate) == sig
        kernel_before, kernel_after = kernels[phase.index]
        new_cols = list(phase.new_classes)
        moved = np.abs(kernel_after[:, new_cols] - kernel_before[:, new_cols])
        assert (moved.max() > 0) == (phase.index > 0)  # imprinted from the second phase on
        seen_images.extend(np.asarray(b["image"]) for b in phase.batches(64))
        if phase.index < 2:  # synthesised after every phase but the last
            mem = buffer.to_host(sstate.memory)
            assert mem["valid"].sum() == 24
            assert set(mem["label"][mem["valid"]]) == set(phase.seen_classes)

    driven = tiny.drive(
        parts,
        phases_lib.make(stream, ((0,), (1,), (2,))),
        evaluate=False,
        on_begin=on_begin,
        on_end=on_end,
    )
    sstate = driven.sstate
    assert all(np.isfinite(m["loss"]) for m in driven.metrics)
    assert driven.first_bad_step == [-1, -1, -1]
    assert driven.compiles[0] > 0 and driven.compiles[1:] == [0, 0], driven.compiles

    images = np.concatenate(seen_images)
    assert np.asarray(sstate.has_mean).sum() == stream.num_classes
    assert _real_rows_in(sstate, images) == []
    # The check can fail: a state holding one training image (in either form) is caught.
    planted = sstate._replace(means=sstate.means.at[0].set(images[5] / 127.5 - 1.0))
    assert _real_rows_in(planted, images) == [".means"]
    mem = _writable(sstate.memory)
    mem["image"][3] = images[7]
    assert _real_rows_in(sstate._replace(memory=buffer.from_host(mem)), images) == [".memory.image"]
