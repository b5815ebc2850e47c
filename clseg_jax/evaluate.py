"""Compiled evaluation: one statistic per test set, accumulated on device.

Segmentation and classification: the eval step adds one batch's ``[K,K]`` confusion to a running
matrix that stays on device; the host reads it once per test set. Multi-label: the step returns
sigmoid scores, kept on device until the test set ends; the host then reads them once and computes
each class's average precision. Padded rows carry ignore labels, so every example counts once.

A strategy with its own evaluation rule (``Strategy.predict``, e.g. iCaRL's nearest mean of
exemplars) scores from the eval-mode outputs and its state; the state is an argument of the
compiled step (replicated), so one program serves every phase.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from clseg_jax import losses, metrics, sharding, tasks
from clseg_jax import members as members_lib
from clseg_jax.data import base as data_base
from clseg_jax.data import feed, loader
from clseg_jax.strategies import base


def make_eval_step(
    forward: base.Forward, num_classes: int, predict: base.Predict | None = None
) -> Callable:
    """``step(params, batch_stats, conf [K,K], batch, class_mask [K], sstate) -> conf``.

    Scores are ``predict(outputs, sstate)`` when given, else the logits (``sstate`` unused).
    """

    def step(params, batch_stats, conf, batch, class_mask, sstate):
        outputs, _ = forward(params, batch_stats, batch["image"], False)
        scores = outputs["logits"] if predict is None else predict(outputs, sstate)
        pred = jnp.argmax(losses.mask_logits(scores, class_mask), axis=-1)
        return conf + metrics.confusion(batch["label"], pred, num_classes)

    return step


def make_score_step(forward: base.Forward) -> Callable:
    """``step(params, batch_stats, batch) -> (scores [B,K], labels [B,K], fingerprint [B])``.

    Multi-label: sigmoid scores, the (global) labels, and a uint32 hash of each image so that an
    image in several tasks' test sets counts once in the overall mAP.
    """

    def step(params, batch_stats, batch):
        outputs, _ = forward(params, batch_stats, batch["image"], False)
        images = batch["image"].reshape(batch["image"].shape[0], -1).astype(jnp.uint32)
        coeffs = jnp.arange(images.shape[1], dtype=jnp.uint32) * jnp.uint32(2654435761) + 1
        fingerprint = jnp.sum(images * coeffs, axis=1, dtype=jnp.uint32)
        scores = jax.nn.sigmoid(outputs["logits"].astype(jnp.float32))
        return scores, batch["label"], fingerprint

    return step


class Evaluator:
    """Evaluates parameters on the test sets of a stream with one compiled step.

    The shared half: rows of the accuracy matrix, their scores and what is measured after a
    phase. What a test set's statistic is comes from the subclass, picked by ``make`` from the
    task's ``statistic``: ``ConfusionEvaluator`` (``[K,K]`` confusion: segmentation,
    classification) or ``APEvaluator`` (``[K]`` average precisions: multi-label).

    Args:
      forward: the model's forward function.
      stream: the stream whose test sets are evaluated.
      mesh: device mesh; batches are split over its data axis.
      batch_size: global evaluation batch size.
      task: what is scored (``tasks.Task``).
      predict: the strategy's evaluation rule (``Strategy.predict``), or None for the argmax of
        the logits; with one, pass the strategy state as ``sstate`` to ``compile`` / ``row`` /
        ``row_task_il`` / ``evaluate``.
      members: 0 for one model; N for an ensemble's N members, whose parameters and strategy
        states carry a leading members axis: every statistic then does too (``[N,K,K]``,
        ``[N,K]``; ``overall`` a list of N), each test batch read once for all of them.
      chunk: members evaluated side by side at a time (``members.vectorize``).
    """

    def __init__(
        self,
        forward: base.Forward,
        stream: data_base.Stream,
        mesh: Mesh,
        batch_size: int,
        task: tasks.Task = tasks.SEGMENTATION,
        predict: base.Predict | None = None,
        members: int = 0,
        chunk: int = 1,
    ):
        self.stream = stream
        self.members = members
        self.chunk = chunk
        self.predict = predict
        self.task = task
        self.mesh = mesh
        self.batch_size = batch_size
        self._batch_sharding = sharding.batch_sharding(mesh)
        self._repl = sharding.replicated(mesh)
        # Where a statistic (and the strategy state) of every member lives.
        self._stat = members_lib.placement(mesh) if members else self._repl
        self._compiled = None
        self._step = self._jit_step(forward)

    def _jit_step(self, forward: base.Forward):
        """The jitted evaluation step of this kind of statistic."""
        raise NotImplementedError

    def _sstate(self, sstate):
        """What the step receives as the strategy state: nothing unless ``predict`` reads it.

        Replicated here: hooks run on the host and may leave it anywhere, and the compiled step
        wants one placement.
        """
        if self.predict is None:
            return ()
        if sstate is None:
            raise ValueError("this Evaluator scores with a strategy's predict: pass its sstate")
        return sharding.put(sstate, self._stat)

    def _batch_struct(self) -> dict[str, jax.ShapeDtypeStruct]:
        x = self.stream.experiences[0].test[0]
        return {
            key: jax.ShapeDtypeStruct(
                (self.batch_size, *x[key].shape), jnp.uint8, sharding=self._batch_sharding
            )
            for key in ("image", "label")
        }

    def _batches(self, source, visible: np.ndarray):
        """``source``'s evaluation batches (labels of ``visible`` classes), read by grain's
        threads and placed on the devices ahead of the step."""
        dataset = loader.eval_batches(
            source,
            visible,
            global_batch=self.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        return feed.iterate(dataset, self._batch_sharding, prefetch=2, threads=2)

    def compile(self, params, batch_stats, sstate=None) -> None:
        """Compiles ahead of time (so compile time is measured apart from evaluation)."""
        raise NotImplementedError

    def evaluate(
        self, params, batch_stats, experience: int, class_mask: np.ndarray, sstate=None
    ) -> np.ndarray:
        """An experience's test statistic."""
        raise NotImplementedError

    def overall(self, params, batch_stats, phase: base.Phase) -> float | None:
        """A score over every test set seen by ``phase`` together, where the task defines one."""
        del params, batch_stats, phase
        return None

    def row(self, params, batch_stats, class_mask: np.ndarray, sstate=None) -> list[np.ndarray]:
        """Statistics on every experience's test set: one row of the accuracy matrix."""
        sstate = self._sstate(sstate)  # placed once per row, not once per test set
        return [
            self.evaluate(params, batch_stats, j, class_mask, sstate)
            for j in range(len(self.stream.experiences))
        ]

    def row_task_il(self, params, batch_stats, sstate=None) -> list[np.ndarray]:
        """Task-incremental row: experience j's test set with predictions limited to its classes
        (the task id is given at test time)."""
        sstate = self._sstate(sstate)
        return [
            self.evaluate(params, batch_stats, j, self.stream.class_mask(e.classes), sstate)
            for j, e in enumerate(self.stream.experiences)
        ]

    def score(self, stat: np.ndarray, experience: int) -> float:
        """The accuracy-matrix entry of one statistic (``Task.score``): mIoU, accuracy, or the
        mean AP over the experience's own classes (multi-label); an ensemble's mean over its
        members."""
        classes = self.stream.experiences[experience].classes
        if self.members:
            return float(np.mean([self.task.score(s, classes) for s in stat]))
        return self.task.score(stat, classes)

    def after_phase(
        self, params, batch_stats, sstate, phase: base.Phase, task_il: bool = False
    ) -> PhaseEval:
        """Everything measured after a phase: one row of R, and where the run asks for them the
        task-incremental row, the multi-label overall mAP and the full-test-set confusion."""
        sstate = self._sstate(sstate)
        row = self.row(params, batch_stats, phase.class_mask, sstate)
        row_task_il = self.row_task_il(params, batch_stats, sstate) if task_il else []
        overall = self.overall(params, batch_stats, phase)
        full = None
        if self.stream.test is not None:
            full = self.full_test(params, batch_stats, phase.seen_classes, phase.class_mask, sstate)
        return PhaseEval(row, row_task_il, overall, full)

    def full_test(
        self, params, batch_stats, seen_classes, class_mask: np.ndarray, sstate=None
    ) -> np.ndarray:
        """The statistic on the stream's full test set (``Stream.test``), labels of the classes
        seen so far: the MiB/PLOP tables' evaluation."""
        raise ValueError(f"{type(self).__name__} scores no full test set")


