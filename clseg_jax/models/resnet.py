"""ResNet-18/34 (He et al. 2016) for image classification, NHWC, Flax NNX.

The torchvision layout, BasicBlocks only: a stem, four stages of ``(2, 2, 2, 2)`` (depth 18) or
``(3, 4, 6, 3)`` (depth 34) blocks of [3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, + shortcut,
ReLU], stages 2-4 halving the resolution in their first block (whose shortcut is then a 1x1
stride-2 conv + BN), global average pooling and a linear head. ``widths=(64, 128, 256, 512)``,
``small_input=False`` and 1000 classes is torchvision's ``resnet18``: 11,689,512 parameters.

* ``small_input=True`` (CIFAR-style, for 28-32 px inputs): a 3x3 stride-1 stem conv and no
  max-pool, so a 32x32 image reaches the last stage at 4x4.
* ``small_input=False`` (ImageNet-style, torchvision's): a 7x7 stride-2 stem conv and a 3x3
  stride-2 max-pool; the last stage is at ``H / 32``. Weights converted from torchvision
  (``experiments/baselines/convert_torchvision.py``) load into this variant only.

Strided convs and the max-pool pad ``k // 2`` on every side, as torchvision does. 'SAME' would
pad (0, 1) instead of (1, 1) for even inputs and shift every window by one pixel, so converted
weights would give different logits.

Initialisation is torchvision's ResNet's, which overrides PyTorch's layer defaults: convs
``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, BN scale 1 and bias 0, the head
PyTorch's default Linear init (uniform in +-1/sqrt(fan_in)).

Call: ``model(images [B,H,W,3] float, train) -> {"logits": [B,K], "features": [B,h,w,C],
"penultimate": [B,C]}`` where ``features`` is the last stage's output (``C = widths[-1]``) and
``penultimate`` its global average, the head's input. Parameters live under ``stem/{conv,bn}``,
``layer{1..4}/{i}/{conv1,bn1,conv2,bn2,downsample/{conv,bn}}`` and ``head/{kernel,bias}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clseg_jax.models import layers

STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}

# torchvision: kaiming_normal_(fan_out, relu) = normal with std sqrt(2 / (Cout * k * k)).
_conv_init = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv(nnx.Module):
    """k x k conv without bias, padding ``k // 2`` on every side (torchvision's); HWIO kernel.

    ``[B,H,W,Cin] -> [B,Ho,Wo,Cout]`` with ``Ho = (H + 2 * (k // 2) - k) // stride + 1``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        stride: int = 1,
        rngs: nnx.Rngs,
        dtype: jnp.dtype | None = None,
    ):
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = nnx.Param(_conv_init(rngs.params(), shape))
        self.stride = stride
        self.pad = kernel_size // 2
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        p = self.pad
        return jax.lax.conv_general_dilated(
            x.astype(dtype),
            self.kernel[...].astype(dtype),
            window_strides=(self.stride, self.stride),
            padding=((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


class ConvBN(nnx.Module):
    """Conv -> BatchNorm (no ReLU): the stem (ReLU applied by the caller) and the shortcut."""

    def __init__(
        self, c_in: int, c_out: int, k: int, stride: int, *, rngs: nnx.Rngs, dtype: jnp.dtype | None
    ):
        self.conv = Conv(c_in, c_out, k, stride=stride, rngs=rngs, dtype=dtype)
        self.bn = layers.make_norm("batch", c_out, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return layers.apply_norm(self.bn, self.conv(x), train)


class BasicBlock(nnx.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``: ``[B,H,W,Cin] -> [B,Ho,Wo,Cout]``.

    ``conv1`` and the shortcut have the block's stride (1, or 2 to halve H and W).
    """

    def __init__(
        self, c_in: int, c_out: int, stride: int, *, rngs: nnx.Rngs, dtype: jnp.dtype | None
    ):
        self.conv1 = Conv(c_in, c_out, 3, stride=stride, rngs=rngs, dtype=dtype)
        self.bn1 = layers.make_norm("batch", c_out, rngs=rngs)
        self.conv2 = Conv(c_out, c_out, 3, rngs=rngs, dtype=dtype)
        self.bn2 = layers.make_norm("batch", c_out, rngs=rngs)
        # A projection only where the shape changes, as torchvision (option B of the paper).
        needs_proj = stride != 1 or c_in != c_out
        self.downsample = (
            ConvBN(c_in, c_out, 1, stride, rngs=rngs, dtype=dtype) if needs_proj else None
        )

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = jax.nn.relu(layers.apply_norm(self.bn1, self.conv1(x), train))
        y = layers.apply_norm(self.bn2, self.conv2(y), train)
        shortcut = x if self.downsample is None else self.downsample(x, train)
        return jax.nn.relu(y + shortcut)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torchvision's ``MaxPool2d(3, stride=2, padding=1)``: ``[B,H,W,C] -> [B,Ho,Wo,C]``.

    ``Ho = (H - 1) // 2 + 1``; the padding is -inf, so it never wins the max.
    """
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    # A Python scalar init, so JAX recognises the max monoid and can differentiate the pool.
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), pad)


class ResNet(nnx.Module):
    """ResNet-18/34; see the module docstring for the layout and call signature."""

    def __init__(
        self,
        num_classes: int,
        *,
        rngs: nnx.Rngs,
        depth: int = 18,
        small_input: bool = True,
        widths: tuple[int, ...] = (64, 128, 256, 512),
        in_channels: int = 3,
        dtype: str | None = None,
    ):
        if depth not in STAGES:
            raise ValueError(f"unsupported ResNet depth {depth}; valid: {sorted(STAGES)}")
        if len(widths) != 4:
            raise ValueError(f"widths must have 4 entries (one per stage), got {widths}")
        cdtype = jnp.dtype(dtype) if dtype else None
        kw = dict(rngs=rngs, dtype=cdtype)
        k, stride = (3, 1) if small_input else (7, 2)
        self.stem = ConvBN(in_channels, widths[0], k, stride, **kw)
        self.small_input = small_input
        c_in = widths[0]
        for s, (n_blocks, w) in enumerate(zip(STAGES[depth], widths, strict=True)):
            first_stride = 1 if s == 0 else 2
            blocks = []
            for i in range(n_blocks):
                blocks.append(BasicBlock(c_in, w, first_stride if i == 0 else 1, **kw))
                c_in = w
            setattr(self, f"layer{s + 1}", nnx.List(blocks))
        self.head = nnx.Linear(
            c_in,
            num_classes,
            kernel_init=layers.torch_uniform(c_in),
            bias_init=layers.torch_uniform(c_in),
            dtype=cdtype,
            rngs=rngs,
        )
        self.num_classes = num_classes

    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        x = jax.nn.relu(self.stem(x, train))
        if not self.small_input:
            x = max_pool_3x3_s2(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x, train)
        features = x  # [B,h,w,C]
        pooled = features.mean(axis=(1, 2))  # [B,C]
        logits = self.head(pooled).astype(jnp.float32)
        return {"logits": logits, "features": features, "penultimate": pooled}
