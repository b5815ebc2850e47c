"""Class-incremental segmentation settings: which images each step trains on, which labels it sees.

A protocol (``data/protocols.py``) splits the foreground classes ``1..K-1`` into steps ``C_0, C_1,
...``; ``S_t = {0} ∪ C_0 ∪ ... ∪ C_t`` are the classes seen up to step t. With ``P [N,K]`` the
classes present in each training image (``files.presence``; 255 ignored), the settings are:

* ``overlapped`` (MiB, Cermelli et al. CVPR 2020): step t trains on every image holding at least
  one pixel of a class of ``C_t``. Images may also hold old and *future* classes, and an image
  may appear in several steps. Only ``C_t`` is labelled: every other pixel is background (0).
* ``disjoint`` (MiB; ILT, Michieli & Zanuttigh 2019): step t trains on the images holding at least
  one class of ``C_t`` and no class outside ``S_t`` (no future class). An image thus belongs to
  at most one step, the step of its latest class. Only ``C_t`` is labelled; old classes appear as
  background.
* ``sequential`` (the Padova group's protocol: SDR, Michieli & Zanuttigh CVPR 2021; RECALL,
  Maracani et al. ICCV 2021): the images of ``disjoint``, but the pixels of old classes keep
  their labels: all of ``S_t`` is labelled. The easiest of the three (no background shift on old
  classes).

These selections are MiB's ``filter_images`` (official code, ``dataset/utils.py``): ``overlap=True``
keeps an image if one of its classes is in ``C_t``; ``overlap=False`` also requires all its classes
in ``S_t ∪ {255}``. Images with only background/ignore hold no class of any step, so no setting
trains on them. RECALL's official code (``train_manager.py``) offers the three settings for the
incremental steps and notes that disjoint and sequential coincide at the first step, as they do
here (``S_0 = {0} ∪ C_0``).

Labels: sources keep *full* labels; ``Experience.classes`` says which are labelled in that step's
training data (``experience_classes``): ``(0, *C_t)`` or, for ``sequential``, ``S_t``. The trainer
turns the rest into background (``base.visible_labels``).

Test sets: experience j's test set holds the test images with at least one class of ``C_j``
(its row of the accuracy matrix R), scored with the classes seen so far; the stream's full test
set (``Stream.test``) is every test image, scored after each step with ``S_t`` (the MiB/PLOP tables'
old/new/all mIoU). MiB's official test set at step t keeps the test images holding a class of
``S_t`` (``filter_images`` with ``labels_cum``); images without any seen class add background
pixels only, and at the last step the two coincide (VOC's and ADE20K's test images hold objects).
Unseen classes at test: MiB's official code ignores their pixels (255), PLOP's counts them as
background, as the trainer does here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clseg_jax.data import base, class_steps, files, protocols

SETTINGS = ("overlapped", "disjoint", "sequential")


def _check_setting(setting: str) -> str:
    if setting not in SETTINGS:
        raise ValueError(f"unknown incremental setting {setting!r}; valid: {list(SETTINGS)}")
    return setting


def _check_steps(steps: Sequence[Sequence[int]], num_classes: int) -> list[tuple[int, ...]]:
    # Not class_steps.split_classes: steps here are given as class ids (any disjoint sets, not
    # necessarily consecutive nor covering every class), not as sizes.
    out, seen = [], set()
    for t, step in enumerate(steps):
        step = tuple(int(c) for c in step)
        bad = [c for c in step if not 1 <= c < num_classes]
        if not step or bad or seen & set(step):
            raise ValueError(
                f"step {t} {step}: steps must be non-empty, disjoint sets of foreground classes "
                f"1..{num_classes - 1}"
            )
        seen |= set(step)
        out.append(step)
    return out


def split(
    presence_train: np.ndarray, steps: Sequence[Sequence[int]], setting: str
) -> list[np.ndarray]:
    """Training image indices of each step.

    Args:
        presence_train: ``bool [N,K]``, True where image n holds class k (background column 0
            included, ignored here).
        steps: foreground classes of each step, e.g. ``protocols.steps("15-5", 20)``.
        setting: "overlapped" | "disjoint" | "sequential".

    Returns:
        one sorted ``int64 [n_t]`` array per step (possibly empty).
    """
    _check_setting(setting)
    p = np.asarray(presence_train, bool)
    k = p.shape[1]
    steps = _check_steps(steps, k)
    # "overlapped" is the partition the multi-label streams use too; the other settings keep
    # only the images with no class of a later step.
    parts = class_steps.partition(p, steps)
    if setting == "overlapped":
        return parts
    seen = np.zeros(k, bool)
    seen[0] = True
    out = []
    for step, idx in zip(steps, parts, strict=True):
        seen[list(step)] = True
        out.append(idx[~p[idx][:, ~seen].any(axis=1)])
    return out


def experience_classes(steps: Sequence[Sequence[int]], setting: str) -> list[tuple[int, ...]]:
    """What ``Experience.classes`` holds per step: the classes labelled in its training data."""
    _check_setting(setting)
    out, seen = [], [0]
    for step in steps:
        seen = sorted({*seen, *step})
        out.append(tuple(seen) if setting == "sequential" else (0, *step))
    return out


def make_stream(
    name: str,
    train_source,
    test_source,
    presence_train: np.ndarray,
    presence_test: np.ndarray,
    class_names: Sequence[str],
    protocol: str,
    setting: str,
) -> base.Stream:
    """A class-incremental stream over one training split and one test split.

    Args:
        name: dataset name (stream name, and the prefix of every source's name).
        train_source / test_source: whole splits with full labels (e.g. ``files.SegFileSource``).
        presence_train / presence_test: ``bool [N,K]`` of each split (``files.presence``).
        class_names: K names, background first.
        protocol: e.g. "15-5", "100-50", "2-1-1" (``data/protocols.py``).
        setting: "overlapped" | "disjoint" | "sequential".

    Returns:
        kind "class" stream: experience t trains on ``split(...)[t]`` with
        ``experience_classes(...)[t]`` labelled and tests on the test images holding a class of
        step t; ``Stream.test`` is the whole test split.
    """
    _check_setting(setting)
    k = len(class_names)
    for what, p, src in (
        ("train", presence_train, train_source),
        ("test", presence_test, test_source),
    ):
        if np.shape(p) != (len(src), k):
            raise ValueError(
                f"{name}: presence_{what} must be [N,K] = [{len(src)}, {k}], "
                f"got {list(np.shape(p))}"
            )
    steps = protocols.steps(protocol, k - 1)
    train_idx = split(presence_train, steps, setting)
    labelled = experience_classes(steps, setting)
    test_p = np.asarray(presence_test, bool)
    exps = []
    for t, (step, idx, classes) in enumerate(zip(steps, train_idx, labelled, strict=True)):
        step_name = class_steps.step_name(class_names, step)
        where = (
            f"{name} {protocol} {setting}: step {t} (classes {step[0]}..{step[-1]}: {step_name})"
        )
        if len(idx) == 0:
            raise ValueError(
                f"{where} has no training image; every step needs an image holding one of its "
                f"classes{'' if setting == 'overlapped' else ' and no later class'}"
            )
        test_idx = class_steps.holding(test_p, step)
        if len(test_idx) == 0:
            raise ValueError(f"{where} has no test image holding one of its classes")
        prefix = f"{name}/{protocol}/{setting}/{t}"
        exps.append(
            base.Experience(
                t,
                step_name,
                classes,
                files.Subset(train_source, idx, f"{prefix}/train"),
                files.Subset(test_source, test_idx, f"{prefix}/test"),
            )
        )
    return base.Stream(name, "class", k, tuple(class_names), tuple(exps), test=test_source)
