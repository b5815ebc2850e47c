"""Protocol strings: the papers' VOC and ADE20K settings, and one-line errors for the rest."""

from __future__ import annotations

import re

import pytest

from clseg_jax.data import protocols


@pytest.mark.parametrize(
    "text,n,want",
    [
        ("19-1", 20, (19, 1)),
        ("15-5", 20, (15, 5)),
        ("15-1", 20, (15, 1, 1, 1, 1, 1)),
        ("15-5s", 20, (15, 1, 1, 1, 1, 1)),
        ("15-1-1-1-1-1", 20, (15, 1, 1, 1, 1, 1)),
        ("10-1", 20, (10,) + (1,) * 10),
        ("10-10", 20, (10, 10)),
        ("10-5-5", 20, (10, 5, 5)),
        ("10-2x5", 20, (10, 2, 2, 2, 2, 2)),
        ("joint", 20, (20,)),
        ("100-50", 150, (100, 50)),
        ("100-10", 150, (100,) + (10,) * 5),
        ("50-50", 150, (50, 50, 50)),
        ("100-5", 150, (100,) + (5,) * 10),
        ("2-1-1", 4, (2, 1, 1)),
    ],
)
def test_papers_protocols(text, n, want):
    assert protocols.parse(text, n) == want
    assert sum(len(s) for s in protocols.steps(text, n)) == n


def test_steps_are_consecutive_foreground_ids():
    assert protocols.steps("2-1-1", 4) == [(1, 2), (3,), (4,)]


@pytest.mark.parametrize(
    "text,n,message",
    [
        ("15_5", 20, "malformed protocol '15_5'; valid:"),
        ("15-0", 20, "malformed protocol '15-0'"),
        ("", 20, "malformed protocol ''"),
        ("15-3", 20, "5 classes after the first 15 are not whole steps of 3"),
        ("20-1", 20, "0 classes after the first 20"),
        ("10-2x4", 20, "10 + 4 x 2 = 18 classes, the dataset has 20"),
        ("15-4s", 20, "15 + 4 classes, the dataset has 20"),
        ("2-1-2", 4, "the steps sum to 5 classes, the dataset has 4"),
    ],
)
def test_bad_protocols_are_one_line_errors(text, n, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        protocols.parse(text, n)
    assert "\n" not in str(e.value)
