"""ResNet-18/34/50/101 (He et al. 2016), NHWC, Flax NNX: a classifier and a segmentation backbone.

The torchvision layout: a stem, four stages of ``(2, 2, 2, 2)`` (18), ``(3, 4, 6, 3)`` (34 and 50)
or ``(3, 4, 23, 3)`` (101) blocks, global average pooling and a linear head. Depths 18/34 use
BasicBlocks [3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, + shortcut, ReLU]; 50/101 Bottlenecks
[1x1 -> BN -> ReLU -> 3x3 -> BN -> ReLU -> 1x1 (4x wider) -> BN, + shortcut, ReLU] with the stride
on the 3x3 conv (torchvision's "ResNet v1.5"; the paper strides the first 1x1). A stage's first
block halves the resolution (stages 2-4) and, where the shape changes, its shortcut is a 1x1 conv
+ BN (option B of the paper). ``widths`` are the stages' inner widths (torchvision's ``planes``);
a stage outputs ``widths[s] * expansion`` channels, expansion 1 (Basic) or 4 (Bottleneck).
Default widths with 1000 classes and ``small_input=False`` are torchvision's ``resnet18/34/50/
101``: 11,689,512 / 21,797,672 / 25,557,032 / 44,549,160 parameters.

* ``small_input=True`` (CIFAR-style, for 28-32 px inputs): a 3x3 stride-1 stem conv and no
  max-pool, so a 32x32 image reaches the last stage at 4x4.
* ``small_input=False`` (ImageNet-style, torchvision's): a 7x7 stride-2 stem conv and a 3x3
  stride-2 max-pool; the last stage is at ``H / 32``. Weights converted from torchvision
  (``experiments/baselines/convert_torchvision.py``) load into this variant only.
* ``output_stride`` 16 or 8 (segmentation; ImageNet stem) trades the stride-2 of the last one or
  two stages for dilation, as torchvision's ``replace_stride_with_dilation`` ([F, F, T] and
  [F, T, T]): a dilated stage's first block keeps the previous dilation and the others get
  ``previous * 2``, so OS16 dilates layer4 by 2 and OS8 layer3 by 2 and layer4 by 4 (layer4's
  first block at 2). MiB's inplace-ABN ResNet dilates a stage's first block too; we follow
  torchvision, whose weights are the ones we convert. BasicBlocks dilate both 3x3 convs
  (torchvision refuses dilated BasicBlocks; MiB's ResidualBlock dilates both).

Convs pad ``dilation * (k // 2)`` on every side, as torchvision. 'SAME' would pad (0, 1) instead
of (1, 1) for strided convs on even inputs and shift every window by one pixel, so converted
weights would give different outputs.

Initialisation is torchvision's ResNet's, which overrides PyTorch's layer defaults: convs
``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, BN scale 1 and bias 0, the head
PyTorch's default Linear init (uniform in +-1/sqrt(fan_in)).

``Backbone(x [B,H,W,3], train) -> (c1, c2, c3, c4)``, the four stages' outputs ``[B,h_s,w_s,C_s]``
(``C_s = backbone.channels[s]``). ``ResNet`` is a Backbone with a head: ``model(images, train) ->
{"logits": [B,K], "features": [B,h,w,C], "penultimate": [B,C]}`` where ``features`` is the last
stage's output and ``penultimate`` its global average, the head's input. Parameters live under
``stem/{conv,bn}``, ``layer{1..4}/{i}/{conv1,bn1,conv2,bn2[,conv3,bn3],downsample/{conv,bn}}`` and
(ResNet) ``head/{kernel,bias}``, so a classifier's weight file loads into a segmentation model's
``backbone`` sub-tree (``weights.load(..., into="backbone")``).

``head="cosine"`` swaps the linear head for ``cosine.CosineLinear`` (``logits = sigma * cos(w_k,
f)``; parameters ``head/{kernel,sigma}``, no bias; ``sigma`` starts at ``sigma_init``, 1 as in
LUCIR and CCSI), the classifier of LUCIR and CCSI.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clseg_jax.models import cosine, layers

STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
BOTTLENECK_DEPTHS = frozenset({50, 101})
EXPANSION = 4  # a Bottleneck's output width over its inner width
# Which of stages 2-4 swap their stride for dilation (torchvision's replace_stride_with_dilation).
DILATE = {32: (False, False, False), 16: (False, False, True), 8: (False, True, True)}
HEADS = ("linear", "cosine")

# torchvision: kaiming_normal_(fan_out, relu) = normal with std sqrt(2 / (Cout * k * k)).
_conv_init = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv(nnx.Module):
    """k x k conv without bias, padding ``dilation * (k // 2)`` on every side; HWIO kernel.

    ``[B,H,W,Cin] -> [B,Ho,Wo,Cout]`` with ``Ho = (H + 2 * pad - dilation * (k - 1) - 1) // stride
    + 1``, i.e. ``H`` for stride 1 at any dilation (odd k).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        rngs: nnx.Rngs,
        dtype: jnp.dtype | None = None,
        kernel_init: jax.nn.initializers.Initializer = _conv_init,
    ):
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape))
        self.stride = stride
        self.dilation = dilation
        self.pad = dilation * (kernel_size // 2)
        self.dtype = dtype
        self.conv_impl = "xla"  # set on the whole model by models.make

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        p = self.pad
        return layers.conv2d(
            x.astype(dtype),
            self.kernel[...].astype(dtype),
            strides=(self.stride, self.stride),
            padding=((p, p), (p, p)),
            dilation=(self.dilation, self.dilation),
            impl=self.conv_impl,
        )


class ConvBN(nnx.Module):
    """Conv -> norm (no ReLU): the stem (ReLU applied by the caller) and the shortcut."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        k: int,
        stride: int,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype | None,
        norm: str = "batch",
        dilation: int = 1,
        kernel_init: jax.nn.initializers.Initializer = _conv_init,
    ):
        self.conv = Conv(
            c_in,
            c_out,
            k,
            stride=stride,
            dilation=dilation,
            rngs=rngs,
            dtype=dtype,
            kernel_init=kernel_init,
        )
        self.bn = layers.make_norm(norm, c_out, rngs=rngs)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return layers.apply_norm(self.bn, self.conv(x), train)


def _shortcut(c_in, c_out, stride, kw) -> ConvBN | None:
    # A projection only where the shape changes, as torchvision (option B of the paper).
    return ConvBN(c_in, c_out, 1, stride, **kw) if stride != 1 or c_in != c_out else None


class BasicBlock(nnx.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``: ``[B,H,W,Cin] -> [B,Ho,Wo,w]``.

    ``conv1`` and the shortcut have the block's stride (1, or 2 to halve H and W).
    """

    expansion = 1

    def __init__(
        self,
        c_in: int,
        width: int,
        stride: int,
        dilation: int = 1,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype | None,
        norm: str = "batch",
    ):
        kw = dict(rngs=rngs, dtype=dtype)
        self.conv1 = Conv(c_in, width, 3, stride=stride, dilation=dilation, **kw)
        self.bn1 = layers.make_norm(norm, width, rngs=rngs)
        self.conv2 = Conv(width, width, 3, dilation=dilation, **kw)
        self.bn2 = layers.make_norm(norm, width, rngs=rngs)
        self.downsample = _shortcut(c_in, width, stride, dict(kw, norm=norm))

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = jax.nn.relu(layers.apply_norm(self.bn1, self.conv1(x), train))
        y = layers.apply_norm(self.bn2, self.conv2(y), train)
        shortcut = x if self.downsample is None else self.downsample(x, train)
        return jax.nn.relu(y + shortcut)


class Bottleneck(nnx.Module):
    """1x1 (w) -> 3x3 (w, stride, dilation) -> 1x1 (4w), each + BN, ReLU between, + shortcut, ReLU.

    ``[B,H,W,Cin] -> [B,Ho,Wo,4w]``; the stride sits on the 3x3 conv (torchvision v1.5).
    """

    expansion = EXPANSION

    def __init__(
        self,
        c_in: int,
        width: int,
        stride: int,
        dilation: int = 1,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype | None,
        norm: str = "batch",
    ):
        kw = dict(rngs=rngs, dtype=dtype)
        c_out = width * EXPANSION
        self.conv1 = Conv(c_in, width, 1, **kw)
        self.bn1 = layers.make_norm(norm, width, rngs=rngs)
        self.conv2 = Conv(width, width, 3, stride=stride, dilation=dilation, **kw)
        self.bn2 = layers.make_norm(norm, width, rngs=rngs)
        self.conv3 = Conv(width, c_out, 1, **kw)
        self.bn3 = layers.make_norm(norm, c_out, rngs=rngs)
        self.downsample = _shortcut(c_in, c_out, stride, dict(kw, norm=norm))

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = jax.nn.relu(layers.apply_norm(self.bn1, self.conv1(x), train))
        y = jax.nn.relu(layers.apply_norm(self.bn2, self.conv2(y), train))
        y = layers.apply_norm(self.bn3, self.conv3(y), train)
        shortcut = x if self.downsample is None else self.downsample(x, train)
        return jax.nn.relu(y + shortcut)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torchvision's ``MaxPool2d(3, stride=2, padding=1)``: ``[B,H,W,C] -> [B,Ho,Wo,C]``.

    ``Ho = (H - 1) // 2 + 1``; the padding is -inf, so it never wins the max.
    """
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    # A Python scalar init, so JAX recognises the max monoid and can differentiate the pool.
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), pad)


def stage_widths(widths: tuple[int, ...] | None, base_width: int) -> tuple[int, ...]:
    """``widths`` if given, else ``base_width * (1, 2, 4, 8)`` (64 -> torchvision's)."""
    widths = tuple(widths) if widths is not None else tuple(base_width * m for m in (1, 2, 4, 8))
    if len(widths) != 4:
        raise ValueError(f"widths must have 4 entries (one per stage), got {widths}")
    return widths


class Backbone(nnx.Module):
    """The stem and four stages; ``__call__`` returns the stage outputs (module docstring)."""

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        depth: int = 18,
        small_input: bool = False,
        widths: tuple[int, ...] | None = None,
        base_width: int = 64,
        output_stride: int = 32,
        norm: str = "batch",
        in_channels: int = 3,
        dtype: str | jnp.dtype | None = None,
    ):
        if depth not in STAGES:
            raise ValueError(f"unsupported ResNet depth {depth}; valid: {sorted(STAGES)}")
        if output_stride not in DILATE:
            raise ValueError(f"output_stride must be one of {sorted(DILATE)}, got {output_stride}")
        widths = stage_widths(widths, base_width)
        block = Bottleneck if depth in BOTTLENECK_DEPTHS else BasicBlock
        kw = dict(rngs=rngs, dtype=jnp.dtype(dtype) if dtype else None, norm=norm)
        k, stride = (3, 1) if small_input else (7, 2)
        self.stem = ConvBN(in_channels, widths[0], k, stride, **kw)
        self.small_input = small_input
        c_in, dilation = widths[0], 1
        for s, (n_blocks, w) in enumerate(zip(STAGES[depth], widths, strict=True)):
            stride, first_dilation = (1 if s == 0 else 2), dilation
            if s > 0 and DILATE[output_stride][s - 1]:
                dilation, stride = dilation * stride, 1
            blocks = []
            for i in range(n_blocks):
                d = first_dilation if i == 0 else dilation
                blocks.append(block(c_in, w, stride if i == 0 else 1, d, **kw))
                c_in = w * block.expansion
            setattr(self, f"layer{s + 1}", nnx.List(blocks))
        self.channels = tuple(w * block.expansion for w in widths)

    def stages(self, x: jax.Array, train: bool) -> tuple[jax.Array, ...]:
        """``[B,H,W,Cin] -> 4 x [B,h_s,w_s,channels[s]]``."""
        x = jax.nn.relu(self.stem(x, train))
        if not self.small_input:
            x = max_pool_3x3_s2(x)
        outs = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for blk in stage:
                x = blk(x, train)
            outs.append(x)
        return tuple(outs)

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        return self.stages(x, train)


class ResNet(Backbone):
    """ResNet classifier; see the module docstring for the layout and call signature."""

    def __init__(
        self,
        num_classes: int,
        *,
        rngs: nnx.Rngs,
        depth: int = 18,
        small_input: bool = True,
        widths: tuple[int, ...] | None = None,
        base_width: int = 64,
        output_stride: int = 32,
        norm: str = "batch",
        in_channels: int = 3,
        dtype: str | None = None,
        head: str = "linear",
        sigma_init: float = 1.0,
    ):
        if head not in HEADS:
            raise ValueError(f"unknown ResNet head {head!r}; valid: {list(HEADS)}")
        super().__init__(
            rngs=rngs,
            depth=depth,
            small_input=small_input,
            widths=widths,
            base_width=base_width,
            output_stride=output_stride,
            norm=norm,
            in_channels=in_channels,
            dtype=dtype,
        )
        c_in = self.channels[-1]
        if head == "cosine":
            self.head = cosine.CosineLinear(c_in, num_classes, sigma_init=sigma_init, rngs=rngs)
        else:
            self.head = nnx.Linear(
                c_in,
                num_classes,
                kernel_init=layers.torch_uniform(c_in),
                bias_init=layers.torch_uniform(c_in),
                dtype=jnp.dtype(dtype) if dtype else None,
                rngs=rngs,
            )
        self.num_classes = num_classes

    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        features = self.stages(x, train)[-1]  # [B,h,w,C]
        pooled = features.mean(axis=(1, 2))  # [B,C]
        logits = self.head(pooled).astype(jnp.float32)
        return {"logits": logits, "features": features, "penultimate": pooled}
