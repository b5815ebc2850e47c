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
