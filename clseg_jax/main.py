"""Command line: ``python -m clseg_jax.main --config=configs/<file>.py[:<arg>] --workdir=<dir>``.

Fields are overridden with ``--config.<field>=<value>``. If ``config.compare`` names several
strategies, each runs into ``<workdir>/<strategy>/`` and a comparison table is printed.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging as std_logging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from clseg_jax import compiles, distributed, hostmem, paths, report, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and results go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    workdir = _WORKDIR.value
    logging.info(hostmem.keep_freed_memory())  # before JAX's threads first allocate
    stop_watchdog = distributed.initialize(config)  # before anything asks JAX for its devices
    try:
        _run(config, workdir)
    finally:
        stop_watchdog()


def _run(config, workdir: str) -> None:
    compiles.use_persistent_cache(config.get("compilation_cache_dir"))
    if config.get("compare"):
        rows = {}
        for name in config.compare:
            c = config.copy_and_resolve_references()
            c.strategy.name = name
            rows[name] = train.run(c, str(paths.resolve(workdir) / name))
            if not rows[name]:
                return _stopped(workdir)
        if distributed.is_primary():
            print(report.comparison_table(rows))
            print(f"results: {paths.resolve(workdir)}/<strategy>/results.json and *.png")
    else:
        results = train.run(config, workdir)
        if not results:
            return _stopped(workdir)
        if distributed.is_primary():
            if "ensemble" in results:
                print(report.ensemble_table(results))
            else:
                print(report.comparison_table({config.strategy.name: results}))
            print(f"results: {paths.resolve(workdir)}/results.json and *.png")


def _stopped(workdir: str) -> None:
    """After SIGTERM: the checkpoint is saved; say how to go on."""
    print(
        f"stopped on SIGTERM after saving a checkpoint in {paths.resolve(workdir)}; "
        "rerun the same command to resume"
    )


def check_args(argv: list[str]) -> None:
    """Raises ValueError with one line for a mistake in ``--config`` or a ``--config.<field>``
    override, which absl and ml_collections would otherwise report as a traceback or a fatal
    flags error: a missing config file or unknown config argument (the config file's own
    check), an override of a field the config does not have (naming the closest ones) and a
    value that is not of the field's type (bool, int, float)."""
    spec, overrides = None, []
    args = iter(argv[1:])
    for a in args:
        if a.startswith("--config="):
            spec = a.partition("=")[2]
        elif a.startswith("--config."):
            name, sep, value = a[len("--config.") :].partition("=")
            overrides.append((name, value if sep else next(args, "")))
    if spec is None:
        return  # absl names the missing required flag
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} not found (--config=<file>.py[:<arg>])")
    module_spec = importlib.util.spec_from_file_location("_clseg_checked_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    for name, value in overrides:
        _check_override(config, name, value)


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _check_override(config, name: str, value: str) -> None:
    node, parent, done = config, None, []
    for part in name.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            where = ".".join(["config", *done])
            close = difflib.get_close_matches(part, keys, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"--config.{name}: {where} has no field {part!r}{hint} (fields: {sorted(keys)})"
            )
        node, parent, done = node[part], node, [*done, part]
    # A typed placeholder (a None default, e.g. model.kwargs.dtype) has its type on the parent.
    kind = parent.get_type(part) if node is None and hasattr(parent, "get_type") else type(node)
    try:
        if kind is bool:
            if value.lower() not in _TRUE + _FALSE:
                raise ValueError
        elif kind in (int, float):
            kind(value)
    except ValueError:
        raise ValueError(
            f"--config.{name}={value}: expected {kind.__name__} (the field is {node!r})"
        ) from None


class _QuietLibraries(std_logging.Filter):
    """Drops the INFO chatter of orbax (a dozen lines per checkpoint); keeps its warnings."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def run() -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
        check_args(sys.argv)
        app.run(main)
    except (ValueError, FileNotFoundError, train.NonFiniteLossError) as e:
        sys.exit(f"error: {e}")  # once: the absl log line would say it again
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        first = str(e).strip().splitlines()[0][:300]
        distributed.lost_peer(f"a collective failed ({first})")


if __name__ == "__main__":
    run()