class ConfusionEvaluator(Evaluator):
    """``[K,K]`` confusion per test set, added up on device batch by batch (segmentation,
    classification)."""

    def _jit_step(self, forward):
        step = make_eval_step(forward, self.stream.num_classes, self.predict)
        if self.members:
            step = members_lib.vectorize(
                step, (0, 0, 0, None, None, 0), self.members, self.chunk, self.mesh
            )
        return jax.jit(step, out_shardings=self._stat, donate_argnums=(2,))

    def _conf_shape(self) -> tuple[int, ...]:
        k = self.stream.num_classes
        return (self.members, k, k) if self.members else (k, k)

    def compile(self, params, batch_stats, sstate=None) -> None:
        k = self.stream.num_classes
        conf = jax.ShapeDtypeStruct(self._conf_shape(), jnp.int32, sharding=self._stat)
        mask = jax.ShapeDtypeStruct((k,), jnp.bool_, sharding=self._repl)
        st = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._stat),
            self._sstate(sstate),
        )
        batch = self._batch_struct()
        self._compiled = self._step.lower(params, batch_stats, conf, batch, mask, st).compile()

    def evaluate(
        self, params, batch_stats, experience: int, class_mask: np.ndarray, sstate=None
    ) -> np.ndarray:
        """``[K,K]`` confusion on an experience's test set, labels of classes seen by then."""
        visible = self.stream.class_mask(self.stream.seen_classes(experience))
        return self.confusion_on(
            self.stream.experiences[experience].test,
            params,
            batch_stats,
            visible,
            class_mask,
            sstate,
        )

    def full_test(
        self, params, batch_stats, seen_classes, class_mask: np.ndarray, sstate=None
    ) -> np.ndarray:
        if self.stream.test is None:
            raise ValueError(f"stream {self.stream.name!r} has no full test set")
        visible = self.stream.class_mask(seen_classes)
        return self.confusion_on(self.stream.test, params, batch_stats, visible, class_mask, sstate)

    def confusion_on(
        self, source, params, batch_stats, visible: np.ndarray, class_mask: np.ndarray, sstate=None
    ) -> np.ndarray:
        """``[K,K]`` confusion on ``source`` with the labels of ``visible`` classes."""
        if self._compiled is None:
            self.compile(params, batch_stats, sstate)
        st = self._sstate(sstate)
        conf = sharding.put(jnp.zeros(self._conf_shape(), jnp.int32), self._stat)
        mask = sharding.put(jnp.asarray(class_mask), self._repl)
        for batch in self._batches(source, visible):
            conf = self._compiled(params, batch_stats, conf, batch, mask, st)
        return np.asarray(jax.device_get(conf))


