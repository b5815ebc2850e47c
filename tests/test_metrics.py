"""Tests for clseg_jax.metrics against loop references and hand-computed numbers."""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clseg_jax import metrics, results, tasks
from clseg_jax.strategies import base

# Hand example (K = 3), one image of 2x4 pixels:
#   labels [[0, 0, 1, 1], [2, 2, 255, 1]]
#   preds  [[0, 1, 1, 1], [2, 0,   0, 2]]
# (gt, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (ignored) (1,2)
#   conf = [[1, 1, 0],     gt 0
#           [0, 2, 1],     gt 1
#           [1, 0, 1]]     gt 2
# class 0: TP 1, FP (1+0+1)-1 = 1, FN 2-1 = 1 -> 1/3
# class 1: TP 2, FP (1+2+0)-2 = 1, FN 3-2 = 1 -> 2/4 = 1/2
# class 2: TP 1, FP (0+1+1)-1 = 1, FN 2-1 = 1 -> 1/3
# mIoU = (1/3 + 1/2 + 1/3) / 3 = 7/18
LABELS = np.array([[[0, 0, 1, 1], [2, 2, 255, 1]]])
PREDS = np.array([[[0, 1, 1, 1], [2, 0, 0, 2]]])
CONF = np.array([[1, 1, 0], [0, 2, 1], [1, 0, 1]])


def _confusion_loop(labels: np.ndarray, preds: np.ndarray, k: int) -> np.ndarray:
    conf = np.zeros((k, k), np.int64)
    for gt, pr in zip(labels.reshape(-1), preds.reshape(-1), strict=True):
        if 0 <= gt < k and 0 <= pr < k:
            conf[gt, pr] += 1
    return conf


def test_confusion_hand_example():
    conf = metrics.confusion(jnp.asarray(LABELS), jnp.asarray(PREDS), 3)
    assert conf.shape == (3, 3)
    assert conf.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(conf), CONF)


@pytest.mark.parametrize("method", ["bincount", "matmul"])
@pytest.mark.parametrize("dtype", [np.int32, np.uint8])
def test_confusion_matches_loop_reference(dtype, method):
    rng = np.random.default_rng(0)
    k = 21  # 20 * 21 > 255: catches uint8 overflow in label * K
    labels = rng.integers(0, k, size=(3, 9, 11))
    labels[rng.random(labels.shape) < 0.2] = 255
    labels[rng.random(labels.shape) < 0.05] = k + 1  # out of range -> ignored as well
    preds = rng.integers(0, k, size=labels.shape)
    labels, preds = labels.astype(dtype), preds.astype(dtype)
    preds[0, 0, :3] = k + 2  # predicted out of range: ignored, not wrapped
    got = np.asarray(metrics.confusion(jnp.asarray(labels), jnp.asarray(preds), k, method))
    want = _confusion_loop(labels.astype(np.int64), preds.astype(np.int64), k)
    np.testing.assert_array_equal(got, want)
    assert got.sum() == np.sum((labels < k) & (preds < k))
    with pytest.raises(ValueError, match="unknown confusion method 'scatter'"):
        metrics.confusion(jnp.asarray(labels), jnp.asarray(preds), k, "scatter")


def test_confusion_under_jit():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=(2, 6, 5))
    labels[0, 0, :] = 255
    preds = rng.integers(0, 4, size=labels.shape)
    step = jax.jit(metrics.confusion, static_argnums=2)
    got = np.asarray(step(jnp.asarray(labels), jnp.asarray(preds), 4))
    np.testing.assert_array_equal(got, _confusion_loop(labels, preds, 4))


def test_iou_and_miou_hand_example():
    np.testing.assert_allclose(metrics.iou_per_class(CONF), [1 / 3, 1 / 2, 1 / 3])
    assert metrics.miou(CONF) == pytest.approx(7 / 18)
    # Class subsets: {1, 2} -> (1/2 + 1/3) / 2 = 5/12.
    assert metrics.miou(CONF, [1, 2]) == pytest.approx(5 / 12)


def test_empty_union_classes_are_excluded():
    # Same data with K = 4: class 3 never appears in gt nor in predictions.
    conf = np.zeros((4, 4), np.int64)
    conf[:3, :3] = CONF
    iou = metrics.iou_per_class(conf)
    assert math.isnan(iou[3])
    assert metrics.miou(conf) == pytest.approx(7 / 18)
    assert metrics.miou(conf, [1, 3]) == pytest.approx(1 / 2)
    assert math.isnan(metrics.miou(conf, [3]))
    assert math.isnan(metrics.miou(np.zeros((3, 3))))


