"""Counting XLA compilations: what "the step compiles once per shape and strategy" is checked by.

One counter for the trainer (``timing.compiles_per_phase`` in results.json) and the tests. It
listens to JAX's own monitoring event for backend compiles, so it sees every compiled program:
the step, the evaluator, and any eager op a host-side hook runs (each compiles on first use).
``use_persistent_cache`` points JAX's persistent compilation cache at the config's folder.
"""

from __future__ import annotations

import os

import jax

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class Counter:
    """Counts backend compilations while entered.

    ``with Counter() as c: ...`` then ``c.count``; ``c.mark()`` returns the count so far, for
    per-phase differences inside one long ``with``.
    """

    def __init__(self) -> None:
        self.count = 0

    def _listen(self, name: str, _secs: float, **_) -> None:
        if name == _BACKEND_COMPILE:
            self.count += 1

    def mark(self) -> int:
        return self.count

    def __enter__(self) -> Counter:
        self.count = 0
        self._listener = self._listen  # the same object must be unregistered
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)


def use_persistent_cache(path: str | None) -> None:
    """Keeps compiled programs in JAX's persistent cache in ``path``
    (``config.compilation_cache_dir``), so that a rerun of a config loads its programs instead of
    compiling them again.

    An explicit JAX setting (``JAX_COMPILATION_CACHE_DIR``, the tests') wins; an empty path does
    nothing.
    """
    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
