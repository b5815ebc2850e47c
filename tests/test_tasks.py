"""Classification and multi-label tasks: losses and metrics vs hand computations, and short runs
of both kinds of stream through the trainer."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from clseg_jax import data, evaluate, losses, metrics, models, sharding, tasks, train
from clseg_jax import step as step_lib
from clseg_jax.data import base
from clseg_jax.data import phases as phases_lib
from configs import multilabel_digits, split_digits


def test_binary_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 5)) * 3
    y = rng.integers(0, 2, (4, 5)).astype(np.uint8)
    y[3] = 255  # a padding row
    mask = np.array([True, True, False, True, True])
    p = 1 / (1 + np.exp(-x))
    per = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    keep = (y != 255) & mask
    want = per[keep].mean()
    got = losses.binary_cross_entropy(jnp.asarray(x, jnp.float32), jnp.asarray(y), mask)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_average_precision_by_hand():
    # Ranked: 0.9 (+), 0.8 (-), 0.7 (+), 0.1 (-): AP = 1/2 * 1 + 1/2 * 2/3.
    assert metrics.average_precision([0.1, 0.9, 0.7, 0.8], [0, 1, 1, 0]) == pytest.approx(5 / 6)
    # A tie between a positive and a negative is one threshold: precision 1/2 at recall 1.
    assert metrics.average_precision([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    assert np.isnan(metrics.average_precision([0.3, 0.2], [0, 0]))


def test_visible_labels_of_each_kind():
    visible = np.array([True, False, True])
    np.testing.assert_array_equal(
        base.visible_labels(np.array([[1, 2], [255, 0]], np.uint8), visible), [[0, 2], [255, 0]]
    )
    np.testing.assert_array_equal(
        base.visible_labels(np.array([1, 1, 255], np.uint8), visible), [1, 0, 255]
    )
    assert base.visible_labels(np.array(1, np.uint8), visible) == 1  # no background to fall into


def test_task_for_stream():
    assert tasks.for_stream("class", ()) is tasks.CLASSIFICATION
    assert tasks.for_stream("multilabel", (10,)) is tasks.MULTILABEL
    assert tasks.for_stream("domain", (8, 8)) is tasks.SEGMENTATION
    with pytest.raises(ValueError, match="labels of shape"):
        tasks.for_stream("class", (10,))


def _tiny(cfg):
    cfg.progress = False
    cfg.log.tensorboard = False
    cfg.data.train_per_exp = 32
    cfg.data.test_per_exp = 16
    cfg.epochs = 1
    cfg.eval_batch_size = 16
    return cfg


def test_split_digits_reports_class_and_task_incremental(tmp_path):
    cfg = _tiny(split_digits.get_config())
    cfg.data.classes_per_step = (5, 5)
    r = train.run(cfg, str(tmp_path))
    assert r["metric"] == "accuracy" and r["task"] == "classification"
    R, R_task = np.array(r["accuracy_matrix"]), np.array(r["task_il"]["accuracy_matrix"])
    assert R.shape == R_task.shape == (2, 2)
    # Class-IL: an unseen experience's classes are masked out, so it scores 0; task-IL cannot
    # be worse than class-IL on a seen experience (fewer classes to confuse).
    assert R[0, 1] == 0 and np.all(R_task[1] >= R[1] - 1e-9)
    # The final average under its own name (avg_miou: a deprecated alias for one release).
    assert r["avg_accuracy"] == pytest.approx(R[-1].mean()) and r["avg_miou"] == r["avg_accuracy"]
    assert r["forgetting_on"] == "accuracy matrix" and "avg_map" not in r


def test_multilabel_digits_reports_map(tmp_path):
    cfg = _tiny(multilabel_digits.get_config())
    r = train.run(cfg, str(tmp_path))
    assert r["metric"] == "map" and r["task"] == "multilabel"
    R = np.array(r["accuracy_matrix"])
    assert r["avg_map"] == pytest.approx(np.nanmean(R[-1])) and r["avg_miou"] == r["avg_map"]
    assert R.shape == (3, 3) and np.all((R >= 0) & (R <= 1))
    assert len(r["per_class"][0]) == 10
    # Overall mAP after phase 0: the seen classes are task 0's, the images task 0's test set.
    assert len(r["overall_map"]) == 3
    assert r["overall_map"][0] == pytest.approx(R[0, 0], abs=1e-9)


def test_overall_map_counts_an_image_in_two_task_sets_once():
    cfg = _tiny(multilabel_digits.get_config())
    cfg.model.kwargs.widths = (4, 8, 8, 8)
    stream = data.make(cfg.data)
    graphdef, params, stats = models.init(cfg.model, stream.num_classes, seed=0)
    ev = evaluate.make(
        step_lib.make_forward(graphdef),
        stream,
        sharding.make_mesh((("data", -1),)),
        16,
        tasks.MULTILABEL,
    )
    classes = stream.experiences[0].classes
    once = ev.overall_map(params, stats, [0], classes)
    assert ev.overall_map(params, stats, [0, 0], classes) == pytest.approx(once, abs=1e-12)
    assert once == pytest.approx(ev.score(ev.average_precisions(params, stats, 0), 0), abs=1e-12)


def test_task_incremental_training_masks_each_phase_to_its_classes():
    cfg = split_digits.get_config("task_il")
    stream = data.make(cfg.data)
    schedule = tuple((i,) for i in range(5))
    for p, e in zip(phases_lib.make(stream, schedule, True), stream.experiences, strict=True):
        assert np.flatnonzero(p.class_mask).tolist() == list(e.classes)
    class_il = phases_lib.make(stream, schedule)
    assert np.flatnonzero(class_il[2].class_mask).tolist() == list(range(6))
