"""Command line: ``python -m clseg_jax.main --config=configs/<file>.py[:<arg>] --workdir=<dir>``.

Fields are overridden with ``--config.<field>=<value>``. If ``config.compare`` names several
strategies, each runs into ``<workdir>/<strategy>/`` and a comparison table is printed.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from clseg_jax import report, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and results go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    workdir = _WORKDIR.value
    cache = config.get("compilation_cache_dir")
    if cache and not jax.config.jax_compilation_cache_dir:  # an explicit JAX setting wins
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if config.get("compare"):
        rows = {}
        for name in config.compare:
            c = config.copy_and_resolve_references()
            c.strategy.name = name
            rows[name] = train.run(c, os.path.join(workdir, name))
            if not rows[name]:
                return _stopped(workdir)
        print(report.comparison_table(rows))
        print(f"results: {os.path.abspath(workdir)}/<strategy>/results.json and *.png")
    else:
        results = train.run(config, workdir)
        if not results:
            return _stopped(workdir)
        print(report.comparison_table({config.strategy.name: results}))
        print(f"results: {os.path.abspath(workdir)}/results.json and *.png")


def _stopped(workdir: str) -> None:
    """After SIGTERM: the checkpoint is saved; say how to go on."""
    print(
        f"stopped on SIGTERM after saving a checkpoint in {os.path.abspath(workdir)}; "
        "rerun the same command to resume"
    )


class _QuietLibraries(std_logging.Filter):
    """Drops the INFO chatter of orbax (a dozen lines per checkpoint); keeps its warnings."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def run() -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
        app.run(main)
    except (ValueError, FileNotFoundError, train.NonFiniteLossError) as e:
        logging.error("%s", e)
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    run()
