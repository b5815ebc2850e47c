"""DeepLab-v3 (Chen et al. 2017, "Rethinking Atrous Convolution") as MiB and PLOP use it; NHWC, NNX.

ResNet backbone (``resnet.Backbone``, ImageNet stem, ``output_stride`` 16 by default: layer4
dilated) -> ASPP -> [optional 3x3 conv] -> the classifier ``head`` (1x1 conv with bias to K) ->
bilinear upsampling of the logits to the input size (``align_corners=False``, as MiB).

ASPP (paper Sec. 3.3, Fig. 5): five parallel branches on the last stage's output, each conv ->
BN -> ReLU with ``aspp_channels`` (256) outputs: a 1x1 conv, three 3x3 atrous convs with rates
(6, 12, 18) at OS16, doubled to (12, 24, 36) at OS8 (paper; torchvision's ``[12, 24, 36]``; MiB's
code has 32 for the last OS8 rate, a typo we do not copy) and, beyond the paper, halved to
(3, 6, 9) at OS32; and image pooling (global average -> 1x1 conv -> BN -> ReLU, broadcast back).
Their concatenation goes through a 1x1 projection conv (to ``aspp_channels``) -> BN -> ReLU.

Where we stand between the references:
* Normalisation: MiB/PLOP use in-place ABN (BN fused with a leaky ReLU, slope 0.01) everywhere,
  also in their ResNet; we use BN + ReLU (``norm`` picks "batch", "group" or "none"). MiB's
  ASPP normalises the four conv branches' concatenation with one BN and adds the pooled branch's
  projection after the reduction conv instead of concatenating it: a 1x1 conv of a concatenation
  is the sum of 1x1 convs of its parts, so this is the same function up to the norm/activation
  placement.
* ``head_conv=True`` adds torchvision's extra 3x3 conv -> BN -> ReLU between the ASPP and the
  classifier (``DeepLabHead``); MiB/PLOP have none (default False). With ``head_conv=True``,
  ``output_stride=8`` and ``depth`` 50/101 the model is torchvision's ``deeplabv3_resnet50/101``
  without its auxiliary FCN head, and ``experiments/baselines/convert_torchvision.py`` converts its
  weights.
* ``dropout``: torchvision drops 0.5 after the projection; MiB/PLOP do not (default 0). Dropout
  needs a ``dropout_key`` at call time when training, and ``step.make_forward`` passes none: a
  model built with ``dropout > 0`` raises in training until the step supplies a key.
* Initialisation: ASPP (and head conv) kernels ``xavier_normal_`` with the gain of a leaky ReLU of
  slope 0.01 (MiB's ``DeeplabV3.reset_parameters``), BN scale 1 and bias 0; the classifier keeps
  PyTorch's default conv init (MiB's ``cls`` convs); the backbone torchvision's ResNet init.
* The MiB/PLOP backbone is an ImageNet-pretrained ResNet-101: load a converted torchvision file
  with ``weights.load(path, params, stats, into="backbone")``.

Call: ``model(images [B,H,W,3] float, train) -> {"logits": [B,H,W,K] float32, "features":
[B,H/OS,W/OS,C4] (the backbone's last stage), "penultimate": [B,H/OS,W/OS,A] (the classifier's
input: the ASPP output, or the head conv's), "pod": (c1, c2, c3, c4, penultimate)}`` with the
stage outputs ``c_s`` at ``H/4, H/8, H/16, H/32`` (OS32), ``H/4, H/8, H/16, H/16`` (OS16) or
``H/4, H/8, H/8, H/8`` (OS8) (spatial sizes rounded up), PLOP's list of attention maps.
``A = aspp_channels``, ``C4 = 4 * widths[3]`` (Bottleneck) or ``widths[3]``. ``dtype="bfloat16"``
computes the convs in bf16; the logits are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clseg_jax.models import layers, resnet

PAPER_RATES = (6, 12, 18)  # at output stride 16

# xavier_normal_(gain=calculate_gain("leaky_relu", 0.01)): variance gain^2 * 2 / (fan_in + fan_out).
_xavier = jax.nn.initializers.variance_scaling(2.0 / (1 + 0.01**2), "fan_avg", "normal")


def atrous_rates(output_stride: int) -> tuple[int, ...]:
    """The paper's (6, 12, 18) at OS16, scaled by ``16 / output_stride``."""
    return tuple(r * 16 // output_stride for r in PAPER_RATES)


class ASPP(nnx.Module):
    """Atrous spatial pyramid pooling: ``[B,h,w,Cin] -> [B,h,w,channels]`` (module docstring)."""

    def __init__(
        self,
        c_in: int,
        channels: int,
        rates: tuple[int, ...],
        *,
        norm: str,
        rngs: nnx.Rngs,
        dtype: jnp.dtype | None,
    ):
        kw = dict(rngs=rngs, dtype=dtype, norm=norm, kernel_init=_xavier)
        convs = [resnet.ConvBN(c_in, channels, 1, 1, **kw)]
        convs += [resnet.ConvBN(c_in, channels, 3, 1, dilation=r, **kw) for r in rates]
        self.convs = nnx.List(convs)
        self.pool = resnet.ConvBN(c_in, channels, 1, 1, **kw)
        self.project = resnet.ConvBN((len(rates) + 2) * channels, channels, 1, 1, **kw)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        b, h, w, _ = x.shape
        branches = [jax.nn.relu(conv(x, train)) for conv in self.convs]  # each [B,h,w,A]
        pooled = jax.nn.relu(self.pool(x.mean(axis=(1, 2), keepdims=True), train))  # [B,1,1,A]
        # Upsampling a 1x1 map bilinearly is a broadcast.
        branches.append(jnp.broadcast_to(pooled, (b, h, w, pooled.shape[-1])))
        return jax.nn.relu(self.project(jnp.concatenate(branches, axis=-1), train))


class DeepLabV3(nnx.Module):
    """DeepLab-v3; see the module docstring for the layout, defaults and call signature."""

    def __init__(
        self,
        num_classes: int,
        *,
        rngs: nnx.Rngs,
        depth: int = 101,
        output_stride: int = 16,
        widths: tuple[int, ...] | None = None,
        base_width: int = 64,
        aspp_channels: int = 256,
        rates: tuple[int, ...] | None = None,
        head_conv: bool = False,
        dropout: float = 0.0,
        norm: str = "batch",
        in_channels: int = 3,
        dtype: str | None = None,
    ):
        cdtype = jnp.dtype(dtype) if dtype else None
        self.backbone = resnet.Backbone(
            rngs=rngs,
            depth=depth,
            small_input=False,
            widths=widths,
            base_width=base_width,
            output_stride=output_stride,
            norm=norm,
            in_channels=in_channels,
            dtype=cdtype,
        )
        rates = tuple(rates) if rates is not None else atrous_rates(output_stride)
        kw = dict(norm=norm, rngs=rngs, dtype=cdtype)
        self.aspp = ASPP(self.backbone.channels[-1], aspp_channels, rates, **kw)
        self.head_conv = (
            resnet.ConvBN(aspp_channels, aspp_channels, 3, 1, kernel_init=_xavier, **kw)
            if head_conv
            else None
        )
        self.head = layers.Conv(
            aspp_channels, num_classes, 1, use_bias=True, rngs=rngs, dtype=cdtype
        )
        self.dropout = float(dropout)
        self.num_classes = num_classes

    def __call__(
        self, x: jax.Array, train: bool = False, *, dropout_key: jax.Array | None = None
    ) -> dict:
        """``x [B,H,W,Cin]`` -> outputs (module docstring); ``dropout_key`` only with dropout."""
        stages = self.backbone(x, train)
        y = self.aspp(stages[-1], train)  # [B,h,w,A]
        if self.dropout > 0 and train:
            if dropout_key is None:
                raise ValueError("DeepLabV3(dropout>0) needs a dropout_key when train=True")
            keep = jax.random.bernoulli(dropout_key, 1.0 - self.dropout, y.shape)
            y = jnp.where(keep, y / (1.0 - self.dropout), 0.0).astype(y.dtype)
        if self.head_conv is not None:
            y = jax.nn.relu(self.head_conv(y, train))
        logits = self.head(y).astype(jnp.float32)  # [B,h,w,K]
        return {
            "logits": layers.resize_bilinear(logits, x.shape[1:3]),
            "features": stages[-1],
            "penultimate": y,
            "pod": (*stages, y),
        }