class APEvaluator(Evaluator):
    """``[K]`` average precision of every class per test set, from sigmoid scores kept on device
    until the set ends (multi-label); the overall score is the mAP over the seen classes on the
    seen tasks' images."""

    def _jit_step(self, forward):
        if self.predict is not None:
            raise ValueError(
                "a strategy's predict needs a segmentation or classification task, "
                f"not {self.task.name}"
            )
        # An ensemble's members are scored one after another by this one program: the
        # average precisions are host work per member anyway.
        return jax.jit(make_score_step(forward), out_shardings=self._repl)

    def compile(self, params, batch_stats, sstate=None) -> None:
        del sstate
        if self.members:
            params, batch_stats = members_lib.take((params, batch_stats), 0)
        self._compile_one(params, batch_stats)

    def _compile_one(self, params, batch_stats) -> None:
        """Compiles for one model's parameters (one member's, in an ensemble)."""
        self._compiled = self._step.lower(params, batch_stats, self._batch_struct()).compile()

    def evaluate(
        self, params, batch_stats, experience: int, class_mask: np.ndarray, sstate=None
    ) -> np.ndarray:
        """``[K]`` AP of each class on an experience's test set (full labels; NaN where a class
        has no positive); the class mask plays no part in a ranking score."""
        del class_mask, sstate
        if self.members:
            return np.stack(
                [
                    self.average_precisions(*members_lib.take((params, batch_stats), m), experience)
                    for m in range(self.members)
                ]
            )
        return self.average_precisions(params, batch_stats, experience)

    def overall(self, params, batch_stats, phase: base.Phase) -> float | list[float]:
        seen = range(max(phase.experiences) + 1)
        if self.members:
            return [
                self.overall_map(
                    *members_lib.take((params, batch_stats), m), seen, phase.seen_classes
                )
                for m in range(self.members)
            ]
        return self.overall_map(params, batch_stats, seen, phase.seen_classes)

    def _scores(self, params, batch_stats, experience: int):
        """Scores, labels and image fingerprints of an experience's test set (padding dropped);
        on device until the set ends: one host read."""
        if self._compiled is None:
            self._compile_one(params, batch_stats)
        everything = np.ones(self.stream.num_classes, bool)
        out = [
            self._compiled(params, batch_stats, batch)
            for batch in self._batches(self.stream.experiences[experience].test, everything)
        ]
        s, y, f = (
            np.asarray(a) for a in jax.device_get(jax.tree.map(lambda *a: jnp.concatenate(a), *out))
        )
        keep = ~(y == 255).all(axis=1)  # padding rows
        return s[keep], y[keep], f[keep]

    def average_precisions(self, params, batch_stats, experience: int) -> np.ndarray:
        s, y, _ = self._scores(params, batch_stats, experience)
        return metrics.average_precision_per_class(s, y)

    def overall_map(self, params, batch_stats, experiences, classes) -> float:
        """Mean AP over ``classes`` on the union of the experiences' test sets, each image once
        (an image holding classes of two tasks is in both tasks' sets)."""
        parts = [self._scores(params, batch_stats, j) for j in experiences]
        s, y, f = (np.concatenate(a) for a in zip(*parts, strict=True))
        _, first = np.unique(np.concatenate([f[:, None], y], axis=1), axis=0, return_index=True)
        ap = metrics.average_precision_per_class(s[first], y[first])
        return metrics.nanmean(ap[list(classes)])


EVALUATORS: dict[str, type[Evaluator]] = {"confusion": ConfusionEvaluator, "ap": APEvaluator}


def make(
    forward: base.Forward,
    stream: data_base.Stream,
    mesh: Mesh,
    batch_size: int,
    task: tasks.Task = tasks.SEGMENTATION,
    predict: base.Predict | None = None,
    members: int = 0,
    chunk: int = 1,
) -> Evaluator:
    """The evaluator of ``task``'s statistic (``Task.statistic``)."""
    return EVALUATORS[task.statistic](
        forward, stream, mesh, batch_size, task, predict, members, chunk
    )


class PhaseEval(NamedTuple):
    """What ``Evaluator.after_phase`` measured.

    Attributes:
      row: one statistic per experience's test set (``[K,K]`` confusion or ``[K]`` APs).
      row_task_il: the same with predictions limited to each experience's classes, or [].
      overall: multi-label mAP over the seen classes on the seen tasks' images, or None.
      full: ``[K,K]`` confusion on the stream's full test set, or None if it has none.
    """

    row: list[np.ndarray]
    row_task_il: list[np.ndarray]
    overall: float | None
    full: np.ndarray | None
