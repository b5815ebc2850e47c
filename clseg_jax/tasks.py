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

from collections.abc import Callable
from typing import NamedTuple

import jax

from clseg_jax import losses


class Task(NamedTuple):
    """Attributes:
    name: "segmentation", "classification" or "multilabel".
    metric: what the accuracy matrix holds: "miou", "accuracy" or "map".
    loss: ``loss(masked_logits, labels, class_mask) -> scalar``; masked logits are ``NEG``
      outside ``class_mask``.
    accuracy: ``accuracy(masked_logits, labels, class_mask) -> scalar``, logged while training.
    """

    name: str
    metric: str
    loss: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
    accuracy: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _softmax_ce(logits, labels, class_mask):
    del class_mask  # already in the logits
    return losses.cross_entropy(logits, labels)


def _argmax_accuracy(logits, labels, class_mask):
    del class_mask
    return losses.pixel_accuracy(logits, labels)


SEGMENTATION = Task("segmentation", "miou", _softmax_ce, _argmax_accuracy)
CLASSIFICATION = Task("classification", "accuracy", _softmax_ce, _argmax_accuracy)
MULTILABEL = Task("multilabel", "map", losses.binary_cross_entropy, losses.multilabel_accuracy)


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
