"""Run reports: ``results.json``, accuracy-matrix and curve plots, and a comparison table.

Plots use ``matplotlib.figure.Figure`` with an explicit Agg canvas instead of ``pyplot``, so
importing this module neither selects a global backend nor keeps figures alive in pyplot's
registry (safe on headless machines and inside long training processes).
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clseg_jax import paths

_MISSING = "-"


def _to_jsonable(obj: Any) -> Any:
    """Recursively converts numpy/jax values to JSON types; NaN and +-inf become ``None``."""
    if isinstance(obj, Mapping):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, (str, bool)) or obj is None:
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return _to_jsonable(obj.item())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):  # jax arrays included
        return _to_jsonable(np.asarray(obj).tolist())
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")


def write_results(workdir: str | os.PathLike, results: Mapping[str, Any]) -> str:
    """Writes ``<workdir>/results.json`` atomically and returns its path.

    The file is written to a temporary name in the same directory and moved into place with
    ``os.replace``, so readers (and a crash mid-write) never see a partial file. Numpy scalars and
    arrays become plain JSON values; NaN/inf become ``null`` so the output is strict JSON.
    """
    text = json.dumps(_to_jsonable(results), indent=2, sort_keys=True, allow_nan=False)
    if paths.is_url(workdir):  # an object store writes whole objects: no partial file to fear
        target = paths.resolve(workdir) / "results.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + "\n")
        return str(target)
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "results.json")
    fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".results.", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _as_matrix(R: Any) -> np.ndarray:
    R = np.array(R, dtype=np.float64)
    if R.ndim == 1:
        R = R[None, :]
    if R.ndim != 2 or R.size == 0:
        raise ValueError(f"R must be a non-empty 2-D matrix, got shape {list(R.shape)}")
    return R


def _scale(R: np.ndarray) -> tuple[float, str]:
    """Colour-scale maximum and number format: fractions in [0,1] or percentages."""
    finite = R[np.isfinite(R)]
    if finite.size and finite.max() > 1.0:
        return 100.0, "{:.1f}"
    return 1.0, "{:.2f}"


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> str:
    out = paths.resolve(path)  # through epath: the workdir may be gs://
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    out.write_bytes(buffer.getvalue())
    return os.fspath(path)


def _experience_labels(labels: Sequence[str] | None, t: int) -> list[str]:
    if labels is None:
        return [str(j) for j in range(t)]
    if len(labels) != t:
        raise ValueError(f"expected {t} labels, got {len(labels)}")
    return [str(x) for x in labels]


def plot_accuracy_matrix(
    R: Any,
    path: str | os.PathLike,
    labels: Sequence[str] | None = None,
    title: str = "mIoU accuracy matrix",
) -> str:
    """Saves a heatmap of ``R`` (``[T,T]``, or ``[1,T]`` for joint training) as PNG.

    Row ``i`` = after training on experience ``i``; column ``j`` = evaluated on experience ``j``.
    Each cell is annotated with its value; NaN cells are blank and annotated ``-``.

    Args:
      R: accuracy matrix, fractions in ``[0,1]`` or percentages.
      path: output PNG path (parent directories are created).
      labels: ``T`` experience names, default ``0..T-1``.
      title: figure title.

    Returns:
      ``path`` as a string.
    """
    R = _as_matrix(R)
    rows, t = R.shape
    col_labels = _experience_labels(labels, t)
    row_labels = (
        col_labels[:rows] if rows == t else ["joint"] if rows == 1 else list(map(str, range(rows)))
    )
    vmax, fmt = _scale(R)

    fig = _new_figure(1.2 + 0.8 * t, 1.2 + 0.8 * max(rows, 2))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(R), cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    fig.colorbar(image, ax=ax, label="mIoU")
    for i in range(rows):
        for j in range(t):
            v = R[i, j]
            text = fmt.format(v) if np.isfinite(v) else _MISSING
            # Dark text on the bright end of viridis and on blank (NaN) cells, light elsewhere.
            light = not np.isfinite(v) or v / vmax > 0.6
            ax.text(j, i, text, ha="center", va="center", color="black" if light else "white")
    # Experience names are long: tilt them so neighbouring columns do not overlap.
    ax.set_xticks(range(t), col_labels, rotation=30, ha="right")
    ax.set_yticks(range(rows), row_labels)
    ax.set_xlabel("evaluated on experience j")
    ax.set_ylabel("after training on experience i")
    ax.set_title(title)
    return _save(fig, path)


def plot_curves(
    R: Any,
    path: str | os.PathLike,
    labels: Sequence[str] | None = None,
    title: str = "mIoU per experience during training",
) -> str:
    """Saves per-experience mIoU curves as PNG.

    One line per experience ``j``: ``R[i][j]`` against training step ``i`` (dotted before ``j``
    has been trained on, solid afterwards), plus a thick line for the average over the experiences
    seen so far (``mean_{j<=i} R[i][j]``; all experiences for a one-row joint ``R``).

    Args:
      R: ``[T,T]`` or ``[1,T]`` accuracy matrix.
      path: output PNG path (parent directories are created).
      labels: ``T`` experience names, default ``0..T-1``.
      title: figure title.

    Returns:
      ``path`` as a string.
    """
    R = _as_matrix(R)
    rows, t = R.shape
    names = _experience_labels(labels, t)
    steps = np.arange(rows)
    vmax, _ = _scale(R)

    fig = _new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    colors = [f"C{j % 10}" for j in range(t)]
    for j in range(t):
        trained = steps >= j if rows == t else np.ones(rows, dtype=bool)
        # Overlap one point so the dotted and solid parts join up.
        pre = ~trained
        if pre.any() and trained.any():
            pre[np.argmax(trained)] = True
        if pre.any():
            ax.plot(steps[pre], R[pre, j], ls=":", marker=".", color=colors[j])
        ax.plot(steps[trained], R[trained, j], ls="-", marker="o", color=colors[j], label=names[j])
    seen = [R[i, : i + 1] if rows == t else R[i] for i in range(rows)]
    avg = [float(np.mean(s[np.isfinite(s)])) if np.isfinite(s).any() else np.nan for s in seen]
    ax.plot(steps, avg, ls="-", lw=3, marker="s", color="black", label="avg (seen)")
    ax.set_xticks(steps, [names[i] for i in steps] if rows == t else ["joint"])
    ax.set_xlabel("after training on experience i")
    ax.set_ylabel("mIoU")
    ax.set_ylim(0.0, vmax)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def _lookup(result: Mapping[str, Any], key: str) -> Any:
    """A metric from the top level of a results dict, or from its ``summary`` sub-dict."""
    if key in result:
        return result[key]
    summary = result.get("summary")
    if isinstance(summary, Mapping):
        return summary.get(key)
    return None


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return _MISSING
    try:
        value = float(value)
    except (TypeError, ValueError):
        return _MISSING
    return format(value, spec) if math.isfinite(value) else _MISSING


def comparison_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Fixed-width text table comparing strategies.

    Args:
      rows: ``{strategy name: results dict}``; each dict holds ``cl_summary`` fields
        (``avg_miou``, ``forgetting``, ``bwt``, ``fwt``, ``avg_diag``) at its top level or under
        ``"summary"``, and ``timing = {"train_s": ..., "train_steps": ...}``.

    Returns:
      The table as a string (header, rule, one line per strategy). Metric values use 4
      decimals, train seconds 1 and steps/s 2; missing, ``None`` or NaN values show as ``-``.
      The average column names the results' ``metric`` (mIoU, accuracy or mAP).
    """
    metrics = {r.get("metric", "miou") for r in rows.values()}
    labels = {"miou": "mIoU", "accuracy": "acc", "map": "mAP"}
    name = labels.get(next(iter(metrics), "miou"), "mIoU")
    avg = f"avg {name}" if len(metrics) == 1 else "avg"
    header = ["strategy", avg, "forgetting", "BWT", "FWT", "avg diag", "train s", "steps/s"]
    table = [header]
    for name, result in rows.items():
        timing = result.get("timing") or {}
        train_s = timing.get("train_s")
        steps = timing.get("train_steps")
        steps_per_s = timing.get("steps_per_s")
        if steps_per_s is None and train_s and steps is not None:
            steps_per_s = float(steps) / float(train_s)
        table.append(
            [
                str(name),
                *(
                    _fmt(_lookup(result, k), ".4f")
                    for k in ("avg_miou", "forgetting", "bwt", "fwt", "avg_diag")
                ),
                _fmt(train_s, ".1f"),
                _fmt(steps_per_s, ".2f"),
            ]
        )
    return _text_table(table)


