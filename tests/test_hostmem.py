"""hostmem.keep_freed_memory: a compiled temporary buffer stops page-faulting on every call."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from clseg_jax import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# exp(x) is a 64 MB temporary (a dot's operand is not fused on the CPU): above glibc's largest
# mmap threshold, so with its defaults each call maps it afresh and faults on every page.
FAULTS_PER_CALL = textwrap.dedent(
    """
    import resource
    from clseg_jax import hostmem
    print(hostmem.keep_freed_memory())
    import jax, jax.numpy as jnp
    x, w = jnp.ones((8192, 2048)), jnp.ones((2048, 8))
    f = jax.jit(lambda x, w: jnp.exp(x) @ w)
    for _ in range(30):  # the heap settles: buffers of calls in flight together, split chunks
        f(x, w).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        f(x, w).block_until_ready()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 40)
    """
)


def _faults(setting: str) -> tuple[str, float]:
    env = {**os.environ, "CLSEG_HOST_MEMORY": setting, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_CALL],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return out[0], float(out[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_stops_the_per_call_page_faults():
    line, kept = _faults("keep")
    assert line.startswith("host memory: freed memory kept"), line
    line, released = _faults("release")
    assert "CLSEG_HOST_MEMORY=release" in line
    # 64 MB is 16,384 pages: glibc's defaults fault on (nearly) all of them every call.
    assert released > 12_000, released
    assert kept < released / 8, (kept, released)


def test_left_alone_where_it_does_not_apply(monkeypatch):
    monkeypatch.setenv("CLSEG_HOST_MEMORY", "release")
    assert hostmem.keep_freed_memory() == (
        "host memory: glibc's defaults (CLSEG_HOST_MEMORY=release)"
    )
    monkeypatch.setenv("CLSEG_HOST_MEMORY", "keep")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert hostmem.keep_freed_memory() == "host memory: glibc's defaults (JAX_PLATFORMS=cuda,cpu)"
