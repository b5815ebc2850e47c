"""Checks shared by the dataset builders; every failure is a one-line ``ValueError``.

* ``one_line(err)``: an exception as one line, to quote inside such an error.
* ``int_setting(cfg, name, default, minimum, what)``: an integer config field with a lower bound.
* ``read_npz(file, names, what, ...)``: opens an ``.npz`` (never pickled data), checks the arrays
  are there and loads them.
* ``files_exist(paths, missing)``: every listed file is there.
* ``rgb_images(x, where)``: ``uint8 [N,H,W,3]``; ``multi_hot(y, where)``: only 0/1 values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections
import numpy as np


def one_line(err: BaseException) -> str:
    """The first line of ``str(err)``, or the exception's type name when it has no message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def int_setting(
    cfg: ml_collections.ConfigDict, name: str, default: int, minimum: int, what: str = ""
) -> int:
    """``config.<name>`` as an int (``default`` if absent or None), at least ``minimum``.

    The error starts with ``what: `` when ``what`` is given.
    """
    value = cfg.get(name, default)
    value = default if value is None else int(value)
    if value < minimum:
        prefix = f"{what}: " if what else ""
        raise ValueError(f"{prefix}config.{name} must be >= {minimum}, got {value}")
    return value


def read_npz(
    file: Path,
    names: Sequence[str],
    what: str,
    *,
    require: Sequence[str] = (),
    optional: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """The arrays ``names`` (and those of ``optional`` the file has) of one ``.npz``.

    ``require`` names arrays that must be there but are not loaded: members load lazily, so
    checking the images are present while reading only the labels costs no image I/O. Errors
    start with ``what: file:``. The file is closed on return (the arrays are materialised).
    """
    try:
        z = np.load(file, allow_pickle=False)
    except (OSError, EOFError, ValueError) as err:  # not a zip, truncated, pickled data
        raise ValueError(f"{what}: {file}: cannot be read as .npz ({one_line(err)})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy renamed to .npz
        raise ValueError(f"{what}: {file}: is a single .npy array, expected an .npz archive")
    with z:
        needs = [*require, *names]
        missing = [a for a in needs if a not in z.files]
        if missing:
            also = f", optional {', '.join(repr(a) for a in optional)}" if optional else ""
            raise ValueError(
                f"{what}: {file}: missing array {missing[0]!r} (has {sorted(z.files)}; "
                f"needs {needs}{also})"
            )
        arrays = {}
        for a in (*names, *(o for o in optional if o in z.files)):
            try:
                arrays[a] = np.asarray(z[a])
            except (OSError, EOFError, ValueError) as err:  # object arrays, corrupt members
                raise ValueError(
                    f"{what}: {file}: {a} cannot be loaded ({one_line(err)})"
                ) from None
    return arrays


def files_exist(paths: Sequence[Path], missing: Callable[[Path], str]) -> None:
    """One-line error ``missing(first absent path)`` plus how many of ``paths`` are absent."""
    absent = [p for p in paths if not Path(p).is_file()]
    if absent:
        raise ValueError(f"{missing(absent[0])} ({len(absent)} of {len(paths)} missing)")


def rgb_images(x: np.ndarray, where: str) -> None:
    """One-line error unless ``x`` is ``uint8 [N,H,W,3]``."""
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise ValueError(f"{where} must be uint8 [N,H,W,3], got {x.dtype} {list(x.shape)}")


def multi_hot(y: np.ndarray, where: str) -> None:
    """One-line error naming up to five offending values unless ``y`` holds only 0 and 1."""
    bad = np.unique(y[(y != 0) & (y != 1)])
    if bad.size:
        raise ValueError(f"{where} must be multi-hot (0/1), found values {bad[:5].tolist()}")
