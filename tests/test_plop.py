"""PLOP against numpy implementations written from the paper's equations and the official code's
conventions: the Local POD embedding and distance (strip scales, uneven sizes, the schedule and
the logits' folding), the per-class median entropy thresholds with the 0.001 floor, the
pseudo-label rule, the CE rescaling, plain CE in the first phase, and one compiled step for the
whole stream.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from clseg_jax import compiles as compiles_lib
from clseg_jax import losses
from clseg_jax import step as step_lib
from clseg_jax.strategies import base, plop, snapshot
from tests import tiny

# ---------------------------------------------------------------- numpy references


def np_pod_embedding(x: np.ndarray, scales) -> np.ndarray:
    """Square; per scale s, cut [h, w] into s x s regions of (h // s) x (w // s); in each region
    the mean along the width (per channel, per row) then along the height (per channel, per
    column), channel-major; regions row-major; concatenate."""
    x = np.asarray(x, np.float64) ** 2
    b, h, w, c = x.shape
    out = [[] for _ in range(b)]
    for s in scales:
        kh, kw = h // s, w // s
        if kh == 0 or kw == 0:
            continue
        for i in range(s):
            for j in range(s):
                region = x[:, i * kh : (i + 1) * kh, j * kw : (j + 1) * kw]  # [B,kh,kw,C]
                for n in range(b):
                    for ch in range(c):
                        out[n].extend(region[n, r, :, ch].mean() for r in range(kh))
                    for ch in range(c):
                        out[n].extend(region[n, :, q, ch].mean() for q in range(kw))
    return np.array(out)


def np_pod_distance(old: np.ndarray, new: np.ndarray, scales) -> float:
    d = np_pod_embedding(old, scales) - np_pod_embedding(new, scales)
    return float(np.mean(np.sqrt(np.sum(d**2, axis=1))))


def np_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_code_entropy(logits: np.ndarray, old_mask: np.ndarray, n_cur: int) -> np.ndarray:
    """The official code's uncertainty: ``-(1 / log C) * mean_c p log p`` over the old model's C
    channels, divided by ``log`` of the number of classes seen now."""
    p = np_softmax(np.asarray(logits)[..., old_mask])
    c = int(old_mask.sum())
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -(1.0 / math.log(c)) * plogp.mean(-1) / math.log(n_cur)


def np_pseudo(old_logits, labels, old_mask, thresholds, n_cur):
    """Loop over pixels: background pixels get the old argmax if its entropy is below that
    class's threshold, else 255; other pixels keep their label. ``nu``: per image, the share of
    background pixels that got a pseudo-label (1 without background)."""
    u = np_code_entropy(old_logits, old_mask, n_cur)
    old_ids = np.flatnonzero(old_mask)
    pred = old_ids[np.argmax(np.asarray(old_logits)[..., old_mask], -1)]
    targets = np.array(labels, np.int64)
    nu = np.ones(labels.shape[0])
    for b in range(labels.shape[0]):
        kept = total = 0
        for i in range(labels.shape[1]):
            for j in range(labels.shape[2]):
                if labels[b, i, j] != 0:
                    continue
                total += 1
                if u[b, i, j] < thresholds[pred[b, i, j]]:
                    targets[b, i, j] = pred[b, i, j]
                    kept += 1
                else:
                    targets[b, i, j] = 255
        if total:
            nu[b] = kept / total
    return targets, nu


def np_rescaled_ce(logits, targets, nu) -> float:
    """``mean_b nu_b / (H W) * sum over non-ignored pixels of -log softmax(logits)[target]``."""
    b, h, w, _ = logits.shape
    logp = np.log(np_softmax(logits))
    per_image = np.zeros(b)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                if targets[n, i, j] != 255:
                    per_image[n] -= logp[n, i, j, targets[n, i, j]]
    return float(np.mean(nu * per_image / (h * w)))


# ---------------------------------------------------------------- math


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 10, 13, 2), (1, 3, 5, 2)])
def test_pod_embedding_and_distance_match_numpy(shape):
    rng = np.random.default_rng(0)
    old, new = rng.normal(size=(2, *shape))
    scales = (1, 2, 4)
    emb = np.asarray(plop.pod_embedding(jnp.asarray(old, jnp.float32), scales))
    np.testing.assert_allclose(emb, np_pod_embedding(old, scales), rtol=1e-5, atol=1e-6)
    # Length: per scale s used, s^2 regions of C * (h // s + w // s) values.
    b, h, w, c = shape
    used = [s for s in scales if h >= s and w >= s]
    assert emb.shape == (b, sum(s * s * c * (h // s + w // s) for s in used))
    value = float(plop.pod_loss([jnp.asarray(old)], [jnp.asarray(new)], [1.0], scales))
    np.testing.assert_allclose(value, np_pod_distance(old, new, scales), rtol=1e-5)
    assert value > 0.1


def test_pod_strips_see_local_changes_and_gradient_is_finite_at_zero():
    # Moving a blob inside the map keeps the global (scale 1) width/height profiles of the other
    # axis but not the local ones: scale 1 alone sees less than scales 1, 2, 4.
    old = np.zeros((1, 8, 8, 1))
    new = np.zeros((1, 8, 8, 1))
    old[0, 1, 1, 0] = 1.0
    new[0, 1, 5, 0] = 1.0  # same row, other column
    one = float(plop.pod_loss([jnp.asarray(old)], [jnp.asarray(new)], [1.0], (1,)))
    multi = float(plop.pod_loss([jnp.asarray(old)], [jnp.asarray(new)], [1.0], (1, 2, 4)))
    np.testing.assert_allclose(one, np_pod_distance(old, new, (1,)), rtol=1e-6)
    np.testing.assert_allclose(multi, np_pod_distance(old, new, (1, 2, 4)), rtol=1e-6)
    assert multi > one > 0
    # Identical maps: loss 0 and a zero (not NaN) gradient, like torch's norm subgradient.
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 3)), jnp.float32)
    loss = lambda a, b: plop.pod_loss([a], [b], [1.0], (1, 2))
    grad = jax.jit(jax.grad(loss, argnums=1))(x, x)
    assert np.all(np.asarray(grad) == 0.0)


def test_pod_loss_weights_layers_and_averages():
    rng = np.random.default_rng(2)
    maps = [rng.normal(size=(2, 8, 8, 2)) for _ in range(4)]
    factors = [0.01, 0.0005]
    value = plop.pod_loss(
        [jnp.asarray(maps[0]), jnp.asarray(maps[1])],
        [jnp.asarray(maps[2]), jnp.asarray(maps[3])],
        factors,
        (1, 2, 4),
    )
    expected = (
        0.01 * np_pod_distance(maps[0], maps[2], (1, 2, 4))
        + 0.0005 * np_pod_distance(maps[1], maps[3], (1, 2, 4))
    ) / 2
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)


def test_fold_new_into_background():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(1, 2, 2, 6))
    old_mask = np.array([1, 1, 1, 0, 0, 0], bool)
    new_mask = np.array([0, 0, 0, 1, 1, 0], bool)  # class 5: not seen yet
    out = np.asarray(plop.fold_new_into_background(jnp.asarray(logits), old_mask, new_mask))
    expected = np.zeros_like(logits)
    expected[..., 0] = logits[..., 0] + logits[..., 3] + logits[..., 4]
    expected[..., 1:3] = logits[..., 1:3]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_pseudo_labels_and_rescaled_ce_match_numpy():
    rng = np.random.default_rng(4)
    k, n_cur = 5, 4
    old_mask = np.array([1, 1, 1, 0, 0], bool)
    old_logits = rng.normal(size=(3, 6, 6, k)) * 4
    labels = rng.choice([0, 0, 0, 3, 255], size=(3, 6, 6))
    labels[2] = 3  # an image without background: nu = 1
    thresholds = np.array([0.05, 0.08, 0.02, 0.001, 0.001], np.float32)
    scale = 1.0 / (3 * math.log(3) * math.log(n_cur))
    masked = losses.mask_logits(jnp.asarray(old_logits, jnp.float32), old_mask)
    targets, nu = plop.pseudo_label(masked, jnp.asarray(labels), thresholds, jnp.float32(scale))
    want_targets, want_nu = np_pseudo(old_logits, labels, old_mask, thresholds, n_cur)
    np.testing.assert_array_equal(np.asarray(targets), want_targets)
    np.testing.assert_allclose(np.asarray(nu), want_nu, rtol=1e-6)
    # The rule did something of each kind: kept labels, pseudo-labels, ignored pixels.
    bg = labels == 0
    assert np.any(bg & (want_targets == 255)) and np.any(bg & (want_targets != 255))
    assert 0 < want_nu[0] < 1 and want_nu[2] == 1
    new_logits = rng.normal(size=(3, 6, 6, k))
    ce = plop.rescaled_cross_entropy(jnp.asarray(new_logits), targets, nu)
    np.testing.assert_allclose(
        float(ce), np_rescaled_ce(new_logits, want_targets, want_nu), rtol=1e-5
    )


def test_histogram_median_interpolates_within_a_bin():
    rng = np.random.default_rng(5)
    values = [rng.uniform(0.1, 0.9, size=n) for n in (1, 7, 101)]
    bins = 1000
    hist = np.zeros((4, bins), np.int64)  # row 3 stays empty
    for row, v in enumerate(values):
        np.add.at(hist[row], np.minimum((v * bins).astype(int), bins - 1), 1)
    med = plop.histogram_median(hist)
    # Odd counts: the median sample lies in the median bin, so at most one bin off.
    np.testing.assert_allclose(med[:3], [np.median(v) for v in values], atol=1.0 / bins)
    assert med[3] == 0.0


# ---------------------------------------------------------------- thresholds (before_phase)

K = 5
OLD_MASK = np.array([1, 1, 1, 0, 0], bool)
CUR_MASK = np.array([1, 1, 1, 1, 0], bool)


def _lookup_forward(params, batch_stats, images, train):
    """A model whose per-pixel logits are rows of ``params["table"]`` picked by the red value."""
    del train
    return {"logits": params["table"][images[..., 0].astype(jnp.int32)]}, batch_stats


def _phase(images, labels, index=1, mask=CUR_MASK, new=(3,)):
    def batches(batch_size):
        for i in range(0, len(images), batch_size):
            yield {"image": images[i : i + batch_size], "label": labels[i : i + batch_size]}

    seen = tuple(int(c) for c in np.flatnonzero(mask))
    return base.Phase(index, (index,), new, seen, mask, batches)


def test_thresholds_are_floored_medians_of_the_entropy_per_predicted_class(caplog):
    rng = np.random.default_rng(6)
    rows = 40
    table = rng.normal(size=(rows, K)) * rng.uniform(0.5, 4.0, size=(rows, 1))
    table[:4, 0] += 30.0  # very confident background: its median is under the floor
    table[4:, 0] -= 4.0  # the other rows are mostly classes 1 and 2
    table[:, 3:] = rng.normal(size=(rows, 2)) * 50  # unseen by the old model: must not matter
    images = np.zeros((7, 4, 4, 3), np.uint8)  # 7 images: the last batch of 3 is padded
    images[..., 0] = rng.integers(0, rows, size=(7, 4, 4))
    labels = rng.choice([0, 0, 0, 3, 255], size=(7, 4, 4)).astype(np.uint8)
    labels[0, :2, :2] = 0
    images[0, :2, :2, 0] = [[0, 1], [2, 3]]  # the confident rows are labelled background
    logits = table[images[..., 0]]
    pred = np.argmax(logits[..., OLD_MASK], -1)
    for c in range(3):
        # Odd counts: the median is one sample, which the median bin holds (see
        # test_histogram_median_interpolates_within_a_bin); even counts average two samples
        # that may sit in different bins.
        where = np.argwhere((labels == 0) & (pred == c))
        if len(where) % 2 == 0 and len(where):
            labels[tuple(where[-1])] = 255

    env = base.Env(_lookup_forward, num_classes=K, num_experiences=2)
    # A lookup table has no classifier to initialise.
    cfg = ml_collections.ConfigDict(
        {"plop_entropy_bins": 100_000, "plop_batch": 4, "plop_init": False}
    )
    strategy = plop.make(cfg, env)
    params = {"table": jnp.asarray(table, jnp.float32)}
    state = strategy.init(params, {})
    state = strategy.after_phase(params, {}, state, _phase(images, labels, 0, OLD_MASK, (1, 2)))
    with caplog.at_level("INFO"):
        _, state = strategy.before_phase(params, {}, state, _phase(images, labels))

    # numpy: per pixel labelled 0, the old model's class and the code's entropy.
    u = np_code_entropy(logits, OLD_MASK, n_cur=4)
    bg = labels == 0
    want = np.full(K, 0.001)
    for c in range(3):
        values = u[bg & (pred == c)]
        if len(values):
            want[c] = max(np.median(values), 0.001)
    got = np.asarray(state.thresholds)
    # One histogram bin, in the code's units (the bins split H / log n_old).
    tol = math.log(3) / 100_000 / (3 * math.log(3) * math.log(4))
    assert all(np.sum(bg & (pred == c)) % 2 == 1 for c in range(3))
    np.testing.assert_allclose(got, want, atol=tol)
    assert got[0] == pytest.approx(0.001)  # the floor (a max, not a cap)
    np.testing.assert_allclose(got[3:], 0.001)  # never predicted by the old model
    assert np.all(want[1:3] > 0.01)  # the check covers real medians too
    # The run log names what the automatic rule gave (issue 16): 1 of the 3 old classes floored.
    assert "plop_threshold=0.001; 1 of 3 at the floor" in caplog.text, caplog.text
    np.testing.assert_allclose(float(state.pod_scale), math.sqrt(4 / 1), rtol=1e-6)
    np.testing.assert_allclose(
        float(state.entropy_scale), 1 / (3 * math.log(3) * math.log(4)), rtol=1e-6
    )


# ---------------------------------------------------------------- the strategy in the step


@pytest.fixture(scope="module")
def setup():
    graphdef, params, stats = tiny.tiny_unet()
    forward = step_lib.make_forward(graphdef)
    env = base.Env(forward, num_classes=3, num_experiences=2)
    strategy = plop.make(ml_collections.ConfigDict(), env)
    batch = tiny.batch(n=2, size=16)
    labels = np.asarray(batch["label"]).copy()
    labels[:, :4] = 255
    batch = {"image": batch["image"], "label": jnp.asarray(labels)}
    return forward, strategy, params, stats, batch


def _inputs(forward, params, stats, batch, class_mask):
    out, _ = forward(params, stats, batch["image"], True)
    logits = losses.mask_logits(out["logits"], class_mask)
    task = losses.cross_entropy(logits, batch["label"])
    return base.LossInputs(params, stats, batch, {**out, "logits": logits}, task, class_mask)


def test_first_phase_is_plain_cross_entropy(setup):
    forward, strategy, params, stats, batch = setup
    state = strategy.init(params, stats)
    mask = jnp.array([True, True, False])
    images, labels = np.asarray(batch["image"]), np.asarray(batch["label"])
    phase0 = _phase(images, labels, 0, np.asarray(mask), (1,))
    same, state0 = strategy.before_phase(params, stats, state, phase0)
    assert same is params and state0 is state

    def objective(p):
        inputs = _inputs(forward, p, stats, batch, mask)
        return strategy.loss(inputs, state, jax.random.PRNGKey(0))[0], inputs.task_loss

    (value, task), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
    task_grads = jax.jit(jax.grad(lambda p: objective(p)[1]))(params)
    assert float(value) == pytest.approx(float(task), rel=1e-6)
    for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(task_grads), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(t), rtol=1e-5, atol=1e-7)


def test_second_phase_loss_matches_numpy(setup):
    forward, strategy, params, stats, batch = setup
    old_params = jax.tree.map(lambda p: 0.8 * p + 0.02, params)
    old_mask, cur_mask = np.array([1, 1, 0], bool), np.array([1, 1, 1], bool)
    old_out, _ = forward(old_params, stats, batch["image"], False)
    old_logits = np.asarray(old_out["logits"])
    # Thresholds around the old model's median entropy: some pixels kept, some dropped.
    median = float(np.median(np_code_entropy(old_logits, old_mask, n_cur=3)))
    state = strategy.init(params, stats)._replace(
        snap=snapshot.take(old_params, stats, old_mask),
        thresholds=jnp.asarray([median, 1.2 * median, 0.001], jnp.float32),
        entropy_scale=jnp.float32(1 / (2 * math.log(2) * math.log(3))),
        pod_scale=jnp.float32(math.sqrt(3)),
    )
    inputs = _inputs(forward, params, stats, batch, jnp.asarray(cur_mask))
    value, metrics = jax.jit(strategy.loss)(inputs, state, jax.random.PRNGKey(0))

    targets, nu = np_pseudo(
        old_logits, np.asarray(batch["label"]), old_mask, np.asarray(state.thresholds), n_cur=3
    )
    ce = np_rescaled_ce(np.asarray(inputs.outputs["logits"]), targets, nu)
    # POD: every "pod" map at 0.01, then the logits (1x1 head on the penultimate map; new
    # class 2 folded into background, only old classes compared) at 0.0005; mean over layers.
    dists = [
        0.01 * np_pod_distance(np.asarray(a), np.asarray(b), (1, 2, 4))
        for a, b in zip(old_out["pod"], inputs.outputs["pod"], strict=True)
    ]

    def small_logits(p, pen):
        kernel, bias = np.asarray(p["head"]["kernel"])[0, 0], np.asarray(p["head"]["bias"])
        return np.asarray(pen, np.float64) @ kernel + bias

    old_small = small_logits(old_params, old_out["penultimate"])[..., :2]
    new_small = small_logits(params, inputs.outputs["penultimate"])
    new_small = np.stack([new_small[..., 0] + new_small[..., 2], new_small[..., 1]], -1)
    dists.append(0.0005 * np_pod_distance(old_small, new_small, (1, 2, 4)))
    pod = math.sqrt(3) * sum(dists) / len(dists)
    np.testing.assert_allclose(float(metrics["plop_ce"]), ce, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["plop_pod"]), pod, rtol=1e-4)
    np.testing.assert_allclose(float(value), ce + pod, rtol=1e-4)
    assert 0 < nu.min() and nu.max() < 1 and pod > 0  # pseudo-labels both kept and dropped


def test_one_compiled_step_for_the_stream(setup):
    forward, strategy, params, stats, batch = setup
    tx = optax.sgd(0.01)
    step = jax.jit(step_lib.make_train_step(forward, strategy, tx))
    state0 = strategy.init(params, stats)
    images = np.asarray(batch["image"])
    labels = np.asarray(batch["label"])
    phase0 = _phase(images, labels, 0, np.array([1, 1, 0], bool), (1,))
    phase1 = _phase(images, labels, 1, np.array([1, 1, 1], bool), (2,))

    def run(sstate, mask):
        train = step_lib.TrainState(params, stats, tx.init(params), jnp.array(0, jnp.int32))
        out = step(
            train,
            sstate,
            step_lib.TrainMetrics.empty(),
            step_lib.new_monitor(),
            batch,
            jax.random.PRNGKey(0),
            jnp.asarray(mask),
        )
        return out

    run(state0, phase0.class_mask)
    state1 = strategy.after_phase(params, stats, state0, phase0)
    _, state1 = strategy.before_phase(params, stats, state1, phase1)
    assert tiny.signature(state1) == tiny.signature(state0)
    with compiles_lib.Counter() as counter:
        new_state, _, metrics, monitor = run(state1, phase1.class_mask)
    assert counter.count == 0
    assert int(monitor.first_bad_step) == -1
    assert np.isfinite(float(metrics.compute()["loss"]))
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_state.params, params)
    assert any(jax.tree.leaves(changed))


@pytest.mark.parametrize("do_init", [True, False])
def test_new_classifiers_start_from_background(setup, do_init):
    forward, _, params, stats, batch = setup
    env = base.Env(forward, num_classes=3, num_experiences=2)
    strategy = plop.make(ml_collections.ConfigDict({"plop_init": do_init}), env)
    images, labels = np.asarray(batch["image"]), np.asarray(batch["label"])
    phase0 = _phase(images, labels, 0, np.array([1, 1, 0], bool), (1,))
    phase1 = _phase(images, labels, 1, np.array([1, 1, 1], bool), (2,))
    state = strategy.init(params, stats)
    same, state = strategy.before_phase(params, stats, state, phase0)
    assert same is params  # no old model yet: nothing to initialise
    state = strategy.after_phase(params, stats, state, phase0)
    new_params, _ = strategy.before_phase(params, stats, state, phase1)
    kernel, bias = np.asarray(params["head"]["kernel"]), np.asarray(params["head"]["bias"])
    got_k, got_b = np.asarray(new_params["head"]["kernel"]), np.asarray(new_params["head"]["bias"])
    if not do_init:
        np.testing.assert_array_equal(got_k, kernel)
        np.testing.assert_array_equal(got_b, bias)
        return
    # MiB's rule with one new class: its column copies background's, and both biases become
    # b_0 - log(2); the old class is untouched.
    np.testing.assert_array_equal(got_k[..., 2], kernel[..., 0])
    np.testing.assert_array_equal(got_k[..., :2], kernel[..., :2])
    shared = bias[0] - np.log(2.0)
    np.testing.assert_allclose(got_b, [shared, bias[1], shared], rtol=1e-6)
