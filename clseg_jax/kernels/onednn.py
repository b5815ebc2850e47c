"""oneDNN convolutions inside the compiled step: XLA FFI custom calls with a ``custom_vjp``.

``conv2d(x [N,H,W,I], kernel [KH,KW,I,O], strides, padding, dilation) -> [N,OH,OW,O]``, float32,
is ``lax.conv_general_dilated`` with NHWC/HWIO/NHWC dimension numbers computed by oneDNN
(``conv_onednn.cc``): forward, and for ``jax.grad`` its backward-data and backward-weights
primitives. Under ``jax.vmap`` a batch of activations with one kernel folds into the batch
axis (one call); a batch of kernels (per-sample weight gradients, vmapped ensembles) runs the
calls one after another (``lax.map``), each still a oneDNN convolution.

The library is built by ``python -m clseg_jax.kernels.build`` (``make kernels``); ``problem()``
says why it cannot be used where it cannot (no build, no oneDNN), and ``model.conv_impl=auto``
then means XLA.

Threads: OpenMP (the ``onednn-cpu-gomp`` wheel). Each call sets its thread count (an attribute
of the call, so one shape always splits its work the same way: deterministic) to
``CLSEG_ONEDNN_THREADS`` or the cores this process may use, and idle OpenMP threads sleep
(``OMP_WAIT_POLICY=PASSIVE`` unless set) so that XLA's own threads are not starved.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

LIB_NAME = "libclseg_onednn.so"
LIB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build")
TARGETS = {
    "clseg_conv_forward": "ClsegConvForward",
    "clseg_conv_backward_data": "ClsegConvBackwardData",
    "clseg_conv_backward_weights": "ClsegConvBackwardWeights",
}
Pads = tuple[tuple[int, int], tuple[int, int]]


def lib_path() -> str:
    return os.environ.get("CLSEG_ONEDNN_LIB", os.path.join(LIB_DIR, LIB_NAME))


def dnnl_lib_dir() -> str:
    """Where pip's oneDNN wheel puts ``libdnnl.so.3``: the environment's ``lib``."""
    return os.path.join(sys.prefix, "lib")


@functools.cache
def _load() -> tuple[int, str | None]:
    """Loads and registers the kernels once: ``(oneDNN version as 30200, None)`` or
    ``(0, why not)``."""
    path = lib_path()
    if not os.path.exists(path):
        return 0, f"the oneDNN kernel is not built ({path} missing; run `make kernels`)"
    # Read by libgomp when it starts, i.e. when the library below pulls it in.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        dnnl = os.path.join(dnnl_lib_dir(), "libdnnl.so.3")
        if os.path.exists(dnnl):
            ctypes.CDLL(dnnl, mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(path)
    except OSError as e:
        return 0, f"the oneDNN kernel does not load: {e}"
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), "cpu")
    return int(lib.clseg_onednn_version()), None


def problem() -> str | None:
    """None if the kernel is built and loads, else one line saying why not."""
    return _load()[1]


def version() -> str:
    v = _load()[0]
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}" if v else "none"


def threads() -> int:
    """Threads per convolution: ``CLSEG_ONEDNN_THREADS``, else the cores this process may use."""
    given = os.environ.get("CLSEG_ONEDNN_THREADS")
    if given:
        return max(1, int(given))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def output_shape(x: jax.Array, k: jax.Array, strides, padding: Pads, dilation) -> tuple[int, ...]:
    """``[N,OH,OW,O]``: lax's own shape rule for the same convolution (abstract, no compute)."""
    conv = lambda x, k: jax.lax.conv_general_dilated(
        x, k, strides, padding, rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jax.eval_shape(conv, x, k).shape


def _call(target: str, shape, a, b, geometry) -> jax.Array:
    strides, padding, dilation = geometry
    _load()
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32))(
        a,
        b,
        strides=np.asarray(strides, np.int64),
        padding=np.asarray([p for pair in padding for p in pair], np.int64),
        dilation=np.asarray(dilation, np.int64),
        threads=np.int64(threads()),
    )


def _batched(call):
    """``call(a, b)`` as a ``custom_vmap`` function: a batch of first operands with one second
    operand folds into the batch axis (one call); anything else loops over the vmapped axis."""
    fn = jax.custom_batching.custom_vmap(call)

    @fn.def_vmap
    def rule(axis_size, in_batched, a, b):
        a_batched, b_batched = in_batched
        if a_batched and not b_batched:
            out = call(a.reshape(axis_size * a.shape[1], *a.shape[2:]), b)
            return out.reshape(axis_size, a.shape[1], *out.shape[1:]), True
        a = a if a_batched else jnp.broadcast_to(a, (axis_size, *a.shape))
        b = b if b_batched else jnp.broadcast_to(b, (axis_size, *b.shape))
        return jax.lax.map(lambda ab: call(*ab), (a, b)), True

    return fn


def _forward(geometry, x, k):
    shape = output_shape(x, k, *geometry)
    return _call("clseg_conv_forward", shape, x, k, geometry)


def _backward_data(geometry, x_hw, dy, k):
    shape = (dy.shape[0], *x_hw, k.shape[2])
    return _call("clseg_conv_backward_data", shape, dy, k, geometry)


def _backward_weights(geometry, k_shape, x, dy):
    return _call("clseg_conv_backward_weights", k_shape, x, dy, geometry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x: jax.Array, k: jax.Array, geometry) -> jax.Array:
    return _batched(functools.partial(_forward, geometry))(x, k)


def _conv_fwd(x, k, geometry):
    return _batched(functools.partial(_forward, geometry))(x, k), (x, k)


def _conv_bwd(geometry, res, dy):
    x, k = res
    data = functools.partial(_backward_data, geometry, tuple(x.shape[1:3]))
    weights = functools.partial(_backward_weights, geometry, tuple(k.shape))
    return _batched(data)(dy, k), _batched(weights)(x, dy)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x: jax.Array, kernel: jax.Array, strides, padding: Pads, dilation) -> jax.Array:
    """``[N,H,W,I] * [KH,KW,I,O] -> [N,OH,OW,O]`` by oneDNN; float32 only (one-line error
    otherwise, never a silent cast)."""
    if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
        raise ValueError(
            f"model.conv_impl='onednn' computes float32 only, got {x.dtype} x {kernel.dtype}; "
            "use conv_impl 'xla' or 'auto' (XLA for other dtypes)"
        )
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(
            f"model.conv_impl='onednn' takes NHWC x HWIO 2-D convolutions, got ranks "
            f"{x.ndim} x {kernel.ndim}"
        )
    geometry = (
        tuple(int(s) for s in strides),
        tuple((int(a), int(b)) for a, b in padding),
        tuple(int(d) for d in dilation),
    )
    return _conv(x, kernel, geometry)