def test_class_with_gt_but_no_prediction_scores_zero():
    # Class 1 is in gt but never predicted: union 2, TP 0 -> IoU 0 (not NaN).
    conf = np.array([[3, 0], [2, 0]])
    np.testing.assert_allclose(metrics.iou_per_class(conf), [3 / 5, 0.0])


# Hand-made accuracy matrix, R[i][j] = mIoU on experience j after training on i:
R3 = [
    [0.8, 0.1, 0.0],
    [0.6, 0.7, 0.2],
    [0.5, 0.6, 0.9],
]
INIT = [0.05, 0.05, 0.1]


def test_cl_summary_hand_example():
    s = metrics.cl_summary(R3, INIT)
    # avg_miou: (0.5 + 0.6 + 0.9) / 3 = 2/3
    assert s["avg_miou"] == pytest.approx(2 / 3)
    # forgetting: j=0: max(0.8, 0.6) - 0.5 = 0.3; j=1: max(0.1, 0.7) - 0.6 = 0.1 -> 0.2
    assert s["forgetting"] == pytest.approx(0.2)
    # bwt: j=0: 0.5 - 0.8 = -0.3; j=1: 0.6 - 0.7 = -0.1 -> -0.2
    assert s["bwt"] == pytest.approx(-0.2)
    # fwt: j=1: R[0][1] - 0.05 = 0.05; j=2: R[1][2] - 0.1 = 0.1 -> 0.075
    assert s["fwt"] == pytest.approx(0.075)
    # avg_diag: (0.8 + 0.7 + 0.9) / 3 = 0.8
    assert s["avg_diag"] == pytest.approx(0.8)
    # avg_incremental: mean(0.8, (0.6+0.7)/2 = 0.65, (0.5+0.6+0.9)/3 = 2/3) = 0.705555...
    assert s["avg_incremental"] == pytest.approx((0.8 + 0.65 + 2 / 3) / 3)
    assert all(isinstance(v, float) for v in s.values())


def test_cl_summary_without_initial_row_has_no_fwt():
    s = metrics.cl_summary(np.asarray(R3))
    assert s["fwt"] is None
    assert s["bwt"] == pytest.approx(-0.2)


def test_cl_summary_skips_nan_entries():
    r = np.array(R3)
    r[2, 0] = np.nan  # experience 0 had no defined IoU at the end
    s = metrics.cl_summary(r)
    # avg_miou: (0.6 + 0.9) / 2 = 0.75; forgetting/bwt only from j=1: 0.1 and -0.1
    assert s["avg_miou"] == pytest.approx(0.75)
    assert s["forgetting"] == pytest.approx(0.1)
    assert s["bwt"] == pytest.approx(-0.1)


def test_cl_summary_joint_one_row():
    s = metrics.cl_summary([[0.5, 0.7, 0.6]], initial_row=[0.0, 0.0, 0.0])
    assert s["avg_miou"] == pytest.approx(0.6)
    for key in ("forgetting", "bwt", "fwt", "avg_diag", "avg_incremental"):
        assert s[key] is None, key


def test_cl_summary_single_experience():
    s = metrics.cl_summary([[0.7]], initial_row=[0.1])
    assert s["avg_miou"] == pytest.approx(0.7)
    assert s["avg_diag"] == pytest.approx(0.7)
    assert s["avg_incremental"] == pytest.approx(0.7)
    assert s["forgetting"] is None and s["bwt"] is None and s["fwt"] is None


def test_cl_summary_rejects_bad_shapes():
    with pytest.raises(ValueError):
        metrics.cl_summary([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]])
    with pytest.raises(ValueError):
        metrics.cl_summary(R3, initial_row=[0.0, 0.0])


def test_old_new_all_hand_example():
    # IoUs from CONF: [1/3, 1/2, 1/3]; old = {1} + background 0, new = {2}.
    out = metrics.old_new_all(CONF, old_classes=[1], new_classes=[2])
    assert out["old"] == pytest.approx((1 / 3 + 1 / 2) / 2)  # 5/12
    assert out["new"] == pytest.approx(1 / 3)
    assert out["all"] == pytest.approx(7 / 18)
    # Background listed as new is still counted as old.
    assert metrics.old_new_all(CONF, [1], [0, 2]) == pytest.approx(out)
    # Without the background rule the groups are taken as given.
    plain = metrics.old_new_all(CONF, [1], [2], background=None)
    assert plain["old"] == pytest.approx(1 / 2)
    assert plain["all"] == pytest.approx(5 / 12)


