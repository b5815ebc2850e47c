"""User-provided streams: a folder of ``exp0.npz, exp1.npz, ...``, one file per experience.

Each file holds ``x_train`` uint8 ``[N,H,W,3]``, ``y_train`` integer ``[N,H,W]``, ``x_test`` and
``y_test`` likewise; labels are full labels (0 = background, 255 = ignore). Labels ``[N]`` instead
(one class per image, no background class) make it a classification stream, scored by accuracy;
every file of a stream has the same kind of labels. Files are ordered by
their number (``exp10`` comes after ``exp9``) and must be numbered 0..n-1 without gaps. All images
must share one size. Every problem is reported as a one-line ``ValueError`` naming the file and
array.

Config fields: ``path`` (folder), ``num_classes`` (<= 0: inferred as the largest non-ignore label
+ 1), ``kind`` ("domain", default: every experience labels all classes; "class": an experience
labels the classes present in its ``y_train``, plus background for masks), optional
``class_names``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import ml_collections
import numpy as np

from clseg_jax.data import base, checks

ARRAYS = ("x_train", "y_train", "x_test", "y_test")
# Label forms: their shape, then what they are.
LABELS = {"masks": "[N,H,W] masks", "classes": "[N] class ids"}
_FILE = re.compile(r"exp(0|[1-9][0-9]*)\.npz")


def _numbered_files(folder: Path) -> list[Path]:
    """``exp<k>.npz`` files sorted by k; checks the folder exists and numbering has no gaps."""
    if not folder.is_dir():
        raise ValueError(f"npz: folder {str(folder)!r} does not exist (config.path)")
    found = {}
    for entry in folder.iterdir():
        match = _FILE.fullmatch(entry.name)
        if match and entry.is_file():
            found[int(match.group(1))] = entry
    if not found:
        raise ValueError(
            f"npz: folder {str(folder)!r} holds no experience files; "
            f"expected exp0.npz, exp1.npz, ... (one per experience)"
        )
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        have = ", ".join(f"exp{k}.npz" for k in sorted(found))
        raise ValueError(
            f"npz: folder {str(folder)!r} is missing exp{missing[0]}.npz "
            f"(files must be numbered 0..n-1 without gaps; found {have})"
        )
    return [found[k] for k in sorted(found)]


def _load(file: Path) -> dict[str, np.ndarray]:
    """Reads and validates the four arrays of one file (closing it before returning)."""
    arrays = checks.read_npz(file, ARRAYS, "npz")
    check_arrays(arrays, f"npz: {file}")
    return arrays


def check_arrays(
    arrays: Mapping[str, np.ndarray], where: str, labels: tuple[str, ...] = ("masks", "classes")
) -> None:
    """Dtypes and shapes of the four arrays (``ARRAYS``) and no negative label; a one-line
    ``ValueError`` starting with ``where`` otherwise (the service's uploads share it).
    ``labels``: the label forms accepted, ``"masks"`` ``[N,H,W]`` and/or ``"classes"`` ``[N]``;
    both splits must have the same form."""
    forms = set()
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        checks.rgb_images(x, f"{where}: x_{split}")
        shapes = {"masks": x.shape[:3], "classes": x.shape[:1]}
        form = next((f for f in labels if y.shape == shapes[f]), None)
        if form is None:
            valid = " or ".join(f"{LABELS[f].split()[0]} = {list(shapes[f])}" for f in labels)
            raise ValueError(
                f"{where}: y_{split} must be {valid} matching x_{split}, got shape {list(y.shape)}"
            )
        forms.add(form)
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{where}: y_{split} must have an integer dtype, got {y.dtype}")
        if y.size and y.min() < 0:
            raise ValueError(
                f"{where}: y_{split} has negative labels (min {int(y.min())}); "
                f"use 0..num_classes-1 and 255 = ignore"
            )
    if len(forms) > 1:
        raise ValueError(f"{where}: y_train and y_test must both be masks or both class ids")


def label_form(arrays: Mapping[str, np.ndarray]) -> str:
    """``"masks"`` (segmentation) or ``"classes"`` (classification) of checked arrays."""
    return "masks" if arrays["y_train"].ndim == 3 else "classes"


def make(cfg: ml_collections.ConfigDict) -> base.Stream:
    """Builds the stream from ``cfg.path``; see the module docstring for the format."""
    kind = cfg.get("kind", "domain")
    if kind not in ("domain", "class"):
        raise ValueError(f"npz: config.kind must be 'domain' or 'class', got {kind!r}")
    path = cfg.get("path", None)
    if not path:
        raise ValueError("npz: config.path is empty; set it to a folder of exp<k>.npz files")
    files = _numbered_files(Path(os.path.expanduser(str(path))))
    data = [_load(f) for f in files]

    first = data[0]["x_train"].shape[1:3]
    form = label_form(data[0])
    for f, d in zip(files, data, strict=True):
        if label_form(d) != form:
            raise ValueError(
                f"npz: {f} has {LABELS[label_form(d)]} but {files[0]} has {LABELS[form]}; "
                "every experience of a stream needs the same kind of labels"
            )
        for split in ("train", "test"):
            if d[f"x_{split}"].shape[1:3] != first:
                raise ValueError(
                    f"npz: {f}: x_{split} images are {list(d[f'x_{split}'].shape[1:3])} but "
                    f"{files[0]} x_train images are {list(first)}; all must share one size"
                )

    num_classes = int(cfg.get("num_classes", 0) or 0)
    if num_classes <= 0:
        largest = 0
        for d in data:
            for a in ("y_train", "y_test"):
                y = d[a]
                kept = y[y != base.IGNORE]
                if kept.size:
                    largest = max(largest, int(kept.max()))
        num_classes = largest + 1
    if num_classes > base.IGNORE:
        raise ValueError(f"npz: num_classes must be <= 255 (255 = ignore), got {num_classes}")
    for f, d in zip(files, data, strict=True):
        for a in ("y_train", "y_test"):
            base.check_labels(d[a], num_classes, f"npz: {f}: {a}")

    names = cfg.get("class_names", None)
    if names:
        names = tuple(str(n) for n in names)
        if len(names) != num_classes:
            raise ValueError(
                f"npz: config.class_names has {len(names)} names for {num_classes} classes"
            )
    elif form == "classes":
        names = tuple(f"class_{c}" for c in range(num_classes))
    else:
        names = ("background", *(f"class_{c}" for c in range(1, num_classes)))

    exps = []
    for k, (f, d) in enumerate(zip(files, data, strict=True)):
        if kind == "domain":
            classes = tuple(range(num_classes))
        else:
            present = np.unique(d["y_train"])
            present = set(present[present != base.IGNORE].tolist())
            classes = tuple(sorted(present | ({0} if form == "masks" else set())))
        name = f.stem
        source = base.ArraySource if form == "masks" else base.LabelSource
        train = source(d["x_train"], d["y_train"].astype(np.uint8), f"npz/{name}/train")
        test = source(d["x_test"], d["y_test"].astype(np.uint8), f"npz/{name}/test")
        exps.append(base.Experience(k, name, classes, train, test))
    return base.Stream("npz", kind, num_classes, names, tuple(exps))


def write(path: str | os.PathLike, experiences: Sequence[Mapping[str, np.ndarray]]) -> list[Path]:
    """Writes ``exp<k>.npz`` for each dict of arrays (``x_train``, ``y_train``, ``x_test``,
    ``y_test``), creating the folder; arrays are written as given (no validation, so tests can
    write broken files). Existing files with other numbers are left alone. Returns the paths.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, arrays in enumerate(experiences):
        file = folder / f"exp{k}.npz"
        np.savez_compressed(file, **{a: np.asarray(v) for a, v in arrays.items()})
        out.append(file)
    return out
