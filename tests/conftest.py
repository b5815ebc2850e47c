"""Test session setup: one persistent XLA cache for the session and its subprocesses.

Many tests compile the same tiny programs (the CLI tests in subprocesses too); the cache makes
each compile once. It only stores compiled executables, so results do not depend on it.
"""

from __future__ import annotations

import os

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Set before JAX is imported (by any test module), and inherited by subprocesses.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".pytest_cache", "xla-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# anyio is a pytest plugin, so pytest rewrites its modules on import; Starlette's FileResponse
# imports anyio's file module lazily, and that import (an ast.parse) racing another thread's
# compile trips CPython 3.11's "AST constructor recursion depth mismatch" in the serve tests.
# Importing it here, before any server thread exists, takes the race away.
try:
    import anyio._core._fileio  # noqa: F401
except ImportError:  # the serve extra is not installed
    pass

# Seconds each test file took (summed, two pytest workers on 2 cores, 2026-12-06); files not
# listed took under 10 s. The Makefile runs xdist with --no-loadscope-reorder, so files are handed
# to workers in collection order: longest first leaves no long file to run alone at the end
# (xdist's own reorder, by test count, put the few-test behaviour files last).
FILE_COST_S = {
    "test_behaviour_ci.py": 533,
    "test_behaviour_memory.py": 436,
    "test_behaviour_data_free.py": 353,
    "test_contract.py": 286,
    "test_behaviour.py": 168,
    "test_behaviour_multilabel.py": 92,
    "test_serve_reliability.py": 78,
    "test_deepinversion.py": 53,
    "test_serve_api.py": 41,
    "test_train.py": 40,
    "test_deeplab.py": 39,
    "test_ccsi.py": 36,
    "test_projection_strategies.py": 32,
    "test_strategy_interface.py": 31,
    "test_ci_models.py": 30,
    "test_der_icarl.py": 29,
    "test_models.py": 25,
    "test_plop.py": 25,
    "test_protocol_table.py": 21,
    "test_resnet.py": 20,
    "test_bisenet.py": 20,
    "test_serve_web.py": 19,
    "test_sharding.py": 17,
    "test_ppi.py": 17,
    "test_regularizers_math.py": 16,
    "test_impressions.py": 15,
    "test_mib.py": 14,
    "test_distillation_math.py": 14,
    "test_qp.py": 12,
    "test_row_owners.py": 12,
    "test_tasks.py": 11,
}


def pytest_collection_modifyitems(items):
    """Longest-processing-time-first order of files (stable within a file)."""
    items.sort(key=lambda item: -FILE_COST_S.get(item.path.name, 0))
