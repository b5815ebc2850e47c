"""Incremental settings on a hand-checked 6-image example: which images, which labels per step."""

from __future__ import annotations

import numpy as np
import pytest

from clseg_jax.data import base, files, incremental

# Six 4x4 label maps over K = 5 classes (0 background, 1..4), 255 = ignore. Which classes each
# holds, and so which step of "2-2" (steps (1, 2) and (3, 4)) it concerns, is written by hand:
#   0: {0, 1}          step 0 only
#   1: {0, 3}          step 1 only
#   2: {0, 1, 3}       step 0 and step 1
#   3: {0, 2, 4, 255}  step 0 and step 1, with ignore pixels
#   4: {0}             background only: no step
#   5: {0, 4}          step 1 only
_CLASSES = ({0, 1}, {0, 3}, {0, 1, 3}, {0, 2, 4, 255}, {0}, {0, 4})
K = 5


def _labels() -> np.ndarray:
    labels = np.zeros((len(_CLASSES), 4, 4), np.uint8)
    for i, classes in enumerate(_CLASSES):
        for j, c in enumerate(sorted(classes - {0})):
            labels[i, j, :] = c  # one row per non-background value
    return labels


def _source(name: str) -> base.ArraySource:
    labels = _labels()
    images = np.repeat(labels[..., None], 3, axis=-1)
    return base.ArraySource(images, labels, name)


# Presence written from the table above, not computed.
PRESENCE = np.array(
    [
        [1, 1, 0, 0, 0],
        [1, 0, 0, 1, 0],
        [1, 1, 0, 1, 0],
        [1, 0, 1, 0, 1],
        [1, 0, 0, 0, 0],
        [1, 0, 0, 0, 1],
    ],
    bool,
)


def test_presence_of_the_example_ignores_255():
    np.testing.assert_array_equal(files.presence(_source("toy"), K), PRESENCE)


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("overlapped", [[0, 2, 3], [1, 2, 3, 5]]),  # any class of the step
        ("disjoint", [[0], [1, 2, 3, 5]]),  # images 2 and 3 hold a future class at step 0
        ("sequential", [[0], [1, 2, 3, 5]]),  # disjoint's images
    ],
)
def test_split_two_steps(setting, expected):
    got = incremental.split(PRESENCE, [(1, 2), (3, 4)], setting)
    assert [g.tolist() for g in got] == expected


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("overlapped", [[0, 2], [3], [1, 2, 3, 5]]),
        # Step 1 (class 2): image 3 also holds class 4 of step 2, so no image is left.
        ("disjoint", [[0], [], [1, 2, 3, 5]]),
        ("sequential", [[0], [], [1, 2, 3, 5]]),
    ],
)
def test_split_three_steps_future_classes(setting, expected):
    got = incremental.split(PRESENCE, [(1,), (2,), (3, 4)], setting)
    assert [g.tolist() for g in got] == expected


def test_experience_classes():
    steps = [(1, 2), (3,), (4,)]
    assert incremental.experience_classes(steps, "overlapped") == [(0, 1, 2), (0, 3), (0, 4)]
    assert incremental.experience_classes(steps, "disjoint") == [(0, 1, 2), (0, 3), (0, 4)]
    assert incremental.experience_classes(steps, "sequential") == [
        (0, 1, 2),
        (0, 1, 2, 3),
        (0, 1, 2, 3, 4),
    ]


def _stream(setting: str, protocol: str = "2-2") -> base.Stream:
    names = ("background", "a", "b", "c", "d")
    train, test = _source("toy/train"), _source("toy/test")
    return incremental.make_stream("toy", train, test, PRESENCE, PRESENCE, names, protocol, setting)


def _training_labels(stream: base.Stream, t: int) -> list[set[int]]:
    exp = stream.experiences[t]
    visible = stream.class_mask(exp.classes)
    return [
        set(np.unique(base.visible_labels(exp.train[i]["label"], visible)).tolist())
        for i in range(len(exp.train))
    ]


def test_labels_seen_in_training():
    # Step 1 of "2-2": images 1, 2, 3, 5 (every setting).
    assert _training_labels(_stream("overlapped"), 1) == [{0, 3}, {0, 3}, {0, 4, 255}, {0, 4}]
    # Old class 1 in image 2 and 2 in image 3 are background for disjoint ...
    assert _training_labels(_stream("disjoint"), 1) == [{0, 3}, {0, 3}, {0, 4, 255}, {0, 4}]
    # ... and keep their labels for sequential.
    assert _training_labels(_stream("sequential"), 1) == [
        {0, 3},
        {0, 1, 3},
        {0, 2, 4, 255},
        {0, 4},
    ]
    # Overlapped step 0 sees image 2's future class 3 as background.
    assert _training_labels(_stream("overlapped"), 0) == [{0, 1}, {0, 1}, {0, 2, 255}]


def test_stream_test_sets():
    s = _stream("disjoint")
    assert s.kind == "class" and s.num_classes == K
    # Experience test sets: test images holding a class of the step (overlap allowed).
    assert s.experiences[0].test.indices.tolist() == [0, 2, 3]
    assert s.experiences[1].test.indices.tolist() == [1, 2, 3, 5]
    # The full test set: every test image, once.
    assert len(s.test) == 6
    assert [e.name for e in s.experiences] == ["a+b", "c+d"]


def test_errors():
    with pytest.raises(ValueError, match=r"unknown incremental setting 'mixed'.*overlapped"):
        incremental.split(PRESENCE, [(1, 2), (3, 4)], "mixed")
    with pytest.raises(ValueError, match=r"step 1 .* has no training image"):
        _stream("disjoint", "1-1-2")
    with pytest.raises(ValueError, match="malformed protocol"):
        _stream("overlapped", "two-two")
    with pytest.raises(ValueError, match="disjoint sets"):
        incremental.split(PRESENCE, [(1, 2), (2, 3)], "overlapped")
