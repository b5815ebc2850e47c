"""Mixed precision: ``config.precision`` picks the dtype convolutions and matmuls run in.

``float32`` runs everything in float32. ``bfloat16`` runs the model's convolutions and matmuls in
bfloat16 (each layer casts its input and float32 kernel, the ``dtype`` argument every model
takes); parameters, optimizer state and BatchNorm statistics stay float32 (flax keeps the
statistics' reductions in float32), the model's outputs are cast back to float32 before any loss
reads them (``step.make_forward``), and strategy state (Fisher, importances, the QP, stored
logits) is computed from those float32 outputs and float32 gradients. ``auto`` is bfloat16 on a
GPU or TPU and float32 on a CPU, where XLA has no fast bfloat16 convolution.

The cosine classifier (``models/cosine.py``) keeps its matmul in float32 on purpose: its logits
are at most ``sigma`` apart, and bfloat16's 8 bits of mantissa would blur them.
"""

from __future__ import annotations

import jax
import ml_collections

PRECISIONS = ("float32", "bfloat16", "auto")
# Backends with fast bfloat16 convolutions and matmuls (tensor cores, the MXU).
BF16_BACKENDS = ("gpu", "tpu", "cuda", "rocm")


def check(precision: str) -> None:
    """A one-line error for a precision that is not one of ``PRECISIONS``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {list(PRECISIONS)}")


def compute_dtype(precision: str, backend: str | None = None) -> str:
    """``"float32"`` or ``"bfloat16"``: what ``precision`` means on ``backend`` (default: JAX's)."""
    check(precision)
    if precision != "auto":
        return precision
    backend = backend or jax.default_backend()
    return "bfloat16" if backend in BF16_BACKENDS else "float32"


def model_config(
    model: ml_collections.ConfigDict, precision: str, backend: str | None = None
) -> ml_collections.ConfigDict:
    """``model`` with ``kwargs.dtype`` set from ``precision``.

    ``model.kwargs.dtype`` is the model-level knob underneath; set together with a precision
    that says otherwise it is refused rather than silently overridden.
    """
    dtype = compute_dtype(precision, backend)
    given = model.kwargs.get("dtype", None)
    if dtype == "float32":
        return model
    if given and given != dtype:
        raise ValueError(
            f"config.precision={precision!r} means {dtype} here but "
            f"config.model.kwargs.dtype={given!r}; set one of them"
        )
    out = model.copy_and_resolve_references()
    out.kwargs["dtype"] = dtype
    return out


def describe(config: ml_collections.ConfigDict) -> dict[str, str]:
    """``{"policy": config.precision, "compute": <dtype the model computes in>}`` for results."""
    policy = str(config.get("precision", "float32"))
    model = config.get("model", None)
    given = model.get("kwargs", {}).get("dtype", None) if model is not None else None
    return {"policy": policy, "compute": str(given or compute_dtype(policy))}
