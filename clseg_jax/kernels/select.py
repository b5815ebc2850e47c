"""``model.conv_impl``: which code computes the models' convolutions.

``xla``: ``lax.conv_general_dilated`` (cuDNN on GPUs, the TPU's convolutions, Eigen/XLA on CPUs).
``onednn``: the oneDNN custom calls (``kernels/onednn.py``), CPU and float32 only. ``auto``:
oneDNN where it applies (a CPU backend, one device in the mesh, float32 compute, the kernel
built) and XLA otherwise, with one log line saying which and why.
"""

from __future__ import annotations

import logging

import jax

from clseg_jax.kernels import onednn

IMPLS = ("auto", "xla", "onednn")


def check(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"unknown model.conv_impl {impl!r}; valid: {list(IMPLS)}")


def why_not_onednn(dtype: str, devices: int, backend: str | None = None) -> str | None:
    """None if the oneDNN kernel can compute this run's convolutions, else why not (one line)."""
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return f"the backend is {backend}, not cpu"
    if dtype != "float32":
        return f"the compute dtype is {dtype}; the kernel is float32 only"
    if devices > 1:
        # Each device would call the kernel on the whole, all-gathered batch.
        return f"the mesh has {devices} devices; the kernel is not partitioned"
    return onednn.problem()


def resolve(impl: str, *, dtype: str, devices: int, backend: str | None = None) -> str:
    """``"xla"`` or ``"onednn"``: what ``impl`` means for this run; an explicit ``onednn`` that
    cannot be honoured is a one-line error, never a silent fallback."""
    check(impl)
    if impl == "xla":
        return impl
    why = why_not_onednn(dtype, devices, backend)
    if impl == "onednn":
        if why:
            raise ValueError(f"model.conv_impl='onednn' cannot be used here: {why}")
        return impl
    if why:
        logging.info("conv_impl auto: XLA convolutions (%s)", why)
        return "xla"
    logging.info("conv_impl auto: oneDNN %s convolutions", onednn.version())
    return "onednn"
