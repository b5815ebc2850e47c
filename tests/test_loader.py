"""grain pipelines: paired augmentation, background shift, resumable order, no dropped eval rows."""

from __future__ import annotations

import numpy as np

from clseg_jax.data import base, loader


def _source(n=10, size=8, classes=4):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, (n, size, size)).astype(np.uint8)
    # The image encodes its own label and index, so pairing can be checked after augmentation.
    images = np.stack([labels, labels, np.full_like(labels, 0)], -1).astype(np.uint8)
    for i in range(n):
        images[i, ..., 2] = i
    return base.ArraySource(images, labels, "toy")


def test_augmentation_keeps_image_and_label_paired():
    src = _source()
    ds = loader.train_dataset(
        src, np.ones(4, bool), global_batch=2, epochs=3, seed=1, crop=5, flip=True
    )
    flipped = False
    for batch in ds:
        assert batch["image"].shape == (2, 5, 5, 3) and batch["label"].shape == (2, 5, 5)
        np.testing.assert_array_equal(batch["image"][..., 0], batch["label"])
        for img, lab in zip(batch["image"], batch["label"], strict=True):
            full = src.labels[img[0, 0, 2]]
            windows = [full[t : t + 5, x : x + 5] for t in range(4) for x in range(4)]
            assert any((w == lab).all() for w in windows) or any(
                (w[:, ::-1] == lab).all() for w in windows
            )
            flipped |= not any((w == lab).all() for w in windows)
    assert flipped


def test_epochs_reshuffle_and_seed_determines_order():
    src = _source(n=8)
    order = lambda seed: [
        int(b["image"][0, 0, 0, 2])
        for b in loader.train_dataset(src, np.ones(4, bool), global_batch=1, epochs=2, seed=seed)
    ]
    a = order(3)
    assert a == order(3) and a != order(4)
    assert sorted(a[:8]) == list(range(8)) and a[:8] != a[8:]


def test_iterator_state_resumes_identically():
    src = _source(n=10)
    ds = loader.train_dataset(src, np.ones(4, bool), global_batch=2, epochs=2, seed=0, flip=True)
    it = iter(ds.to_iter_dataset())
    for _ in range(3):
        next(it)
    state = it.get_state()
    rest = [b["image"] for b in it]
    again = iter(ds.to_iter_dataset())
    again.set_state(state)
    for a, b in zip(rest, again, strict=True):
        np.testing.assert_array_equal(a, b["image"])


def test_background_shift_in_training():
    src = _source()
    visible = np.array([True, True, False, False])  # classes 2, 3 not in this step
    for batch in loader.train_dataset(src, visible, global_batch=2, epochs=1, seed=0):
        assert set(np.unique(batch["label"])) <= {0, 1}


def test_eval_keeps_every_row_once_across_processes():
    src = _source(n=11)
    seen = []
    for p in range(2):
        for batch in loader.eval_batches(
            src, np.ones(4, bool), global_batch=4, process_index=p, process_count=2
        ):
            assert batch["image"].shape[0] == 2
            valid = (batch["label"] != base.IGNORE).any(axis=(1, 2))
            seen += [int(i) for i in batch["image"][valid, 0, 0, 2]]
            assert (batch["label"][~valid] == base.IGNORE).all()
    assert sorted(seen) == list(range(11))


def test_train_split_across_processes_partitions_the_global_batch():
    src = _source(n=12)
    rows = [
        [
            int(i)
            for b in loader.train_dataset(
                src,
                np.ones(4, bool),
                global_batch=4,
                epochs=1,
                seed=0,
                process_index=p,
                process_count=2,
            )
            for i in b["image"][:, 0, 0, 2]
        ]
        for p in range(2)
    ]
    assert len(rows[0]) == len(rows[1]) == 6
    assert sorted(rows[0] + rows[1]) == list(range(12))
    # Global batch b is process 0's rows then process 1's, in the one-process order.
    one = [
        [int(i) for i in b["image"][:, 0, 0, 2]]
        for b in loader.train_dataset(src, np.ones(4, bool), global_batch=4, epochs=1, seed=0)
    ]
    assert [rows[0][2 * b : 2 * b + 2] + rows[1][2 * b : 2 * b + 2] for b in range(3)] == one


def test_workers_and_device_prefetch_feed_the_same_batches_and_resume_where_taken():
    """``data.feed``: grain worker processes and the read-ahead thread change who reads, not
    what: the same global batches in the same order; the state after k batches taken (others
    already read ahead) resumes at batch k."""
    import jax

    from clseg_jax import sharding
    from clseg_jax.data import feed

    src = _source(n=24)
    ds = loader.train_dataset(
        src, np.ones(4, bool), global_batch=4, epochs=2, seed=3, crop=6, flip=True
    )
    placed = sharding.batch_sharding(sharding.make_mesh((("data", -1),)))

    def images(it, k=None):
        out = []
        for b in it:
            assert isinstance(b["image"], jax.Array) and b["image"].sharding == placed
            out.append(np.asarray(b["image"]))
            if k is not None and len(out) == k:
                break
        return out

    plain = images(feed.iterate(ds, placed, prefetch=0))
    assert len(plain) == len(ds) == 12
    for workers, prefetch in ((0, 2), (2, 3)):
        it = feed.iterate(ds, placed, workers=workers, prefetch=prefetch)
        head = images(it, k=5)
        state = it.get_state()
        rest = images(it)
        it.close()
        np.testing.assert_array_equal(np.stack(head + rest), np.stack(plain))
        again = feed.iterate(ds, placed, workers=workers, prefetch=prefetch)
        again.set_state(state)
        np.testing.assert_array_equal(np.stack(images(again)), np.stack(plain[5:]))
        again.close()
