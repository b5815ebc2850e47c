"""Runs a whole class-incremental protocol table and writes it as Markdown (MiB/PLOP style).

    python experiments/protocol_table.py --config configs/voc_ci.py \
        --tasks 15-5,15-1 --settings overlapped --methods finetune,mib,plop,ilt \
        --arg root=/data/VOCdevkit/VOC2012 --workdir runs/voc_table \
        --out experiments/results/voc_table.md

Every (task, setting, method, seed) is one ``train.run`` of ``<config>:task=..,setting=..,
method=..,seed=..[,<arg>]`` into ``<workdir>/<task>_<setting>_<method>_s<seed>``; a finished run
is read back from its ``results.json`` and an interrupted one resumes from its checkpoint, so the
same command continues a half-done table. ``--set key=value`` overrides config fields
(``epochs=1``).

The table has, per task and setting, one row per method: mIoU after the last step over the old
classes (background included, MiB's ``0-a`` column), the new ones, all, and the average of "all"
over steps (PLOP's "avg"), each the mean over seeds (+- the spread when there are several), next to
the paper's numbers when the config module lists them in ``PAPER``. A JSON file with every run's
figures is written next to the Markdown.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clseg_jax import train


def load_config_module(path: str):
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load config file {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def apply_overrides(config, overrides: Sequence[str]) -> None:
    """``key.sub=value`` overrides, typed like the field they replace."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set needs key=value, got {item!r}")
        node = config
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        if last not in node:
            raise SystemExit(f"--set: unknown config field {key!r}")
        old = node[last]
        if isinstance(old, bool):
            node[last] = value.lower() in ("1", "true", "yes")
        elif isinstance(old, (int, float, str)):
            node[last] = type(old)(value)
        else:
            node[last] = json.loads(value)


def run_one(module, arg: str, overrides: Sequence[str], workdir: str) -> dict[str, Any]:
    """Results of one run: read back if finished, else trained (resuming if interrupted)."""
    done = os.path.join(workdir, "results.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    config = module.get_config(arg)
    apply_overrides(config, overrides)
    results = train.run(config, workdir)
    if not results:
        raise SystemExit(f"stopped before the end of {workdir}; rerun to resume")
    return results


def _cell(values: list[float]) -> str:
    v = np.asarray(values, float) * 100
    if np.all(np.isnan(v)):
        return "-"
    if len(v) == 1:
        return f"{v[0]:.1f}"
    return f"{np.nanmean(v):.1f} ± {np.nanstd(v):.1f}"


def _paper(paper: dict, task: str, setting: str, method: str) -> str:
    row = paper.get((task, setting, method))
    return " / ".join(f"{x:.1f}" for x in row) if row else ""


def table(runs: list[dict[str, Any]], paper: dict) -> str:
    """Markdown: one section per (task, setting), one row per method."""
    lines = []
    keys = list(dict.fromkeys((r["task"], r["setting"]) for r in runs))
    for task, setting in keys:
        group = [r for r in runs if (r["task"], r["setting"]) == (task, setting)]
        first = group[0]
        lines += [
            f"### {task} {setting}",
            "",
            f"old = classes {first['old_span']} (background included), new = {first['new_span']}; "
            f"seeds: {sorted({r['seed'] for r in group})}",
            "",
            "| method | old | new | all | avg (all over steps) | paper old / new / all |",
            "|---|---|---|---|---|---|",
        ]
        for method in dict.fromkeys(r["method"] for r in group):
            rows = [r for r in group if r["method"] == method]
            cells = [_cell([r["last"][k] for r in rows]) for k in ("old", "new", "all")]
            cells.append(_cell([r["avg"]["all"] for r in rows]))
            lines.append(
                f"| {method} | {' | '.join(cells)} | {_paper(paper, task, setting, method)} |"
            )
        lines.append("")
    return "\n".join(lines)


def summarize(results: dict, task: str, setting: str, method: str, seed: int) -> dict[str, Any]:
    classes = results["stream"]["experiences"]
    return {
        "task": task,
        "setting": setting,
        "method": method,
        "seed": seed,
        "last": results["old_new_all"][-1],
        "avg": results["old_new_all_avg"],
        "per_step": results["old_new_all"],
        "evaluated_on": results.get("old_new_all_on"),
        "old_span": "0 + " + " + ".join(classes[:-1]) if len(classes) > 1 else "0",
        "new_span": classes[-1],
        "timing": results["timing"],
    }


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="config file with get_config(arg)")
    parser.add_argument("--tasks", required=True, help="comma-separated protocols, e.g. 15-5,15-1")
    parser.add_argument("--settings", default="overlapped")
    parser.add_argument("--methods", default="finetune,mib,plop,ilt")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--arg", default="", help="extra config argument, e.g. root=/data/VOC")
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True, help="Markdown file (JSON written next to it)")
    args = parser.parse_args(argv)

    module = load_config_module(args.config)
    runs = []
    for task in args.tasks.split(","):
        for setting in args.settings.split(","):
            for method in args.methods.split(","):
                for seed in (int(s) for s in args.seeds.split(",")):
                    arg = f"task={task},setting={setting},method={method},seed={seed}"
                    arg += f",{args.arg}" if args.arg else ""
                    workdir = os.path.join(args.workdir, f"{task}_{setting}_{method}_s{seed}")
                    results = run_one(module, arg, args.set, workdir)
                    runs.append(summarize(results, task, setting, method, seed))
    title = f"# {os.path.basename(args.config)}: {args.tasks} ({args.settings})\n\n"
    command = "python " + " ".join(sys.argv if argv is None else ["protocol_table.py", *argv])
    text = title + f"Command: `{command}`\n\n" + table(runs, getattr(module, "PAPER", {}))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"command": command, "runs": runs}, f, indent=1)
    print(text)
    return text


if __name__ == "__main__":
    main()
