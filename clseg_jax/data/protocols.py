"""Class-incremental protocol strings as the segmentation papers write them.

Counts exclude background. For a dataset with ``n`` foreground classes:

- ``a-b``: ``a`` base classes, then steps of ``b`` until all classes are seen (``n - a`` must be a
  multiple of ``b``): VOC ``19-1``, ``15-5``, ``15-1``, ``10-1``, ``10-10``; ADE ``100-50``,
  ``100-10``, ``50-50``, ``100-5``.
- ``a-bxN``: ``a`` base classes, then exactly ``N`` steps of ``b`` (``a + N b = n``): ``10-2x5``.
- ``a-bs`` (MiB's "sequential" name): ``a`` base classes, then ``b`` steps of one class (``a + b =
  n``): ``15-5s`` is ``15-1``.
- three or more parts ``a-b-c...``: the explicit list of step sizes, summing to ``n``:
  ``10-5-5``, RECALL's ``15-1-1-1-1-1``, ``2-1-1`` on a 4-class dataset.
- ``joint``: one step of all ``n`` classes.

``parse`` returns the step sizes; ``steps`` the class ids per step (``1..n`` in order, 0 being
background). Anything else is a one-line ``ValueError`` naming the string and the valid forms.
"""

from __future__ import annotations

import re

from clseg_jax.data import class_steps

_FORMS = "valid: 'a-b', 'a-bxN', 'a-bs', 'a-b-c...' (summing to the class count), 'joint'"
_NUM = r"([1-9][0-9]*)"


def parse(protocol: str, num_classes: int) -> tuple[int, ...]:
    """Step sizes of ``protocol`` on ``num_classes`` foreground classes, e.g. (15, 1, 1, 1, 1)."""
    text = protocol.strip()
    n = int(num_classes)
    if text == "joint":
        return (n,)
    if m := re.fullmatch(rf"{_NUM}-{_NUM}x{_NUM}", text):
        a, b, count = (int(g) for g in m.groups())
        if a + b * count != n:
            raise ValueError(
                f"protocol {protocol!r}: {a} + {count} x {b} = {a + b * count} classes, "
                f"the dataset has {n}"
            )
        return (a,) + (b,) * count
    if m := re.fullmatch(rf"{_NUM}-{_NUM}s", text):
        a, b = (int(g) for g in m.groups())
        if a + b != n:
            raise ValueError(f"protocol {protocol!r}: {a} + {b} classes, the dataset has {n}")
        return (a,) + (1,) * b
    if re.fullmatch(rf"{_NUM}(-{_NUM})+", text):
        parts = tuple(int(p) for p in text.split("-"))
        if len(parts) == 2:
            a, b = parts
            if a >= n or (n - a) % b:
                raise ValueError(
                    f"protocol {protocol!r}: {n - a} classes after the first {a} are not whole "
                    f"steps of {b} (the dataset has {n})"
                )
            return (a,) + (b,) * ((n - a) // b)
        if sum(parts) != n:
            raise ValueError(
                f"protocol {protocol!r}: the steps sum to {sum(parts)} classes, the dataset has {n}"
            )
        return parts
    raise ValueError(f"malformed protocol {protocol!r}; {_FORMS}")


def steps(protocol: str, num_classes: int) -> list[tuple[int, ...]]:
    """Foreground class ids ``1..num_classes`` grouped by the protocol's steps."""
    return class_steps.consecutive(parse(protocol, num_classes), first=1)
