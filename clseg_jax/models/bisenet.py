"""BiSeNet v1 (Yu et al. 2018, "BiSeNet: Bilateral Segmentation Network"), NHWC, Flax NNX.

Two paths meet in a feature fusion module (FFM) at 1/8 of the input, then the classifier ``head``
(1x1 conv with bias to K) and bilinear upsampling of the logits to the input size:

* Spatial path (paper Sec. 3.1): three conv(3x3, stride 2) -> BN -> ReLU, so 1/8 resolution, with
  ``widths[0] * (1, 2, 4)`` channels (64, 128, 256 for a ResNet-18: the BiSeNet that ships in
  MiB's repository, ``modules/build_BiSeNet.py``).
* Context path (Sec. 3.2): a ResNet (``resnet.Backbone``, ImageNet stem, output stride 32; the
  paper's ResNet-18 by default) whose 1/16 and 1/32 stages each pass an attention refinement
  module (ARM: global average -> 1x1 conv -> BN -> sigmoid, multiplied onto its input; Fig. 2b);
  the 1/32 one is then multiplied by the global average of the last stage (the "global average
  pooling on the tail", combined by product as in MiB's BiSeNet). Both are upsampled to 1/8.
* FFM (Fig. 2c): the concatenation [spatial, context 1/16, context 1/32] -> conv(3x3) -> BN ->
  ReLU to ``ffm_channels`` (``4 * widths[0]``: 256) gives ``f``; the attention ``a = sigmoid(
  conv1x1(relu(conv1x1(gap(f)))))`` (biased convs) reweights it: ``f + f * a``.
* Auxiliary heads (Sec. 3.3, the loss on the context path's outputs; ``aux_heads=True``, default
  off): a 1x1 conv with bias to K on each refined context map, upsampled to the input size.
  They are extra classifiers outside ``head``: a strategy that edits ``head`` (MiB's
  initialisation, class masks) does not touch them.

Where we depart from MiB's BiSeNet: its FFM outputs ``num_classes`` channels and its classifier is
a class-to-class 1x1 conv after upsampling the features 8x; ours outputs ``ffm_channels`` so the
head's input width does not depend on K, and we upsample the logits (a 1x1 conv commutes with
bilinear interpolation, whose weights sum to 1, so the function is the same for a given FFM
output). Its ARM and auxiliary convs have a bias before BN; ours only where no BN follows.
Initialisation as MiB's BiSeNet: every conv outside the backbone ``kaiming_normal_(fan_in,
relu)``, biases PyTorch's default, BN scale 1 and bias 0; the backbone torchvision's ResNet init.

Call: ``model(images [B,H,W,3] float, train) -> {"logits": [B,H,W,K] float32, "features":
[B,H/32,W/32,C4] (the context path's refined 1/32 map), "penultimate": [B,H/8,W/8,F] (the FFM
output, the head's input), "pod": (c1, c2, c3, c4, penultimate)}`` (spatial sizes rounded up),
plus ``"aux": (logits_16, logits_32)`` (each ``[B,H,W,K]`` float32) when ``aux_heads``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clseg_jax.models import layers, resnet

# MiB's BiSeNet.init_weight: kaiming_normal_(mode="fan_in", nonlinearity="relu").
_kaiming = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _gap(x: jax.Array) -> jax.Array:
    return x.mean(axis=(1, 2), keepdims=True)  # [B,1,1,C]


class AttentionRefinement(nnx.Module):
    """``x * sigmoid(bn(conv1x1(gap(x))))``: ``[B,h,w,C] -> [B,h,w,C]``."""

    def __init__(self, c: int, *, norm: str, rngs: nnx.Rngs, dtype: jnp.dtype | None):
        self.attention = resnet.ConvBN(
            c, c, 1, 1, norm=norm, rngs=rngs, dtype=dtype, kernel_init=_kaiming
        )

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        return x * jax.nn.sigmoid(self.attention(_gap(x), train))


class FeatureFusion(nnx.Module):
    """``f = relu(bn(conv3x3(concat)))``, ``f + f * sigmoid(conv(relu(conv(gap(f)))))``."""

    def __init__(
        self, c_in: int, c_out: int, *, norm: str, rngs: nnx.Rngs, dtype: jnp.dtype | None
    ):
        self.fuse = resnet.ConvBN(
            c_in, c_out, 3, 1, norm=norm, rngs=rngs, dtype=dtype, kernel_init=_kaiming
        )
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, kernel_init=_kaiming)
        self.conv1 = layers.Conv(c_out, c_out, 1, **kw)
        self.conv2 = layers.Conv(c_out, c_out, 1, **kw)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        f = jax.nn.relu(self.fuse(x, train))  # [B,h,w,F]
        a = jax.nn.sigmoid(self.conv2(jax.nn.relu(self.conv1(_gap(f)))))  # [B,1,1,F]
        return f + f * a


class BiSeNet(nnx.Module):
    """BiSeNet v1; see the module docstring for the layout, defaults and call signature."""

    def __init__(
        self,
        num_classes: int,
        *,
        rngs: nnx.Rngs,
        depth: int = 18,
        widths: tuple[int, ...] | None = None,
        base_width: int = 64,
        ffm_channels: int | None = None,
        aux_heads: bool = False,
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
            norm=norm,
            in_channels=in_channels,
            dtype=cdtype,
        )
        w0 = resnet.stage_widths(widths, base_width)[0]
        kw = dict(norm=norm, rngs=rngs, dtype=cdtype)
        spatial, c_in = [], in_channels
        for w in (w0, 2 * w0, 4 * w0):
            spatial.append(resnet.ConvBN(c_in, w, 3, 2, kernel_init=_kaiming, **kw))
            c_in = w
        self.spatial = nnx.List(spatial)
        c16, c32 = self.backbone.channels[2:]
        self.arm16 = AttentionRefinement(c16, **kw)
        self.arm32 = AttentionRefinement(c32, **kw)
        ffm_channels = ffm_channels or 4 * w0
        self.ffm = FeatureFusion(c_in + c16 + c32, ffm_channels, **kw)
        head_kw = dict(use_bias=True, rngs=rngs, dtype=cdtype, kernel_init=_kaiming)
        self.head = layers.Conv(ffm_channels, num_classes, 1, **head_kw)
        self.aux16 = layers.Conv(c16, num_classes, 1, **head_kw) if aux_heads else None
        self.aux32 = layers.Conv(c32, num_classes, 1, **head_kw) if aux_heads else None
        self.num_classes = num_classes

    def __call__(self, x: jax.Array, train: bool = False) -> dict:
        size = x.shape[1:3]
        s = x
        for block in self.spatial:
            s = jax.nn.relu(block(s, train))  # -> [B,H/8,W/8,4*w0]
        stages = self.backbone(x, train)
        c16 = self.arm16(stages[2], train)  # [B,H/16,W/16,C3]
        c32 = self.arm32(stages[3], train) * _gap(stages[3])  # [B,H/32,W/32,C4]
        up = [layers.resize_bilinear(c, s.shape[1:3]).astype(s.dtype) for c in (c16, c32)]
        y = self.ffm(jnp.concatenate([s, *up], axis=-1), train)  # [B,H/8,W/8,F]
        logits = self.head(y).astype(jnp.float32)
        out = {
            "logits": layers.resize_bilinear(logits, size),
            "features": c32,
            "penultimate": y,
            "pod": (*stages, y),
        }
        if self.aux16 is not None:
            # A 1x1 conv commutes with the upsampling: apply it at the map's own resolution.
            out["aux"] = tuple(
                layers.resize_bilinear(head(c).astype(jnp.float32), size)
                for head, c in ((self.aux16, c16), (self.aux32, c32))
            )
        return out