def test_beats_reference_hand_example():
    naive = [[0.9, 0.1], [0.3, 0.9]]  # forgetting 0.6, avg 0.6, diag 0.9
    good = [[0.9, 0.2], [0.7, 0.86]]  # forgetting 0.2, avg 0.78, diag 0.88
    v = metrics.beats_reference(good, naive)
    assert v["passes"] and v["forgetting"] == pytest.approx(0.2)
    assert v["ref_avg_miou"] == pytest.approx(0.6)
    # Learns too little on the new experience: diag 0.8 < 0.9 - 0.05.
    assert not metrics.beats_reference([[0.9, 0.2], [0.8, 0.7]], naive)["passes"]
    # Frozen: the first row repeated forgets nothing but ends below the reference.
    assert not metrics.beats_reference([[0.9, 0.1], [0.9, 0.1]], naive)["passes"]
    # Forgets as much as the reference.
    assert not metrics.beats_reference(naive, naive)["passes"]
    with pytest.raises(ValueError, match="square"):
        metrics.beats_reference([[0.9, 0.1]], naive)


def test_class_forgetting_by_hand():
    # IoU per phase (rows) and class (columns); class 2 is new in the last phase.
    S = [[0.9, 0.8, np.nan], [0.95, 0.5, np.nan], [0.85, 0.6, 0.7]]
    # class 0: max(0.9, 0.95) - 0.85 = 0.10; class 1: max(0.8, 0.5) - 0.6 = 0.20 -> 0.15
    assert metrics.class_forgetting(S, [0, 1]) == pytest.approx(0.15)
    # A class absent before the last phase has nothing to forget; one phase has no sequence.
    assert metrics.class_forgetting(S, [0, 1, 2]) == pytest.approx(0.15)
    assert metrics.class_forgetting(S[:1], [0, 1]) is None


def _conf(counts: dict[tuple[int, int], int], k: int = 3) -> list[list[int]]:
    """A ``[k,k]`` confusion from ``{(ground truth, prediction): pixels}``."""
    conf = np.zeros((k, k), np.int64)
    for (gt, pred), n in counts.items():
        conf[gt, pred] = n
    return conf.tolist()


def test_class_incremental_forgetting_is_per_class_where_the_matrix_would_mislead():
    """Background 0, old class 1 (experience 0), new class 2 (experience 1); a model that learns
    class 2 perfectly and forgets nothing. Experience 0's images also hold 10 pixels of class 2,
    background when experience 0 was scored first and still scored with experience 0's classes
    in R[1][0] (the accuracy matrix's rule): the new class's correct pixels count against it."""
    rows = [
        [  # after phase 0: perfect on classes 0-1, class 2 predicted as background
            _conf({(0, 0): 70, (1, 1): 30}),  # experience 0, class 2's pixels labelled 0
            _conf({(0, 0): 60, (2, 0): 40}),  # experience 1, scored with classes 0-2
        ],
        [  # after phase 1: perfect on every class
            _conf({(0, 0): 60, (0, 2): 10, (1, 1): 30}),  # class 2 correct, counted as wrong
            _conf({(0, 0): 60, (2, 2): 40}),
        ],
    ]
    full = [  # the full test set (both experiences' images), labels of the classes seen so far
        _conf({(0, 0): 170, (1, 1): 30}),
        _conf({(0, 0): 120, (1, 1): 30, (2, 2): 50}),
    ]
    stream = types.SimpleNamespace(
        name="hand",
        kind="class",
        num_classes=3,
        class_names=("background", "old", "new"),
        experiences=[
            types.SimpleNamespace(name=f"e{j}", classes=c) for j, c in enumerate([(1,), (2,)])
        ],
    )
    mask = lambda seen: np.isin(np.arange(3), seen)
    phases = [
        base.Phase(0, (0,), (0, 1), (0, 1), mask([0, 1]), None),
        base.Phase(1, (1,), (2,), (0, 1, 2), mask([0, 1, 2]), None),
    ]
    untrained = [_conf({(0, 0): 70, (1, 0): 30}), _conf({(0, 0): 60, (2, 0): 40})]
    progress = results.start()._replace(phase=2, rows=rows, initial_row=untrained, full=full)
    cfg = ml_collections.ConfigDict({"strategy": {"name": "hand"}})
    out = results.summarize(
        progress, config=cfg, stream=stream, phases=phases, task=tasks.SEGMENTATION, compile_count=0
    )
    # The matrix: R[0][0] = 1, R[1][0] = (60/70 + 1 + 0) / 3: 0.381 of "forgetting".
    assert out["forgetting_R"] == pytest.approx(1 - (60 / 70 + 1) / 3)
    # Per class on the full test set: background and class 1 keep IoU 1, nothing forgotten.
    assert out["forgetting"] == pytest.approx(0.0) and out["class_forgetting"] == out["forgetting"]
    assert out["forgetting_on"] == "old classes' IoU on the full test set"
    assert out["old_new_all"][-1] == pytest.approx({"old": 1.0, "new": 1.0, "all": 1.0})
