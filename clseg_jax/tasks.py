"""What a stream asks the model to predict, and how that is scored.

- ``segmentation``: a class per pixel; softmax cross-entropy; mIoU from a confusion matrix.
- ``classification``: one class per image (labels ``[B]``); softmax cross-entropy; accuracy from a
  confusion matrix. A class-incremental stream is also scored task-incrementally on request
  (``config.eval_task_il``): each experience's test set with the logits masked to its own classes.
- ``multilabel``: several classes per image (multi-hot ``[B,K]``); per-class sigmoid and binary
  cross-entropy over the classes the model may predict; mean average precision per task.

Labels equal to 255 are ignored everywhere (padding rows, unlabelled pixels or entries).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np

from clseg_jax import losses, metrics


class Task(NamedTuple):
    """Attributes:
    name: "segmentation", "classification" or "multilabel".
    metric: what the accuracy matrix holds: "miou", "accuracy" or "map".
    loss: ``loss(masked_logits, labels, class_mask) -> scalar``; masked logits are ``NEG``
      outside ``class_mask``.
    accuracy: ``accuracy(masked_logits, labels, class_mask) -> scalar``, logged while training.
    per_class: ``per_class(stat) -> [K]`` float, from one test set's statistic (a ``[K,K]``
      confusion, or ``[K]`` APs for multi-label): IoU, recall or AP per class (NaN if absent).
    score: ``score(stat, own_classes) -> float``, the accuracy-matrix entry of a statistic;
      ``own_classes`` are the experience's own classes (multi-label averages APs over them).
    statistic: what one test set's statistic is, so which ``evaluate.EVALUATORS`` entry scores
      it: "confusion" (``[K,K]``, added up batch by batch) or "ap" (``[K]`` average precisions
      from every score of the set).
    """

    name: str
    metric: str
    loss: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
    accuracy: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
    per_class: Callable[[np.ndarray], np.ndarray]
    score: Callable[[np.ndarray, Sequence[int]], float]
    statistic: str


def _softmax_ce(logits, labels, class_mask):
    del class_mask  # already in the logits
    return losses.cross_entropy(logits, labels)


def _argmax_accuracy(logits, labels, class_mask):
    del class_mask
    return losses.pixel_accuracy(logits, labels)


def _recall_per_class(conf: np.ndarray) -> np.ndarray:
    conf = np.asarray(conf, np.float64)
    total = conf.sum(axis=1)
    out = np.full(len(conf), np.nan)
    np.divide(np.diag(conf), total, out=out, where=total > 0)
    return out


SEGMENTATION = Task(
    "segmentation",
    "miou",
    _softmax_ce,
    _argmax_accuracy,
    per_class=metrics.iou_per_class,
    score=lambda conf, own: metrics.miou(conf),
    statistic="confusion",
)
CLASSIFICATION = Task(
    "classification",
    "accuracy",
    _softmax_ce,
    _argmax_accuracy,
    per_class=_recall_per_class,
    score=lambda conf, own: metrics.accuracy(conf),
    statistic="confusion",
)
MULTILABEL = Task(
    "multilabel",
    "map",
    losses.binary_cross_entropy,
    losses.multilabel_accuracy,
    per_class=np.asarray,
    score=lambda aps, own: metrics.nanmean(np.asarray(aps)[list(own)]),
    statistic="ap",
)


def for_stream(kind: str, label_shape: tuple[int, ...]) -> Task:
    """The task of a stream from its kind and one label's shape."""
    if kind == "multilabel":
        return MULTILABEL
    if len(label_shape) == 0:
        return CLASSIFICATION
    if len(label_shape) == 2:
        return SEGMENTATION
    raise ValueError(
        f"labels of shape {list(label_shape)} in a {kind!r} stream; valid: [H,W] masks, [] class "
        "ids, or [K] multi-hot in a 'multilabel' stream"
    )
