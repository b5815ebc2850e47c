"""Segmentation and continual-learning metrics.

Two layers:

* ``confusion`` runs on device (``jax.numpy``, jit-able) so a compiled eval step can accumulate a
  ``[K,K]`` confusion matrix per batch without shipping predictions to the host.
* Everything else runs on the host (``numpy``) over accumulated confusion matrices or over the
  accuracy matrix ``R`` of a continual-learning run, where ``R[i][j]`` is the mIoU on experience
  ``j``'s test set after training on experience ``i``.

IoU values are fractions in ``[0, 1]``; NaN marks "undefined" (a class never present in ground truth
nor predictions) and is skipped by every mean, as ``np.nanmean`` would.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IGNORE = 255


# How ``confusion`` counts, per backend: a scatter-add (bincount) or a one-hot matmul
# (experiments/bench_confusion.py; docs/scale.md has the numbers). On this CPU bincount won;
# accelerators run matmuls on their matrix units and serialise scatters.
CONFUSION_METHODS = ("bincount", "matmul")
_CONFUSION_BY_BACKEND = {"cpu": "bincount"}


def confusion(
    labels: jnp.ndarray, preds: jnp.ndarray, num_classes: int, method: str = "auto"
) -> jnp.ndarray:
    """Confusion matrix of one batch.

    Args:
      labels: ``[B,H,W]`` integer ground truth; ``255`` (or any value outside
        ``[0, num_classes)``) marks pixels to ignore.
      preds: ``[B,H,W]`` integer predictions; pixels predicted outside ``[0, num_classes)`` are
        ignored too rather than wrapped into another cell.
      num_classes: ``K`` (static under ``jit``).
      method: ``"bincount"``, ``"matmul"`` (``[K,N] @ [N,K]`` one-hot counts, exact in float32
        up to 2^24 pixels per cell and batch) or ``"auto"`` (by backend, above).

    Returns:
      ``[K,K]`` int32, rows = ground truth, columns = prediction.
    """
    if method == "auto":
        method = _CONFUSION_BY_BACKEND.get(jax.default_backend(), "matmul")
    if method not in CONFUSION_METHODS:
        raise ValueError(f"unknown confusion method {method!r}; valid: {list(CONFUSION_METHODS)}")
    k = int(num_classes)
    # Cast before multiplying: uint8 labels times K would overflow in uint8.
    labels = jnp.asarray(labels).astype(jnp.int32).reshape(-1)
    preds = jnp.asarray(preds).astype(jnp.int32).reshape(-1)
    valid = (labels >= 0) & (labels < k) & (preds >= 0) & (preds < k)
    if method == "matmul":
        # Out-of-range indices one-hot to all zeros; invalid pixels are zeroed on one side.
        rows = jax.nn.one_hot(jnp.where(valid, labels, -1), k, dtype=jnp.float32)
        cols = jax.nn.one_hot(preds, k, dtype=jnp.float32)
        counts = jnp.einsum("nk,nl->kl", rows, cols, precision=jax.lax.Precision.HIGHEST)
        return jnp.round(counts).astype(jnp.int32)
    # Invalid pixels still need an in-range index for bincount; their zero weight drops them.
    index = jnp.where(valid, labels * k + preds, 0)
    counts = jnp.bincount(index, weights=valid.astype(jnp.int32), length=k * k)
    return counts.astype(jnp.int32).reshape(k, k)


def iou_per_class(conf: Any) -> np.ndarray:
    """Per-class IoU from a confusion matrix.

    Args:
      conf: ``[K,K]`` confusion matrix (rows = ground truth, columns = prediction).

    Returns:
      ``[K]`` float64: ``TP / (TP + FP + FN)``; NaN where the union is empty (the class appears
      neither in ground truth nor in predictions).
    """
    conf = np.asarray(conf, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square [K,K], got {list(conf.shape)}")
    tp = np.diag(conf)
    union = conf.sum(axis=0) + conf.sum(axis=1) - tp
    iou = np.full(tp.shape, np.nan)
    np.divide(tp, union, out=iou, where=union > 0)
    return iou


def nanmean(values: Any) -> float:
    """``np.nanmean`` without the "mean of empty slice" warning; NaN when nothing is defined."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def miou(conf: Any, classes: Iterable[int] | None = None) -> float:
    """Mean IoU over ``classes`` (default: all ``K``) whose union is non-empty.

    Background (class 0) is an ordinary class here and is included when listed, as in the VOC
    protocol.

    Args:
      conf: ``[K,K]`` confusion matrix.
      classes: class ids to average over; ``None`` means ``range(K)``.

    Returns:
      The mean IoU as a Python float, NaN if no listed class has a non-empty union.
    """
    iou = iou_per_class(conf)
    if classes is None:
        return nanmean(iou)
    idx = np.asarray(sorted(set(int(c) for c in classes)), dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= iou.size):
        raise ValueError(f"class ids must lie in [0, {iou.size}), got {idx.tolist()}")
    return nanmean(iou[idx])


