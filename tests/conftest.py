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
# One oneDNN convolution thread per test process: a convolution's rounding depends on its thread
# count (clseg_jax/kernels/onednn.py), and behaviour tests train long enough for that to move
# their numbers, so they compute the same on every machine (2 pytest workers on this 2-core one).
os.environ.setdefault("CLSEG_ONEDNN_THREADS", "1")

# As a run does (clseg_jax/main.py): before any JAX thread allocates, so that compiled steps
# reuse their temporary buffers instead of page-faulting them in afresh on every call.
from clseg_jax import hostmem  # noqa: E402

hostmem.keep_freed_memory()

# anyio is a pytest plugin, so pytest rewrites its modules on import; Starlette's FileResponse
# imports anyio's file module lazily, and that import (an ast.parse) racing another thread's
# compile trips CPython 3.11's "AST constructor recursion depth mismatch" in the serve tests.
# Importing it here, before any server thread exists, takes the race away.
try:
    import anyio._core._fileio  # noqa: F401
except ImportError:  # the serve extra is not installed
    pass

# Seconds each test file took (summed, two pytest workers on 2 cores, 2026-12-06 at 05dc3c5);
# files not listed took under 10 s. The Makefile runs xdist with --no-loadscope-reorder, so files
# are handed to workers in collection order: longest first leaves no long file to run alone at
# the end (xdist's own reorder, by test count, put the few-test behaviour files last).
FILE_COST_S = {
    "test_behaviour_ci.py": 544,
    "test_behaviour_memory.py": 475,
    "test_behaviour_data_free.py": 376,
    "test_contract.py": 162,
    "test_behaviour.py": 160,
    "test_behaviour_multilabel.py": 100,
    "test_ensemble.py": 88,
    "test_multihost.py": 82,  # measured alone, 2026-12-06 (its processes use both cores)
    "test_serve_reliability.py": 81,
    "test_ci_models.py": 73,
    "test_deepinversion.py": 51,
    "test_precision.py": 17,
    "test_projection_strategies.py": 43,
    "test_serve_api.py": 40,
    "test_strategy_interface.py": 39,
    "test_train.py": 38,
    "test_deeplab.py": 37,
    "test_der_icarl.py": 36,
    "test_ccsi.py": 33,
    "test_plop.py": 30,
    "test_models.py": 30,
    "test_bisenet.py": 26,
    "test_protocol_table.py": 25,
    "test_ppi.py": 25,
    "test_resnet.py": 23,
    "test_serve_web.py": 21,
    "test_sharding.py": 21,
    "test_impressions.py": 17,
    "test_regularizers_math.py": 16,
    "test_mib.py": 15,
    "test_distillation_math.py": 15,
    "test_row_owners.py": 14,
    "test_qp.py": 14,
    "test_tasks.py": 11,
}


def pytest_collection_modifyitems(items):
    """Longest-processing-time-first order of files (stable within a file)."""
    items.sort(key=lambda item: -FILE_COST_S.get(item.path.name, 0))
