"""DER++ and iCaRL: their losses and iCaRL's nearest-mean classifier against numpy, the optional
``Strategy.predict`` hook (chain, compiled evaluation), and a contract-style drive of both on a
small class-incremental classification stream (iCaRL only runs on classification streams, so the
shared contract test's segmentation stream cannot host it).

Stand-in models (logits or features from pixel values) keep the math tests independent of any
network; the numpy references recompute everything in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clseg_jax import checkpoint, data, evaluate, losses, models, rows, setup, tasks
from clseg_jax.data import phases as phases_lib
from clseg_jax.memory import buffer
from clseg_jax.strategies import base, der, icarl
from configs import split_digits
from tests import tiny

K, E, SIZE = 4, 3, 2


def _cfg(**kw) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict({**der.DEFAULTS, **icarl.DEFAULTS})
    c.update(kw)
    return c


def _stand_in_forward(images, train=False):
    """Logits ``[b,*L,K]`` from pixel values: ``L`` follows the image (segmentation) when the
    images are ``SIZE x SIZE``; the features are the per-channel means ``[b,3]``."""
    del train
    x = images.astype(jnp.float32) / 255.0
    feats = jnp.mean(x, axis=(1, 2))  # [b,3]
    w = jnp.arange(3 * K, dtype=jnp.float32).reshape(3, K) / 7.0
    return {"penultimate": feats, "features": x, "logits": feats @ w}


def _env(label_shape, task):
    def forward(params, batch_stats, images, train):
        out = _stand_in_forward(images, train)
        if label_shape:  # segmentation: one logit vector per pixel
            out["logits"] = jnp.einsum("bhwc,ck->bhwk", out["features"], jnp.ones((3, K)))
        return out, batch_stats

    return base.Env(forward, K, E, image_shape=(SIZE, SIZE, 3), label_shape=label_shape, task=task)


# -- DER++ -------------------------------------------------------------------------------------


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _ce(logits, labels):
    """Numpy softmax CE, mean over entries whose label is not 255."""
    ok = labels != 255
    if not ok.any():
        return 0.0
    lp = _log_softmax(logits)
    picked = np.take_along_axis(lp, np.where(ok, labels, 0)[..., None].astype(int), -1)[..., 0]
    return float(-picked[ok].mean())


@pytest.mark.parametrize("label_shape", [(), (SIZE, SIZE)], ids=["classification", "segmentation"])
def test_der_loss_matches_numpy(label_shape):
    """Empty slots included: memory of 6 with 3 valid rows, two draws of 4 rows each."""
    task = tasks.SEGMENTATION if label_shape else tasks.CLASSIFICATION
    env = _env(label_shape, task)
    n, m, b = 4, 6, 3
    alpha, beta = 0.7, 1.3
    strategy = der.make(_cfg(der_mem_size=m, der_batch=n, der_alpha=alpha, der_beta=beta), env)
    st = strategy.init({}, {})
    rng = np.random.default_rng(0)
    valid = np.arange(m) < 3
    # Each row's image is one constant value: it identifies the row after sampling.
    images = np.broadcast_to((np.arange(m) + 1)[:, None, None, None], (m, SIZE, SIZE, 3))
    labels = rng.integers(0, K, (m, *label_shape)).astype(np.uint8)
    labels[~valid] = 255
    exp = np.where(valid, [0, 1, 1, -1, -1, -1], -1)
    stored = rng.normal(size=(m, *label_shape, K)).astype(np.float32)
    table = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], bool)  # phases' class masks
    memory = st.memory._replace(
        image=jnp.asarray(images, jnp.uint8),
        label=jnp.asarray(labels),
        exp=jnp.asarray(exp, jnp.int32),
        valid=jnp.asarray(valid),
        extra={"logits": jnp.asarray(stored)},
    )
    st = der.DerState(memory, jnp.asarray(table))
    new = {
        "image": jnp.asarray(
            np.broadcast_to((100 + np.arange(b))[:, None, None, None], (b, SIZE, SIZE, 3)),
            jnp.uint8,
        ),
        "label": jnp.asarray(rng.integers(0, K, (b, *label_shape)), jnp.uint8),
    }
    class_mask = np.array([1, 1, 1, 0], bool)
    batch = strategy.prepare_batch(new, st, jax.random.PRNGKey(5))
    assert batch["image"].shape[0] == b + 2 * n
    raw = rng.normal(size=(b + 2 * n, *label_shape, K)).astype(np.float32)
    logits = losses.mask_logits(jnp.asarray(raw), jnp.asarray(class_mask))
    inputs = base.LossInputs({}, {}, batch, {"logits": logits}, None, jnp.asarray(class_mask))
    value, parts = jax.jit(strategy.loss)(inputs, st, jax.random.PRNGKey(0))

    # Reference: the rows each draw took (identified by pixel value) and whether they hold data.
    k_logits, k_labels = jax.random.split(jax.random.PRNGKey(5))
    drawn = []
    for k in (k_logits, k_labels):
        rows, ok = buffer.sample(memory, k, n)
        drawn.append((np.asarray(rows["image"])[:, 0, 0, 0].astype(int) - 1, np.asarray(ok)))
    (idx1, ok1), (idx2, ok2) = drawn
    assert (~ok1).sum() == 1 and (~ok2).sum() == 1  # one empty slot in each draw
    z = np.where(class_mask, raw.astype(np.float64), losses.NEG)
    ce_new = _ce(z[:b], np.asarray(new["label"]))
    sq, count = 0.0, 0
    for j, (r, ok) in enumerate(zip(idx1, ok1, strict=True)):
        if ok:
            keep = table[exp[r]] & class_mask
            sq += ((raw[b + j] - stored[r]) ** 2 * keep).sum()
            count += keep.sum() * int(np.prod(label_shape, dtype=int))
    mse = sq / count
    mem_labels = np.where(ok2.reshape(n, *(1,) * len(label_shape)), labels[idx2], 255)
    np.testing.assert_array_equal(np.asarray(batch["label"])[b + n :], mem_labels)
    ce_mem = _ce(z[b + n :], mem_labels)
    np.testing.assert_allclose(float(parts["der_mse"]), mse, rtol=1e-5)
    np.testing.assert_allclose(float(parts["der_ce_mem"]), ce_mem, rtol=1e-5)
    np.testing.assert_allclose(float(value), ce_new + alpha * mse + beta * ce_mem, rtol=1e-5)


def test_der_with_empty_memory_is_the_new_batch_loss():
    env = _env((), tasks.CLASSIFICATION)
    strategy = der.make(_cfg(der_mem_size=8, der_batch=2), env)
    st = strategy.init({}, {})
    new = {"image": jnp.full((3, SIZE, SIZE, 3), 9, jnp.uint8), "label": jnp.array([0, 1, 3])}
    batch = strategy.prepare_batch(new, st, jax.random.PRNGKey(0))
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(7, K)), jnp.float32)
    inputs = base.LossInputs({}, {}, batch, {"logits": logits}, None, jnp.ones(K, bool))
    value, _ = strategy.loss(inputs, st, None)
    np.testing.assert_allclose(float(value), _ce(np.asarray(logits[:3]), np.array([0, 1, 3])))


def test_der_stores_eval_logits_and_its_phase_classes():
    env = _env((), tasks.CLASSIFICATION)
    strategy = der.make(_cfg(der_mem_size=8, der_batch=2), env)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    labels = np.array([0, 1, 0, 1, 1], np.uint8)
    mask = np.array([1, 1, 0, 0], bool)
    phase = base.Phase(
        0, (0,), (0, 1), (0, 1), mask, lambda s: iter([{"image": images, "label": labels}])
    )
    st = strategy.after_phase({}, {}, strategy.init({}, {}), phase)
    np.testing.assert_array_equal(np.asarray(st.memory.image[:5]), images)
    want = np.asarray(env.forward({}, {}, jnp.asarray(images), False)[0]["logits"])
    np.testing.assert_allclose(np.asarray(st.memory.extra["logits"][:5]), want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(st.phase_classes), [mask, [0] * K, [0] * K])


# -- iCaRL -------------------------------------------------------------------------------------


def test_icarl_loss_matches_numpy():
    rng = np.random.default_rng(0)
    b = 6
    raw = rng.normal(size=(b, K)) * 2
    old = rng.normal(size=(b, K)) * 2
    labels = np.array([2, 0, 255, 1, 2, 3], np.uint8)
    old_classes = np.array([1, 1, 0, 0], bool)
    class_mask = np.array([1, 1, 1, 0], bool)
    logits = losses.mask_logits(jnp.asarray(raw, jnp.float32), jnp.asarray(class_mask))
    got = icarl.icarl_loss(
        logits,
        jnp.asarray(labels),
        jnp.asarray(old, jnp.float32),
        jnp.asarray(old_classes),
        jnp.asarray(class_mask),
    )
    sig = lambda v: 1 / (1 + np.exp(-v))
    total, n_rows = 0.0, 0
    for i in range(b):
        if labels[i] == 255:
            continue
        n_rows += 1
        for k in np.flatnonzero(class_mask):
            t = sig(old[i, k]) if old_classes[k] else float(labels[i] == k)
            p = sig(raw[i, k])
            total -= t * np.log(p) + (1 - t) * np.log(1 - p)
    np.testing.assert_allclose(float(got), total / n_rows, rtol=1e-5)


def test_nme_predicts_the_nearest_normalised_class_mean():
    """Class means from a stored memory (stand-in features), then predict, against numpy."""
    env = _env((), tasks.CLASSIFICATION)
    strategy = icarl.make(_cfg(icarl_mem_size=12, icarl_batch=2), env)
    st = strategy.init({}, {})
    rng = np.random.default_rng(0)
    m = 12
    valid = np.arange(m) < 9
    images = rng.integers(0, 256, (m, SIZE, SIZE, 3), dtype=np.uint8)
    labels = np.where(valid, [0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 0, 0], 255).astype(np.uint8)
    memory = st.memory._replace(
        image=jnp.asarray(images), label=jnp.asarray(labels), valid=jnp.asarray(valid)
    )
    features_fn = rows.Map(lambda p, s, x: {"features": _stand_in_forward(x)["penultimate"]}, 2)
    means, has_mean = icarl.class_means(memory, features_fn, {}, {}, st.means.shape)
    f = images.astype(np.float64).mean(axis=(1, 2)) / 255.0
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    want = np.zeros((K, 3))
    for c in range(3):
        mu = f[valid & (labels == c)].mean(axis=0)
        want[c] = mu / np.linalg.norm(mu)
    np.testing.assert_allclose(means, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(has_mean, [1, 1, 1, 0])

    st = st._replace(means=jnp.asarray(means), has_mean=jnp.asarray(has_mean))
    query = rng.integers(0, 256, (32, SIZE, SIZE, 3), dtype=np.uint8)
    outputs = _stand_in_forward(jnp.asarray(query))
    scores = np.asarray(jax.jit(strategy.predict)(outputs, st))
    q = query.astype(np.float64).mean(axis=(1, 2)) / 255.0
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    dist = ((q[:, None] - want[None, :3]) ** 2).sum(-1)
    np.testing.assert_array_equal(scores.argmax(-1), dist.argmin(-1))
    assert np.all(scores[:, 3] == losses.NEG)  # no exemplar, no mean


def test_icarl_predict_falls_back_to_logits_without_means():
    env = _env((), tasks.CLASSIFICATION)
    strategy = icarl.make(_cfg(), env)
    outputs = _stand_in_forward(jnp.full((2, SIZE, SIZE, 3), 50, jnp.uint8))
    scores = strategy.predict(outputs, strategy.init({}, {}))
    np.testing.assert_allclose(np.asarray(scores), np.asarray(outputs["logits"]))


@pytest.mark.parametrize(
    "label_shape,task", [((SIZE, SIZE), tasks.SEGMENTATION), ((K,), tasks.MULTILABEL)]
)
def test_icarl_rejects_other_tasks(label_shape, task):
    with pytest.raises(ValueError, match=f"icarl needs a classification stream.*'{task.name}'"):
        icarl.make(_cfg(), _env(label_shape, task))


# -- the predict hook ----------------------------------------------------------------------------


def test_chain_carries_one_predict_and_rejects_two():
    scored = base.Strategy(init=lambda p, s: jnp.arange(3.0), predict=lambda out, st: out["x"] + st)
    plain = base.Strategy()
    chained = base.chain(plain, scored)
    sstate = chained.init({}, {})
    np.testing.assert_array_equal(
        np.asarray(chained.predict({"x": jnp.ones(3)}, sstate)), [1, 2, 3]
    )
    assert base.chain(plain, plain).predict is None
    with pytest.raises(ValueError, match="at most one strategy may define predict"):
        base.chain(scored, plain, scored)


def test_eval_step_scores_with_predict_and_state_as_argument():
    """Two states through one jitted step: different confusions, one compilation."""

    def forward(params, batch_stats, images, train):
        return {"logits": jnp.zeros((images.shape[0], 3))}, batch_stats

    step = jax.jit(evaluate.make_eval_step(forward, 3, lambda out, st: out["logits"] + st))
    batch = {"image": jnp.zeros((4, 2, 2, 3), jnp.uint8), "label": jnp.array([0, 1, 2, 2])}
    conf0 = jnp.zeros((3, 3), jnp.int32)
    mask = jnp.ones(3, bool)
    a = step({}, {}, conf0, batch, mask, jnp.array([0.0, 0.0, 1.0]))
    b = step({}, {}, conf0, batch, mask, jnp.array([0.0, 1.0, 0.0]))
    np.testing.assert_array_equal(np.asarray(a).argmax(1), [2, 2, 2])
    np.testing.assert_array_equal(np.asarray(b).argmax(1), [1, 1, 1])
    assert step._cache_size() == 1


# -- contract on a classification stream ---------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    cfg = split_digits.get_config()
    cfg.data.classes_per_step = (4, 3, 3)
    cfg.data.train_per_exp = 16
    cfg.data.test_per_exp = 8
    cfg.model.kwargs = {"small_input": True, "widths": (4, 4, 8, 8)}
    stream = data.make(cfg.data)
    graphdef, params, stats = models.init(cfg.model, stream.num_classes, seed=0)
    return cfg, stream, graphdef, params, stats


@pytest.mark.parametrize("module", [der, icarl], ids=["der", "icarl"])
def test_contract_on_class_incremental_digits(module, digits, tmp_path):
    """Three phases through the trainer's jit and the Evaluator: no recompiles after the first,
    a state of fixed tree/shapes, finite losses, an orbax round trip."""
    cfg, stream, *_ = digits
    cfg = cfg.copy_and_resolve_references()
    cfg.batch_size, cfg.eval_batch_size, cfg.epochs = 8, 8, 1
    strategy_cfg = _cfg(der_batch=4, icarl_batch=4, der_mem_size=20, icarl_mem_size=20)
    parts = setup.build(cfg, lambda env: module.make(strategy_cfg, env), stream=stream)
    sig = tiny.signature(parts.arrays["sstate"])
    driven = tiny.drive(parts, phases_lib.make(stream, ((0,), (1,), (2,))))
    sstate = driven.sstate
    assert tiny.signature(sstate) == sig
    assert all(np.isfinite(m["loss"]) for m in driven.metrics)
    assert driven.first_bad_step == [-1, -1, -1]
    for i, row in enumerate(driven.rows):
        assert len(row) == 3 and all(int(c.sum()) > 0 for c in row[: i + 1])
    assert driven.compiles[0] > 0 and driven.compiles[1:] == [0, 0], driven.compiles

    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save({"sstate": sstate}, {"phase": 3})
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), {"sstate": sstate}
    )
    restored, _ = ckpt.restore(abstract)
    ckpt.close()
    for a, b in zip(jax.tree.leaves(sstate), jax.tree.leaves(restored["sstate"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
