"""Host memory: keep freed heap pages for reuse instead of handing them back to the kernel.

Why: XLA:CPU allocates every execution's temporary buffer afresh (``posix_memalign``; 219 MB
for the W1 train step), and glibc serves any allocation above its mmap threshold (32 MiB at
most) with a new ``mmap`` that it unmaps again on ``free``. So each step page-faults on, and
the kernel zeroes, all of its activations once more: 56,000 minor faults and ~140 ms of kernel
time per W1 step on a 2-core machine, a third of the step (docs/cpu_speed.md). PyTorch's tensors
stay under the threshold and are reused from the heap. glibc's allocation from a worker
thread's own arena falls back to ``mmap`` whatever ``M_MMAP_MAX`` says, so the settings are:
one arena (the main one, grown with ``brk``), no ``mmap`` and a trim threshold of 2 GiB. Freed
memory then stays in the process for the next step, as with PyTorch's caching allocators; the
process keeps its peak resident size.

The settings only affect threads that have not allocated yet, so ``keep_freed_memory`` must
run before the first JAX computation (the CLI, the service and the benchmarks call it first
thing). ``CLSEG_HOST_MEMORY=release`` keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "libtpu")


def _accelerator_expected() -> str | None:
    """The reason to leave the allocator alone on an accelerator host, or None on a CPU one."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return None if platforms.split(",")[0] == "cpu" else f"JAX_PLATFORMS={platforms}"
    for name in ACCELERATOR_PLUGINS:
        if importlib.util.find_spec(name) is not None:
            return f"{name} is installed"
    return None


def keep_freed_memory() -> str:
    """Sets glibc's allocator to reuse freed memory (see the module docstring); one log line back.

    A no-op (saying why) with ``CLSEG_HOST_MEMORY=release``, off Linux/glibc, and where JAX will
    run on an accelerator (its activations live in device memory).
    """
    if os.environ.get("CLSEG_HOST_MEMORY", "keep") == "release":
        return "host memory: glibc's defaults (CLSEG_HOST_MEMORY=release)"
    if not sys.platform.startswith("linux"):
        return f"host memory: the platform's defaults ({sys.platform})"
    why = _accelerator_expected()
    if why:
        return f"host memory: glibc's defaults ({why})"
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        return "host memory: the C library's defaults (not glibc)"
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not all(libc.mallopt(param, value) == 1 for param, value in settings):
        return "host memory: glibc refused mallopt; defaults kept"
    return "host memory: freed memory kept for reuse (one glibc arena, no mmap)"