def accuracy(conf: Any) -> float:
    """Fraction of counted samples on the diagonal of a ``[K,K]`` confusion (NaN if empty)."""
    conf = np.asarray(conf, dtype=np.float64)
    total = conf.sum()
    return float(np.trace(conf) / total) if total > 0 else float("nan")


def average_precision(scores: Any, targets: Any) -> float:
    """Average precision of one class: ``sum_n (R_n - R_{n-1}) P_n`` over the distinct score
    thresholds in decreasing order (scikit-learn's definition; ties share one threshold).

    Args:
      scores: ``[N]`` float.
      targets: ``[N]`` 0/1.

    Returns NaN when there is no positive.
    """
    s = np.asarray(scores, np.float64).reshape(-1)
    y = np.asarray(targets).reshape(-1) == 1
    if not y.any():
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tp = tp[last]
    precision = tp / (last + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def average_precision_per_class(scores: Any, targets: Any) -> np.ndarray:
    """``[K]`` APs of ``scores [N,K]`` against multi-hot ``targets [N,K]`` (NaN: no positive)."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    return np.array(
        [average_precision(scores[:, k], targets[:, k]) for k in range(scores.shape[1])]
    )


def _opt(value: float | None) -> float | None:
    return None if value is None else float(value)


def cl_summary(R: Any, initial_row: Sequence[float] | None = None) -> dict[str, float | None]:
    """Continual-learning summary of an accuracy matrix.

    ``R[i][j]`` is the mIoU on experience ``j`` after training on experience ``i``. ``R`` is
    either square ``[T,T]`` (one row per training experience) or a single row ``[1,T]`` (joint
    training, evaluated once on every experience). Let ``L = R[T-1]`` be the last row.

    Definitions (each mean skips NaN entries, as ``np.nanmean``; all-NaN gives NaN):

    * ``avg_miou`` = mean_j L[j], the final average mIoU over experiences.
    * ``forgetting`` = mean_{j<T-1} ( max_{i<T-1} R[i][j] - L[j] ) (Chaudhry et al. 2018).
    * ``bwt`` = mean_{j<T-1} ( L[j] - R[j][j] ), backward transfer (Lopez-Paz & Ranzato 2017).
    * ``fwt`` = mean_{j>0} ( R[j-1][j] - initial_row[j] ), forward transfer, where
      ``initial_row[j]`` is the mIoU on experience ``j`` of the model before any training.
    * ``avg_diag`` = mean_i R[i][i], accuracy on each experience right after learning it.
    * ``avg_incremental`` = mean_i ( mean_{j<=i} R[i][j] ), the average incremental accuracy
      (Rebuffi et al. 2017).

    For a one-row ``R`` (joint) or ``T == 1`` there is no sequence to forget or transfer along, so
    ``forgetting``, ``bwt`` and ``fwt`` are ``None``; ``fwt`` is also ``None`` without
    ``initial_row``. ``avg_diag`` and ``avg_incremental`` need one row per experience, so they are
    ``None`` for a one-row ``R`` with ``T > 1``.

    Args:
      R: ``[T,T]`` or ``[1,T]`` accuracy matrix (list of lists or array; ``None`` entries count
        as NaN).
      initial_row: ``[T]`` mIoU of the untrained model on each experience, or ``None``.

    Returns:
      Dict with keys ``avg_miou``, ``forgetting``, ``bwt``, ``fwt``, ``avg_diag``,
      ``avg_incremental`` (floats, NaN, or ``None``).
    """
    R = np.array(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[1] == 0:
        raise ValueError(f"R must be a non-empty [T,T] or [1,T] matrix, got {list(R.shape)}")
    rows, t = R.shape
    if rows != t and rows != 1:
        raise ValueError(f"R must be [T,T] or [1,T] (joint), got {list(R.shape)}")
    last = R[-1]
    out: dict[str, float | None] = {
        "avg_miou": nanmean(last),
        "forgetting": None,
        "bwt": None,
        "fwt": None,
        "avg_diag": None,
        "avg_incremental": None,
    }
    if rows != t:  # joint training: one evaluation, no sequence
        return out

    out["avg_diag"] = nanmean(np.diag(R))
    out["avg_incremental"] = nanmean([nanmean(R[i, : i + 1]) for i in range(t)])
    if t == 1:
        return out

    before = R[:-1, :-1]  # rows i < T-1, columns j < T-1
    # An all-NaN column has no defined max; leave it NaN so the outer mean skips it.
    best = np.full(t - 1, np.nan)
    for j in range(t - 1):
        col = before[:, j][~np.isnan(before[:, j])]
        if col.size:
            best[j] = col.max()
    out["forgetting"] = nanmean(best - last[:-1])
    out["bwt"] = nanmean(last[:-1] - np.diag(R)[:-1])
    if initial_row is not None:
        init = np.array(initial_row, dtype=np.float64).reshape(-1)
        if init.size != t:
            raise ValueError(f"initial_row must have {t} entries, got {init.size}")
        out["fwt"] = nanmean([R[j - 1, j] - init[j] for j in range(1, t)])
    return {k: _opt(v) for k, v in out.items()}


def class_forgetting(per_class: Any, old_classes: Iterable[int]) -> float | None:
    """Forgetting per class on one test set: MiB/PLOP's view of class-incremental segmentation.

    For each old class ``c``: its best score before the last phase minus its last score,
    ``max_{i<P-1} S[i][c] - S[P-1][c]``, averaged over the old classes (NaN entries, a class not
    yet seen or absent from the test set, are skipped). Unlike the accuracy-matrix forgetting it
    does not count a correctly learnt new class against the test set of an earlier experience
    (whose new-class pixels were background when it was scored first).

    Args:
      per_class: ``[P,K]`` per-class scores (IoU) after each phase on the same test set.
      old_classes: the classes seen before the last phase (background included).

    Returns:
      The mean over old classes, NaN if none has a defined score in both, ``None`` with one phase.
    """
    S = np.asarray(per_class, dtype=np.float64)
    if S.ndim != 2:
        raise ValueError(f"per_class must be [P,K], got {list(S.shape)}")
    if S.shape[0] < 2:
        return None
    old = sorted({int(c) for c in old_classes})
    before, last = S[:-1][:, old], S[-1][old]
    best = np.full(len(old), np.nan)
    seen = ~np.isnan(before).all(axis=0)
    best[seen] = np.nanmax(before[:, seen], axis=0)
    return nanmean(best - last)


def old_new_all(
    conf: Any,
    old_classes: Iterable[int],
    new_classes: Iterable[int],
    background: int | None = 0,
) -> dict[str, float]:
    """mIoU over old, new and all seen classes, as in MiB-style tables.

    Args:
      conf: ``[K,K]`` confusion matrix.
      old_classes: classes learned in earlier experiences.
      new_classes: classes introduced by the current experience.
      background: class id counted with the *old* classes (added there and removed from the new
        ones), as MiB tables report ``0-15 | 16-20`` with background in the first group; ``None``
        to use the given sets unchanged.

    Returns:
      ``{"old": ..., "new": ..., "all": ...}`` floats (NaN where a group has no defined IoU),
      ``all`` being the union of both groups.
    """
    old = {int(c) for c in old_classes}
    new = {int(c) for c in new_classes}
    if background is not None:
        old.add(int(background))
        new.discard(int(background))
    return {
        "old": miou(conf, old),
        "new": miou(conf, new),
        "all": miou(conf, old | new),
    }


def beats_reference(R: Any, R_ref: Any, plasticity_tolerance: float = 0.05) -> dict[str, Any]:
    """Does a method forget less than a reference (e.g. naive) *and* still learn?

    The stability-plasticity criterion of the behaviour tests: ``forgetting < reference's``,
    final average ``>= reference's`` and ``avg_diag >= reference's - plasticity_tolerance``. A
    frozen model fails on the final average; an over-regularised one on ``avg_diag``.

    Args:
      R, R_ref: ``[T,T]`` accuracy matrices of the method and the reference on the same stream.
      plasticity_tolerance: how far below the reference's ``avg_diag`` the method may learn.

    Returns:
      ``{"passes": bool}`` plus ``avg_miou``, ``avg_diag``, ``forgetting`` of both (the
      reference's with a ``ref_`` prefix).
    """
    s, ref = cl_summary(R), cl_summary(R_ref)
    if s["forgetting"] is None or ref["forgetting"] is None:
        raise ValueError("beats_reference needs square [T,T] matrices with T >= 2")
    keys = ("avg_miou", "avg_diag", "forgetting")
    out: dict[str, Any] = {k: s[k] for k in keys} | {f"ref_{k}": ref[k] for k in keys}
    out["passes"] = bool(
        s["forgetting"] < ref["forgetting"]
        and s["avg_miou"] >= ref["avg_miou"]
        and s["avg_diag"] >= ref["avg_diag"] - plasticity_tolerance
    )
    return out
