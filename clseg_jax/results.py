"""A run's results: the statistics kept per phase, and results.json with its plots.

``Progress`` is what a run has measured so far; it is saved as checkpoint metadata (JSON), so a
resumed run reports the phases it did not redo. ``summarize`` turns it into the results dict
(schema in docs/results.md): the accuracy matrix R[i][j] (phase i, experience j),
the CL summary (average, forgetting, BWT, FWT), per-class figures, and for class-incremental
segmentation the MiB/PLOP old/new/all mIoU.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_collections
import numpy as np
from absl import logging

from clseg_jax import evaluate, metrics, paths, precision, report, tasks
from clseg_jax.data import base as data_base
from clseg_jax.strategies import base

TIMING_KEYS = ("train_s", "train_steps", "compile_s", "strategy_s", "eval_s", "checkpoint_s")


class Progress(NamedTuple):
    """Where a run stands; saved as checkpoint metadata (JSON, so statistics are lists)."""

    phase: int
    step_in_phase: int
    iterator: dict | None
    rows: list  # statistics per finished phase: rows[i][j] = [K,K] confusion or [K] APs
    initial_row: list | None
    timing: dict
    rows_task_il: list | tuple = ()  # the same, task-incremental (config.eval_task_il)
    overall: list | tuple = ()  # multi-label: mAP over seen classes on the seen tasks' images
    full: list | tuple = ()  # [K,K] confusion on the stream's full test set after each phase


def start() -> Progress:
    """The progress of a run that has done nothing yet."""
    timing = {**dict.fromkeys(TIMING_KEYS, 0.0), "compiles_per_phase": []}
    return Progress(0, 0, None, [], None, timing)


def record_phase(progress: Progress, phase: base.Phase, ev: evaluate.PhaseEval) -> Progress:
    """The progress after ``phase`` finished and was evaluated as ``ev``."""
    return Progress(
        phase.index + 1,
        0,
        None,
        [*progress.rows, [c.tolist() for c in ev.row]],
        progress.initial_row,
        progress.timing,
        [*progress.rows_task_il, [c.tolist() for c in ev.row_task_il]] if ev.row_task_il else [],
        [*progress.overall, ev.overall] if ev.overall is not None else [],
        [*progress.full, ev.full.tolist()] if ev.full is not None else [],
    )


def _per_class(task: tasks.Task, stat) -> dict[str, float]:
    return {str(c): v for c, v in enumerate(task.per_class(np.asarray(stat)))}


def old_new_all(
    phases: list[base.Phase], confs: list, full: list | tuple, task: tasks.Task
) -> dict[str, Any]:
    """MiB/PLOP-table figures per phase: mIoU over old (background included), new and all
    seen classes, and their averages over phases.

    On the stream's full test set when it has one; otherwise on the union of the seen
    experiences' test sets (disjoint by construction in such streams), each with the labels
    seen at that experience.
    """
    out, ious = [], []
    for i, phase in enumerate(phases):
        old = sorted(set(phase.seen_classes) - set(phase.new_classes))
        if full:
            total = np.array(full[i])
        else:
            total = sum(confs[i][: max(phase.experiences) + 1])
        out.append(metrics.old_new_all(total, old, phase.new_classes))
        ious.append(metrics.iou_per_class(total))
    averages = {key: metrics.nanmean([o[key] for o in out]) for key in ("old", "new", "all")}
    last = phases[-1]
    result = {
        "old_new_all": out,
        "old_new_all_avg": averages,
        "old_new_all_on": "full test set" if full else "seen experiences' test sets",
        "class_forgetting": metrics.class_forgetting(
            ious, set(last.seen_classes) - set(last.new_classes)
        ),
    }
    if full:
        result["full_test_per_class"] = [_per_class(task, f) for f in full]
    return result


def summarize(
    progress: Progress,
    *,
    config: ml_collections.ConfigDict,
    stream: data_base.Stream,
    phases: list[base.Phase],
    task: tasks.Task,
    compile_count: int,
) -> dict[str, Any]:
    """The results dict of a finished run (what results.json holds)."""
    t = len(stream.experiences)

    def score(stat, j: int) -> float:
        return task.score(np.asarray(stat), stream.experiences[j].classes)

    confs = [[np.array(c) for c in row] for row in progress.rows]
    # Rows evaluated before the stream grew (a lineage's earlier jobs) end early: NaN there.
    R = [[score(c, j) for j, c in enumerate(row)] + [np.nan] * (t - len(row)) for row in confs]
    initial = [score(c, j) for j, c in enumerate(progress.initial_row)]
    if len(initial) != t:  # FWT needs the untrained model on experiences that came later
        initial = None
    timing = dict(progress.timing)
    timing["compile_count"] = compile_count
    timing["steps_per_s"] = timing["train_steps"] / max(timing["train_s"], 1e-9)
    results = {
        "metric": task.metric,
        "task": task.name,
        "strategy": config.strategy.name,
        "precision": precision.describe(config),
        "accuracy_matrix": R,
        "initial_row": initial,
        **metrics.cl_summary(R, initial if len(R) > 1 else None),
        "per_class": [_per_class(task, stat) for stat in confs[-1]],
        "phases": [list(p.experiences) for p in phases],
        "stream": {
            "name": stream.name,
            "kind": stream.kind,
            "num_classes": stream.num_classes,
            "class_names": list(stream.class_names),
            "experiences": [e.name for e in stream.experiences],
        },
        "timing": timing,
        "config": config.to_dict(),
    }
    if progress.overall:
        results["overall_map"] = list(progress.overall)
    if progress.rows_task_il:
        R_task = [[score(c, j) for j, c in enumerate(row)] for row in progress.rows_task_il]
        results["task_il"] = {"accuracy_matrix": R_task, **metrics.cl_summary(R_task)}
    # The average under the metric's own name; "avg_miou" stays for one release (deprecated
    # for classification and multi-label, where it never held an mIoU).
    results[f"avg_{task.metric}"] = results["avg_miou"]
    results["forgetting_on"] = "accuracy matrix"
    if stream.kind == "class" and task.name == "segmentation":
        results.update(old_new_all(phases, confs, progress.full, task))
        # The headline is per class (the accuracy matrix scores an earlier experience's images
        # with that experience's classes, so a correctly learnt new class counts as forgetting).
        results["forgetting_R"] = results["forgetting"]
        results["forgetting"] = results["class_forgetting"]
        results["forgetting_on"] = f"old classes' IoU on the {results['old_new_all_on']}"
    return results


def write(workdir: str, results: dict[str, Any]) -> None:
    """results.json, the accuracy-matrix heatmap and the curves under ``workdir``."""
    workdir = paths.resolve(workdir)
    report.write_results(workdir, results)
    R, names = results["accuracy_matrix"], results["stream"]["experiences"]
    report.plot_accuracy_matrix(R, workdir / "accuracy_matrix.png", labels=names)
    report.plot_curves(R, workdir / "curves.png", labels=names)
    logging.info("results written to %s", workdir / "results.json")