def _text_table(table: list[list[str]]) -> str:
    """Header, rule, rows; the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(w) for cell, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(table[0]), rule, *(line(r) for r in table[1:])])


ENSEMBLE_KEYS = ("forgetting", "bwt", "fwt")


def ensemble_table(results: Mapping[str, Any]) -> str:
    """An ensemble's results (``ensemble.summarize``) as text: one line per member, the mean +-
    std over all of them, and for a sweep one line per swept point (mean +- std over its
    seeds)."""
    avg = f"avg_{results.get('metric', 'miou')}"
    keys = (avg, *ENSEMBLE_KEYS)
    ens = results["ensemble"]

    def values(v: Mapping[str, Any]) -> str:
        return ", ".join(f"{k.split('.')[-1]}={x:g}" for k, x in v.items())

    table = [["member", *keys]]
    for m in results["members"]:
        label = f"{m['index']}: seed {m['seed']}" + (
            f", {values(m['values'])}" if m["values"] else ""
        )
        table.append([label, *(_fmt(m.get(k), ".4f") for k in keys)])
    pm = lambda mean, std, k: f"{_fmt(mean.get(k), '.4f')} +- {_fmt(std.get(k), '.4f')}"
    table.append(["mean +- std", *(pm(ens["mean"], ens["std"], k) for k in keys)])
    out = _text_table(table)
    if ens["sweep"]:
        points = [["swept point", "seeds", *keys]]
        for p in ens["points"]:
            seeds = ",".join(str(s) for s in p["seeds"])
            points.append([values(p["values"]), seeds, *(pm(p["mean"], p["std"], k) for k in keys)])
        out += "\n\n" + _text_table(points)
    return out
