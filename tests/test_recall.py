"""RECALL: replay image sources (folder, callable), the replay-labelling and label-mixing rules
against numpy, the memory filled between phases, and the compiled step (one compile per stream).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from PIL import Image

from clseg_jax import compiles as compiles_lib
from clseg_jax import losses
from clseg_jax import step as step_lib
from clseg_jax.data import replay_sources
from clseg_jax.strategies import base, recall
from tests import tiny

SIZE = 16
K = 3  # tiny.tiny_unet's head
PER_CLASS = 4
SOURCE = "callable:tests.test_recall:class_images"


def class_images(class_id, n, size, rng):
    """A callable source: noise (each image unique, so a replayed row can be traced back)."""
    assert 1 <= class_id < K
    return rng.integers(0, 256, (n, *size, 3), dtype=np.uint8)


def bad_images(class_id, n, size, rng):
    return np.zeros((n, *size, 3), np.float32)


# ---------------------------------------------------------------- sources


def _save(path, array):
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


def test_folder_source_fits_counts_and_names(tmp_path):
    (tmp_path / "01").mkdir()  # zero-padded id, as the official Flickr script writes
    (tmp_path / "dog").mkdir()  # by name
    (tmp_path / "empty").mkdir()
    # 8x16 (H x W): left quarter red, middle half green, right quarter blue.
    stripes = np.zeros((8, 16, 3), np.uint8)
    stripes[:, :4, 0] = 255
    stripes[:, 4:12, 1] = 255
    stripes[:, 12:, 2] = 255
    _save(tmp_path / "01" / "a.png", stripes)
    _save(tmp_path / "01" / "b.jpg", np.full((4, 4, 3), 200))
    Image.fromarray(np.full((5, 3), 90, np.uint8)).save(tmp_path / "dog" / "gray.png")
    (tmp_path / "01" / "notes.txt").write_text("not an image")

    src = replay_sources.FolderSource(str(tmp_path), (8, 8), ("background", "cat", "dog"))
    assert src.missing(range(1, 4)) == [3]
    assert src.files(1) == [str(tmp_path / "01" / n) for n in ("a.png", "b.jpg")]
    # Covering scale 1 for the stripes: the center crop is exactly the green half.
    one = src.images(1, 5, np.random.default_rng(0))
    assert one.shape == (5, 8, 8, 3) and one.dtype == np.uint8
    is_stripes = [np.array_equal(x, stripes[:, 4:12]) for x in one]
    # 5 draws from 2 files: each file used before any repeats -> 3 and 2, whatever the seed.
    assert sum(is_stripes) in (2, 3)
    for seed in range(1, 6):
        draws = src.images(1, 5, np.random.default_rng(seed))
        assert sum(np.array_equal(x, stripes[:, 4:12]) for x in draws) in (2, 3)
        assert not np.array_equal(draws[0], draws[1])  # the first round: distinct files
    for x, s in zip(one, is_stripes, strict=True):
        if not s:  # the 4x4 upscaled to 8x8: still one flat colour (JPEG: near 200)
            assert np.abs(x.astype(int) - 200).max() <= 3
    np.testing.assert_array_equal(one, src.images(1, 5, np.random.default_rng(0)))
    dog = src.images(2, 2, np.random.default_rng(1))  # grayscale 5x3 -> RGB 8x8
    assert dog.shape == (2, 8, 8, 3) and np.all(dog == 90)

    with pytest.raises(FileNotFoundError, match=r"no folder for class 3 .*'3' or 'cat'"):
        replay_sources.FolderSource(str(tmp_path), (8, 8), ("b", "x", "y", "cat")).images(
            3, 1, np.random.default_rng(0)
        )
    src_empty = replay_sources.FolderSource(str(tmp_path), (8, 8), ("b", "empty"))
    with pytest.raises(FileNotFoundError, match=r"no \.jpg/\.jpeg/\.png image in .*empty"):
        src_empty.images(1, 1, np.random.default_rng(0))
    with pytest.raises(FileNotFoundError, match=r"folder '.*nowhere' does not exist"):
        replay_sources.FolderSource(str(tmp_path / "nowhere"), (8, 8))


def test_fit_cover_and_center_crop_non_square():
    # 10 x 4 (H x W) into 4 x 8: scale = max(4/10, 8/4) = 2 -> 20 x 8, crop rows 8..11.
    rows = np.repeat(np.arange(10, dtype=np.uint8)[:, None] * 20, 4, axis=1)
    image = Image.fromarray(np.stack([rows] * 3, -1))
    out = replay_sources.fit(image, (4, 8))
    assert out.shape == (4, 8, 3)
    ref = np.asarray(image.resize((4 * 2, 10 * 2), Image.BILINEAR))[8:12]
    np.testing.assert_array_equal(out, ref)


def test_callable_source_and_spec_errors():
    src = replay_sources.from_spec(SOURCE, (6, 5))
    images = src.images(2, 3, np.random.default_rng(0))
    assert images.shape == (3, 6, 5, 3) and images.dtype == np.uint8
    direct = replay_sources.CallableSource(replay_sources.noise, (2, 2))
    assert direct.images(1, 7, np.random.default_rng(0)).shape == (7, 2, 2, 3)

    bad = replay_sources.from_spec("callable:tests.test_recall:bad_images", (6, 5))
    with pytest.raises(ValueError, match=r"must give uint8 \[2, 6, 5, 3\], got float32"):
        bad.images(1, 2, np.random.default_rng(0))
    cases = {
        "": "expected 'folder:<path>' or 'callable:",
        "callable:tests.test_recall": "expected 'package.module:function'",
        "callable:tests.no_such_module:f": "no module 'tests.no_such_module'",
        "callable:tests.test_recall:nothing": "has no 'nothing'",
        "callable:tests.test_recall:SIZE": "is not callable",
        "http:x": "unknown kind 'http'",
    }
    for spec, message in cases.items():
        with pytest.raises(ValueError, match=message) as err:
            replay_sources.from_spec(spec, (6, 5))
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- labelling rules


def _np_mix(labels, logits, mask):
    """Reference: every pixel labelled 0 takes argmax_k over the old classes of its logits."""
    out = labels.copy()
    known = np.flatnonzero(mask)
    for idx in np.ndindex(labels.shape):
        if labels[idx] == 0:
            out[idx] = known[np.argmax(logits[idx][known])]
    return out


def _np_replay(logits, class_ids):
    """Reference: row of class c -> c where z_c > z_0, else 0."""
    out = np.zeros(logits.shape[:3], np.int64)
    for i, c in enumerate(class_ids):
        out[i] = np.where(logits[i, ..., c] > logits[i, ..., 0], c, 0)
    return out


def test_mix_labels_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 5, 5)).astype(np.float32) * 3
    logits[..., 4] += 10  # a class the old model never knew, and the largest logit everywhere
    labels = rng.choice(np.array([0, 0, 3, 255], np.uint8), size=(2, 5, 5))
    mask = np.array([True, True, True, False, False])
    got = np.asarray(recall.mix_labels(jnp.asarray(labels), jnp.asarray(logits), mask))
    want = _np_mix(labels, logits, mask)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.uint8
    # Only background pixels changed, some of them to an old foreground class; never to 4.
    changed = got != labels
    assert changed.any() and np.all(labels[changed] == 0) and not np.any(got == 4)
    assert np.all(got[labels == 255] == 255) and np.all(got[labels == 3] == 3)


def test_replay_labels_match_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 6, 6, 4)).astype(np.float32)
    logits[..., 3] += 5  # another class dominating: ignored, only {0, c} compete
    class_ids = np.array([1, 2, 1, 2], np.uint8)
    logits[0, 0, 0, 1] = logits[0, 0, 0, 0]  # a tie goes to background
    got = np.asarray(recall.replay_labels(jnp.asarray(logits), jnp.asarray(class_ids)))
    want = _np_replay(logits, class_ids)
    np.testing.assert_array_equal(got, want)
    assert got[0, 0, 0] == 0 and {0, 1, 2} == set(np.unique(got).tolist())


# ---------------------------------------------------------------- the strategy


def _cfg(**overrides) -> ml_collections.ConfigDict:
    values = dict(recall.DEFAULTS, recall_source=SOURCE, recall_per_class=PER_CLASS)
    values.update(overrides)
    return ml_collections.ConfigDict(values)


@pytest.fixture(scope="module")
def model():
    graphdef, params, stats = tiny.tiny_unet()
    return step_lib.make_forward(graphdef), params, stats


def _env(forward):
    return base.Env(forward, K, 3, image_shape=(SIZE, SIZE, 3), label_shape=(SIZE, SIZE))


def _phase(index, new, seen):
    mask = np.zeros(K, bool)
    mask[list(seen)] = True
    return base.Phase(index, (index,), tuple(new), tuple(seen), mask, lambda bs: iter(()))


# Class-incremental 0+1 | 2, then a phase with nothing new (every class now past).
PHASES = (_phase(0, (0, 1), (0, 1)), _phase(1, (2,), (0, 1, 2)), _phase(2, (), (0, 1, 2)))


def test_make_needs_a_source(model):
    forward = model[0]
    with pytest.raises(ValueError, match=r"set config.strategy.recall_source") as err:
        recall.make(_cfg(recall_source=""), _env(forward))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"recall_labeler must be 'old_model' or"):
        recall.make(_cfg(recall_labeler="helpers"), _env(forward))


def test_memory_holds_per_class_rows_with_fixed_shapes(model):
    forward, params, stats = model
    strategy = recall.make(_cfg(), _env(forward))
    state = strategy.init(params, stats)
    sig = tiny.signature(state)
    assert state.memory.capacity == PER_CLASS * (K - 1)
    valid_counts, classes = [], []
    for phase in PHASES:
        _, state = strategy.before_phase(params, stats, state, phase)
        assert tiny.signature(state) == sig
        host = jax.device_get(state.memory)
        valid_counts.append(int(host.valid.sum()))
        classes.append(sorted(set(np.asarray(host.label)[host.valid].tolist())))
        state = strategy.after_phase(params, stats, state, phase)
        assert tiny.signature(state) == sig
    # Before phase 0: nothing past; phase 1: class 1; phase 2: classes 1 and 2.
    assert valid_counts == [0, PER_CLASS, 2 * PER_CLASS]
    assert classes == [[], [1], [1, 2]]
    # A class gets the same images in every phase (the replay set is made once).
    first = np.asarray(state.memory.image[:PER_CLASS])
    _, again = strategy.before_phase(params, stats, state, PHASES[1])
    np.testing.assert_array_equal(np.asarray(again.memory.image[:PER_CLASS]), first)

    small = recall.make(_cfg(recall_mem_size=PER_CLASS), _env(forward))
    with pytest.raises(ValueError, match=r"2 past classes x 4 images = 8 rows exceed"):
        small.before_phase(params, stats, small.init(params, stats), PHASES[2])


def test_prepare_batch_labels_replay_and_mixes_background(model):
    forward, params, stats = model
    strategy = recall.make(_cfg(recall_replay_batch=3), _env(forward))
    batch = tiny.batch(n=2, size=SIZE, classes=K)
    labels = np.asarray(batch["label"]).copy()
    labels[:, :2] = 255
    batch["label"] = jnp.asarray(labels)
    prepare = jax.jit(strategy.prepare_batch)
    key = jax.random.PRNGKey(3)

    # First phase: no snapshot, empty memory -> new rows untouched, 3 ignored filler rows.
    state = strategy.init(params, stats)
    _, state = strategy.before_phase(params, stats, state, PHASES[0])
    out = prepare(batch, state, key)
    assert out["image"].shape == (5, SIZE, SIZE, 3) and out["label"].shape == (5, SIZE, SIZE)
    np.testing.assert_array_equal(np.asarray(out["label"][:2]), labels)
    assert np.all(np.asarray(out["label"][2:]) == losses.IGNORE)

    # Phase 1: old model = the tiny UNet that knew {0, 1}; memory = images of class 1.
    state = strategy.after_phase(params, stats, state, PHASES[0])
    _, state = strategy.before_phase(params, stats, state, PHASES[1])
    out = jax.device_get(prepare(batch, state, key))
    memory = jax.device_get(state.memory)
    old_logits = np.asarray(forward(params, stats, jnp.asarray(out["image"]), False)[0]["logits"])
    np.testing.assert_array_equal(out["image"][:2], np.asarray(batch["image"]))
    want_new = _np_mix(labels, old_logits[:2], PHASES[0].class_mask)
    row_class = []
    for img in out["image"][2:]:
        match = [i for i in range(memory.capacity) if np.array_equal(memory.image[i], img)]
        assert len(match) == 1 and memory.valid[match[0]]
        row_class.append(int(memory.label[match[0]]))
    want_replay = _np_replay(old_logits[2:], row_class)
    # Compare where the decision is not a float tie between two separately compiled forwards.
    top2 = np.sort(old_logits[..., :2], -1)
    clear = (top2[..., 1] - top2[..., 0]) > 1e-4
    np.testing.assert_array_equal(out["label"][:2][clear[:2]], want_new[clear[:2]])
    np.testing.assert_array_equal(out["label"][2:][clear[2:]], want_replay[clear[2:]])
    assert np.any(out["label"][:2] != labels)  # mixing did something ...
    assert np.all(out["label"][:2][labels != 0] == labels[labels != 0])  # ... to background only
    assert set(np.unique(out["label"][2:]).tolist()) <= {0, 1}

    # An inactive snapshot (no finished phase) neither mixes nor labels replay rows.
    idle = state._replace(snap=state.snap._replace(active=jnp.zeros((), jnp.float32)))
    out_idle = jax.device_get(prepare(batch, idle, key))
    np.testing.assert_array_equal(out_idle["label"][:2], labels)
    assert np.all(out_idle["label"][2:] == losses.IGNORE)

    # Without mixing the new rows keep their labels exactly.
    plain = recall.make(_cfg(recall_replay_batch=3, recall_mix_labels=False), _env(forward))
    out = jax.device_get(jax.jit(plain.prepare_batch)(batch, state, key))
    np.testing.assert_array_equal(out["label"][:2], labels)
    np.testing.assert_array_equal(out["label"][2:][clear[2:]], want_replay[clear[2:]])


def test_labeler_hook_stores_host_labels(model):
    forward, params, stats = model

    def halves(images, class_id):  # a stand-in for RECALL's helper decoders
        out = np.zeros(images.shape[:3], np.uint8)
        out[:, :, : SIZE // 2] = class_id
        return out

    env = _env(forward)
    strategy = recall.make(_cfg(recall_mix_labels=False), env, labeler=halves)
    state = strategy.init(params, stats)
    assert state.memory.label.shape == (PER_CLASS * (K - 1), SIZE, SIZE)
    _, state = strategy.before_phase(params, stats, state, PHASES[2])
    batch = tiny.batch(n=2, size=SIZE, classes=K)
    out = jax.device_get(jax.jit(strategy.prepare_batch)(batch, state, jax.random.PRNGKey(0)))
    assert out["label"].shape == (4, SIZE, SIZE)  # 0 = as many replay rows as new rows
    for img, lab in zip(out["image"][2:], out["label"][2:], strict=True):
        i = next(
            i for i in range(state.memory.capacity) if np.array_equal(state.memory.image[i], img)
        )
        np.testing.assert_array_equal(lab, np.asarray(state.memory.label[i]))

    def wrong(images, class_id):
        return np.zeros((1, SIZE, SIZE), np.uint8)

    bad = recall.make(_cfg(), env, labeler=wrong)
    with pytest.raises(ValueError, match=r"recall labeler: class 1 must give"):
        bad.before_phase(params, stats, bad.init(params, stats), PHASES[1])


def test_folder_spec_feeds_the_memory(model, tmp_path):
    forward, params, stats = model
    for c in (1, 2):
        (tmp_path / str(c)).mkdir()
        for j in range(2):
            _save(tmp_path / str(c) / f"{j}.png", np.full((20, 24, 3), 40 * c + j))
    strategy = recall.make(_cfg(recall_source=f"folder:{tmp_path}"), _env(forward))
    _, state = strategy.before_phase(params, stats, strategy.init(params, stats), PHASES[2])
    images, labels = np.asarray(state.memory.image), np.asarray(state.memory.label)
    for c in (1, 2):
        values = set(np.unique(images[labels == c]).tolist())
        assert values == {40 * c, 40 * c + 1}  # both files of the class, nothing else


def test_step_compiles_once_over_phases(model):
    forward, params, stats = model
    # A memory size no other test uses: shapes first seen here, so every compile is counted.
    strategy = recall.make(_cfg(recall_replay_batch=2, recall_per_class=3), _env(forward))
    tx = optax.sgd(0.05)
    params, stats = jax.tree.map(jnp.copy, (params, stats))
    state = step_lib.TrainState(params, stats, tx.init(params), jnp.array(0, jnp.int32))
    sstate = strategy.init(params, stats)
    sig = tiny.signature(sstate)
    step = jax.jit(step_lib.make_train_step(forward, strategy, tx))
    batch = tiny.batch(n=2, size=SIZE, classes=K)
    compiles = []
    for phase in PHASES:
        with compiles_lib.Counter() as counter:
            params, sstate = strategy.before_phase(state.params, state.batch_stats, sstate, phase)
            state = state._replace(params=params)
            metrics, monitor = step_lib.TrainMetrics.empty(), step_lib.new_monitor()
            for _ in range(2):
                state, sstate, metrics, monitor = step(
                    state,
                    sstate,
                    metrics,
                    monitor,
                    batch,
                    jax.random.PRNGKey(0),
                    jnp.asarray(phase.class_mask),
                )
            sstate = strategy.after_phase(state.params, state.batch_stats, sstate, phase)
            jax.block_until_ready((state, sstate))
        compiles.append(counter.count)
        assert tiny.signature(sstate) == sig
        assert np.isfinite(float(metrics.compute()["loss"])) and int(monitor.first_bad_step) == -1
    assert compiles[0] > 0 and compiles[1:] == [0, 0], compiles
