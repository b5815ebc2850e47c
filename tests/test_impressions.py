"""Class impressions (``clseg_jax.synthesis.impressions``): class means vs numpy, streaming sums,
the mean-plus-noise start, CCSI's defaults, and a synthesis from class means through a teacher
with Continual Normalization whose moment regulariser reads the CN layers' batch-norm part."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from clseg_jax.synthesis import deepinversion as di
from clseg_jax.synthesis import impressions
from tests.test_deepinversion import tiny_teacher


def _batch(n=30, size=4, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = rng.choice([0, 1, 2, 255], n).astype(np.int32)  # class 3 absent, 255 padding
    labels[:3] = [0, 1, 2]
    return images, labels


def test_class_means_match_numpy():
    images, labels = _batch()
    got = np.asarray(impressions.class_means(jnp.asarray(images), jnp.asarray(labels), 4))
    x = images.astype(np.float64) / 127.5 - 1.0  # the forward's uint8 mapping
    for c in range(3):
        np.testing.assert_allclose(got[c], x[labels == c].mean(axis=0), atol=1e-5)
    np.testing.assert_array_equal(got[3], 0.0)
    # Float images are taken as they are (already in the input space).
    floats = np.random.default_rng(1).normal(size=images.shape).astype(np.float32)
    got_f = np.asarray(impressions.class_means(floats, labels, 4))
    np.testing.assert_allclose(got_f[1], floats[labels == 1].mean(axis=0), atol=1e-5)


def test_class_sums_accumulate_over_batches():
    images, labels = _batch()
    sums, counts = impressions.class_sums(images, labels, 4)
    s1, c1 = impressions.class_sums(images[:13], labels[:13], 4)
    s2, c2 = impressions.class_sums(images[13:], labels[13:], 4)
    np.testing.assert_allclose(s1 + s2, sums, atol=1e-4)
    np.testing.assert_array_equal(c1 + c2, counts)
    np.testing.assert_array_equal(counts, [np.sum(labels == c) for c in range(4)])


def test_impression_init_is_the_class_mean_plus_gaussian_noise():
    means = jax.random.uniform(jax.random.key(0), (3, 8, 8, 3), minval=-1, maxval=1)
    targets = jnp.arange(600) % 3
    exact = impressions.impression_init(means, targets, jax.random.key(1), 0.0)
    np.testing.assert_array_equal(exact, np.asarray(means)[np.asarray(targets)])
    start = impressions.impression_init(means, targets, jax.random.key(1), 0.2)
    noise = np.asarray(start - exact)
    assert abs(noise.mean()) < 0.005 and abs(noise.std() - 0.2) < 0.005
    np.testing.assert_array_equal(
        start, impressions.impression_init(means, targets, jax.random.key(1), 0.2)
    )
    assert not np.allclose(start, impressions.impression_init(means, targets, jax.random.key(2)))


def test_ccsi_config_defaults_and_overrides():
    cfg = impressions.ccsi_config()
    assert (cfg.iterations, cfg.lr, cfg.betas, cfg.cosine_factor) == (5000, 0.1, (0.5, 0.9), 0.2)
    assert (cfg.bn_scale, cfg.first_bn_multiplier, cfg.tv_l2, cfg.l2) == (1.0, 10.0, 0.01, 0.1)
    assert (cfg.jitter, cfg.flip, cfg.clip) == (30, True, (-1.0, 1.0))
    assert impressions.ccsi_config(iterations=7).iterations == 7


def test_impressions_from_class_means_through_a_continual_norm_teacher():
    # 64 channels in 32 groups: two channels per group, so the batch-norm part's input moments
    # vary with the images (with one channel per group they would be 0 and 1 by construction).
    graphdef, params, stats = tiny_teacher(5, k=3, norm="continual", widths=(64, 64))
    teacher = di.make_teacher_fn(graphdef)
    means = impressions.class_means(*_batch(n=60, size=8, seed=3)[:2], 3)
    targets = jnp.arange(12) % 3
    x = impressions.impression_init(means, targets, jax.random.key(0))
    _, moments = teacher(params, stats, x)
    # One moment tuple per CN layer, the running statistics of its batch-norm part.
    assert len(moments) == 2
    assert sorted(np.asarray(m[3]).tolist() for m in moments) == sorted(
        np.asarray(stats[name]["bn"]["var"]).tolist() for name in ("stem_norm", "body_norm")
    )
    cfg = impressions.ccsi_config(iterations=30, warmup_iterations=3, jitter=2)
    images, info = impressions.synthesize(
        teacher, (params, stats), means, targets, jax.random.key(1), cfg
    )
    assert images.shape == (12, 8, 8, 3)
    assert float(jnp.min(images)) >= -1.0 and float(jnp.max(images)) <= 1.0
    main, bn = np.asarray(info["main"]), np.asarray(info["bn"])
    assert np.all(np.isfinite(main)) and np.all(np.isfinite(bn))
    # CCSI's weights let the statistics term dominate (bn_scale 1 against a random teacher's
    # running statistics): both fall, the CE by less than with DeepInversion's weights.
    assert main[-3:].mean() < 0.9 * main[:3].mean()
    assert bn[-3:].mean() < 0.95 * bn[:3].mean()
    assert float(info["final_main"]) < 0.9 * main[0]


def test_synthesizer_follows_the_ccsi_strategy_contract():
    graphdef, params, stats = tiny_teacher(6, k=3)
    means = jnp.asarray([-0.5, 0.0, 0.5])[:, None, None, None] * jnp.ones((3, 8, 8, 3))
    fn = impressions.make_synthesizer(
        graphdef, impressions.ccsi_config(iterations=5, warmup_iterations=2), batch_size=4
    )
    classes = np.array([0, 2], np.int32)
    images, labels = fn(params, stats, classes, jax.random.key(0), means=means, n=10)
    # Two independent batches of 4 (10 // 4), labels cycling over the classes.
    assert images.shape == (8, 8, 8, 3) and images.dtype == jnp.float32
    np.testing.assert_array_equal(labels, [0, 2, 0, 2, 0, 2, 0, 2])
    assert float(jnp.min(images)) >= -1.0 and float(jnp.max(images)) <= 1.0
    # Five steps from mean + noise: each image still sits near its own class's mean.
    shade = np.asarray(images).mean(axis=(1, 2, 3))
    assert np.all(shade[labels == 0] < -0.25) and np.all(shade[labels == 2] > 0.25)
    again, _ = fn(params, stats, classes, jax.random.key(0), means=means, n=10)
    np.testing.assert_array_equal(images, again)
