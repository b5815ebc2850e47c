"""Classes by step: grouping class ids into steps (tasks) and picking each step's images.

A class-incremental stream introduces its classes in steps (segmentation papers' word; the
classification streams call them tasks). Shared by every such stream:

* ``consecutive(sizes, first)``: ids ``first, first+1, ...`` grouped by step sizes (also what
  ``protocols.steps`` gives for a protocol string); ``split_classes`` checks config-given sizes.
* ``holding(labels, step)`` / ``partition(labels, steps)``: the rows of a ``[N,K]`` table
  (multi-hot labels, or the class presence of segmentation masks) holding a class of a step.
* ``balanced`` (single-label ids, evenly over a step's classes) and ``cap`` (any rows): at most
  a given number of a step's images, sampled.
* ``step_name``: an experience's name from its classes' names.
* ``capped_experiences``: a multi-label stream's experiences from its splits' partitions.

Multi-label class-incremental protocol (``digits_ml``, ``voc_ml``, ``npz_ml``, MedMNIST's
ChestMNIST):

* Training set of task t: the images that hold at least one class of task t (``partition``).
  Sources store the *full* multi-hot label; the trainer zeroes the classes outside
  ``Experience.classes`` (``base.visible_labels``), so objects of past or future tasks count as
  absent while training t.
* Test set of task t: the images that hold at least one class of task t, with full labels; the
  evaluator restricts labels and scores to the classes seen so far.
* An image holding classes of several tasks belongs to each of their sets (VOC, npz). ``digits_ml``
  draws fresh canvases per task instead: the topmost digit is of task t, the others of any class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from clseg_jax.data import base

# Stream id of the caps' draws in the seed tuple ``[seed, CAP_STREAM, task, split]``: distinct
# from shapes.py's (11, 12), digits.py's (21, 22) and digits_labels.py's (31, 32).
CAP_STREAM = 33
SPLITS = ("train", "test")


def consecutive(sizes: Sequence[int], first: int = 1) -> list[tuple[int, ...]]:
    """Ids ``first, first+1, ...`` grouped by ``sizes``: ``(2, 1), first=1 -> [(1, 2), (3,)]``."""
    out, start = [], first
    for size in sizes:
        out.append(tuple(range(start, start + int(size))))
        start += int(size)
    return out


def split_classes(
    classes_per_step: Sequence[int], num_classes: int, what: str, first: int = 1
) -> list[tuple[int, ...]]:
    """``consecutive`` after checking the sizes are positive and sum to ``num_classes``.

    ``first`` is 1 for segmentation (foreground ids; 0 is background) and 0 for classification
    (no background class).
    """
    steps = [int(c) for c in classes_per_step]
    if not steps or min(steps) < 1 or sum(steps) != num_classes:
        raise ValueError(
            f"{what}: classes_per_step must be positive and sum to {num_classes}, "
            f"got {tuple(steps)}"
        )
    return consecutive(steps, first)


def holding(labels: np.ndarray, step: Sequence[int]) -> np.ndarray:
    """Sorted ``int64`` indices of the rows of ``labels [N,K]`` with a nonzero entry in ``step``."""
    return np.flatnonzero(np.asarray(labels)[:, list(step)].any(axis=1)).astype(np.int64)


def partition(labels: np.ndarray, steps: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """``holding`` per step: an image joins every step one of whose classes it holds."""
    return [holding(labels, step) for step in steps]


def step_name(class_names: Sequence[str], step: Sequence[int]) -> str:
    """``"cat+dog"``, or ``"first..last"`` for more than four classes."""
    names = [class_names[c] for c in step]
    return "+".join(names) if len(names) <= 4 else f"{names[0]}..{names[-1]}"


def cap(index: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``limit`` of ``index`` (all if ``limit <= 0``): a sorted sample, no repeats."""
    if limit <= 0 or len(index) <= limit:
        return index
    return np.sort(rng.choice(index, limit, replace=False))


def balanced(
    y: np.ndarray, step: Sequence[int], limit: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices of the rows of class ids ``y [N]`` in ``step``: all, or ``limit`` split evenly.

    Evenly split, so a small limit still shows every class of the step; shuffled, so a source
    read in order (host passes, eval) does not see one class at a time.
    """
    chosen = []
    for j, c in enumerate(step):
        idx = np.flatnonzero(y == c)
        if limit > 0:
            want = limit // len(step) + (1 if j < limit % len(step) else 0)
            idx = rng.choice(idx, min(want, len(idx)), replace=False)
        chosen.append(idx)
    return rng.permutation(np.concatenate(chosen))


def check_partition(
    parts: Sequence[np.ndarray],
    steps: Sequence[Sequence[int]],
    names: Sequence[str],
    what: str,
    split: str,
) -> None:
    """One-line error if a task has no image in ``split``: it could not be trained or scored."""
    for t, (idx, step) in enumerate(zip(parts, steps, strict=True)):
        if len(idx) == 0:
            raise ValueError(
                f"{what}: task {t} (classes {step[0]}..{step[-1]}: {step_name(names, step)}) "
                f"has no {split} images; every task needs at least one image holding its classes"
            )


def capped_experiences(
    what: str,
    names: Sequence[str],
    steps: Sequence[Sequence[int]],
    parts: Sequence[Sequence[np.ndarray]],
    caps: Sequence[int],
    seed: int,
    take: Callable[[int, np.ndarray, str], base.Source],
) -> tuple[base.Experience, ...]:
    """Experience t holds, per split s (train, test), ``take(s, index, name)`` with ``index`` at
    most ``caps[s]`` (``cap``, drawn with ``[seed, CAP_STREAM, t, s]``) of ``parts[s][t]``."""
    exps = []
    for t, step in enumerate(steps):
        name = step_name(names, step)
        sources = []
        for s, (part, limit) in enumerate(zip(parts, caps, strict=True)):
            idx = cap(part[t], limit, np.random.default_rng([seed, CAP_STREAM, t, s]))
            sources.append(take(s, idx, f"{what}/{name}/{SPLITS[s]}"))
        exps.append(base.Experience(t, name, tuple(step), sources[0], sources[1]))
    return tuple(exps)
