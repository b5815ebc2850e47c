"""Conv building blocks in NHWC with PyTorch's default initialisation.

Initialisation follows PyTorch (``kaiming_uniform_(a=sqrt(5))``: uniform in +-1/sqrt(fan_in)) so a
model starts from the same distribution as its PyTorch baseline (BENCHMARKS.md W1).

Two formulations here are chosen for speed on XLA:CPU and are the same math as the textbook op
(BENCHMARKS.md measured each; both are harmless on GPU):
- ``UpConv2x2``: a 2x2 stride-2 transposed conv is a per-pixel matmul to 4*C channels followed by
  depth-to-space; XLA lowers the transposed conv's weight gradient as a huge dilated conv otherwise.
- ``Conv3x3(n_inputs=2)``: a conv over ``concat([a, b])`` is the sum of two convs over the kernel's
  input-channel slices, which avoids materialising the concatenation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from clseg_jax.kernels import onednn
from clseg_jax.kernels.onednn import Pads


def _is_matmul(x: jax.Array, kernel: jax.Array, padding) -> bool:
    """A 1x1 kernel over an unpadded 1x1 map: ``[N,1,1,I] @ [I,O]``."""
    unpadded = all(lo == 0 and hi == 0 for lo, hi in padding)
    return x.shape[1:3] == (1, 1) and kernel.shape[:2] == (1, 1) and unpadded


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: tuple[int, int] = (1, 1),
    padding: Pads | str = "SAME",
    dilation: tuple[int, int] = (1, 1),
    impl: str = "xla",
) -> jax.Array:
    """``x [N,H,W,I] * kernel [KH,KW,I,O] -> [N,OH,OW,O]``: every convolution of the models.

    ``impl`` (``model.conv_impl`` resolved, see ``kernels/select.py``): ``"xla"`` or
    ``"onednn"``. Under ``"onednn"`` a 1x1 kernel over a 1x1 map (the global-pooling branches of
    ASPP and BiSeNet) is a matrix product and stays XLA's: oneDNN took 1.4-2.2x XLA's time on
    every such convolution of the models in two runs (``experiments/bench_conv_shapes.py``).
    """
    if padding == "SAME":
        window = [d * (k - 1) + 1 for k, d in zip(kernel.shape[:2], dilation, strict=True)]
        padding = tuple(jax.lax.padtype_to_pads(x.shape[1:3], window, strides, "SAME"))
    if impl == "onednn" and not _is_matmul(x, kernel, padding):
        return onednn.conv2d(x, kernel, strides, padding, dilation)
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=padding,
        rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def torch_uniform(fan_in: int):
    """Initializer: uniform in +-1/sqrt(fan_in) (PyTorch's default for conv weights and biases)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Conv(nnx.Module):
    """k x k conv, stride 1, 'SAME' padding; kernel ``[k,k,Cin,Cout]`` (HWIO).

    Kernel and bias start as PyTorch's default unless ``kernel_init`` replaces the kernel's.

    With ``in_splits=(c1, c2)`` the call takes two inputs whose channels add up to Cin and sums
    two convs on the kernel's slices (same math as a conv on their concatenation).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        use_bias: bool,
        rngs: nnx.Rngs,
        in_splits: tuple[int, ...] | None = None,
        dtype: jnp.dtype | None = None,
        kernel_init: jax.nn.initializers.Initializer | None = None,
    ):
        fan_in = in_features * kernel_size * kernel_size
        init = torch_uniform(fan_in)
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = nnx.Param((kernel_init or init)(rngs.params(), shape))
        self.bias = nnx.Param(init(rngs.params(), (out_features,))) if use_bias else None
        self.in_splits = in_splits or (in_features,)
        if sum(self.in_splits) != in_features:
            raise ValueError(f"in_splits {self.in_splits} must sum to in_features {in_features}")
        self.dtype = dtype
        # Set on the whole model by models.make (nnx set_attributes), not per layer.
        self.conv_impl = "xla"

    def __call__(self, *xs: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        dtype = self.dtype or xs[0].dtype
        out = None
        start = 0
        for x, c in zip(xs, self.in_splits, strict=True):
            y = conv2d(
                x.astype(dtype), kernel[:, :, start : start + c].astype(dtype), impl=self.conv_impl
            )
            out = y if out is None else out + y
            start += c
        if self.bias is not None:
            out = out + self.bias[...].astype(dtype)
        return out


class UpConv2x2(nnx.Module):
    """2x2 stride-2 transposed conv: ``[B,H,W,Cin] -> [B,2H,2W,Cout]``.

    Kernel ``[2,2,Cin,Cout]``: input pixel (h, w) writes ``x[h,w] @ kernel[i,j]`` to output pixel
    (2h+i, 2w+j). Initialised as PyTorch's ConvTranspose2d, whose fan_in is Cout*2*2.
    """

    def __init__(
        self, in_features: int, out_features: int, *, rngs: nnx.Rngs, dtype: jnp.dtype | None = None
    ):
        init = torch_uniform(out_features * 4)
        self.kernel = nnx.Param(init(rngs.params(), (2, 2, in_features, out_features)))
        self.bias = nnx.Param(init(rngs.params(), (out_features,)))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        dtype = self.dtype or x.dtype
        y = jnp.einsum("bhwc,ijcd->bhiwjd", x.astype(dtype), self.kernel[...].astype(dtype))
        y = y.reshape(b, 2 * h, 2 * w, -1)  # depth-to-space
        return y + self.bias[...].astype(dtype)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize ``[B,h,w,C] -> [B,H,W,C]``, PyTorch's ``F.interpolate(x, size,
    mode="bilinear", align_corners=False)``: half-pixel centres, edge pixels repeated.

    ``antialias=False``: PyTorch's bilinear does not low-pass when shrinking; JAX's default would.
    """
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, *size, c), "bilinear", antialias=False)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 stride-2 max-pool as a reshape (cheaper than reduce_window's argmax tracking on CPU).

    ``[B,H,W,C] -> [B,H/2,W/2,C]``; H and W must be even.
    """
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class ContinualNorm(nnx.Module):
    """Continual Normalization (Pham, Liu & Hoi, ICLR 2022): group norm *without* its affine
    transform, then batch norm (with running statistics and the affine transform).

    ``[..., C] -> [..., C]``. The group step normalises each sample on its own, so the batch
    statistics that follow drift less when the data distribution changes between experiences
    (CCSI's normalization). ``bn`` is an ``nnx.BatchNorm`` like ``make_norm("batch")``'s.
    """

    def __init__(self, features: int, *, groups: int = 32, rngs: nnx.Rngs):
        self.gn = nnx.GroupNorm(
            features,
            num_groups=min(groups, features),
            epsilon=1e-5,
            use_bias=False,
            use_scale=False,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return apply_norm(self.bn, self.gn(x), train)


def make_norm(kind: str, features: int, *, rngs: nnx.Rngs, groups: int = 8) -> nnx.Module | None:
    """Normalization layer by name: "batch" (PyTorch's eps and momentum), "group", "continual"
    (``ContinualNorm``, 32 groups as in the CN paper), "none"."""
    if kind == "batch":
        # Flax momentum 0.9 == PyTorch momentum 0.1 (running = 0.9 running + 0.1 batch).
        return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)
    if kind == "group":
        return nnx.GroupNorm(features, num_groups=min(groups, features), epsilon=1e-5, rngs=rngs)
    if kind == "continual":
        return ContinualNorm(features, rngs=rngs)
    if kind == "none":
        return None
    raise ValueError(f"unknown norm {kind!r}; valid: ['batch', 'continual', 'group', 'none']")


# Attribute that ``capture_moments`` sets on every BatchNorm of a merged model.
CAPTURE = "capture_moments"


class _MomentLog:
    """One list shared by a model's flagged BatchNorms: entries land in *call* order (module
    iteration order is alphabetical, which would put a ResNet's stem BN last)."""

    def __init__(self):
        self.entries: list[tuple[jax.Array, ...]] = []


def apply_norm(norm: nnx.Module | None, x: jax.Array, train: bool) -> jax.Array:
    """Applies a norm layer; BatchNorm uses batch statistics only when ``train``.

    A BatchNorm flagged by ``capture_moments`` also records ``(mean [C], var [C], running_mean
    [C], running_var [C])`` of its input (over every axis but the channels; the variance biased,
    as PyTorch's BatchNorm hooks in DeepInversion compute it).
    """
    if norm is None:
        return x
    if isinstance(norm, ContinualNorm):
        return norm(x, train)
    if isinstance(norm, nnx.BatchNorm):
        log = getattr(norm, CAPTURE, None)
        if log is not None:
            xf = x.astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            log.entries.append((mean, var, norm.mean[...], norm.var[...]))
        return norm(x, use_running_average=not train)
    return norm(x)


def capture_moments(model: nnx.Module) -> nnx.Module:
    """Flags every BatchNorm of ``model`` (a freshly merged copy, used for one call) to record
    its input moments; read them with ``captured_moments`` after the call."""
    log = _MomentLog()
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.BatchNorm):
            setattr(module, CAPTURE, log)
    return model


def captured_moments(model: nnx.Module) -> list[tuple[jax.Array, ...]]:
    """``(mean [C], var [C], running_mean [C], running_var [C])`` per BatchNorm call of the flagged
    ``model``'s last call, in call order (the stem's BN first)."""
    for _, module in nnx.iter_modules(model):
        log = getattr(module, CAPTURE, None)
        if isinstance(log, _MomentLog):
            return list(log.entries)
    return []
