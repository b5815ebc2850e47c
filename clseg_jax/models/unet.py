"""UNet (Ronneberger et al. 2015) for semantic segmentation, NHWC, Flax NNX.

Encoder: per level two [3x3 conv (no bias) -> norm -> ReLU], 2x2 max-pool between levels.
Decoder: 2x2 stride-2 transposed conv, the skip joined by concatenation (computed as two convs on
kernel slices, see ``layers.Conv``), two [3x3 conv -> norm -> ReLU]; a final 1x1 conv to the
classes. With ``widths=(16, 32, 64, 128)``, batch norm and 5 classes this is BENCHMARKS.md's W1
model: 482,805 parameters.

Call: ``model(images [B,H,W,3] float, train) -> {"logits": [B,H,W,K], "features": [B,h,w,C],
"penultimate": [B,H,W,widths[0]], "pod": (...)}`` where ``features`` is the bottleneck (``h = H /
2**(L-1)`` for ``L = len(widths)``, ``C = widths[-1]``), ``penultimate`` the last decoder block's
output, the input of the 1x1 head (both for LFL and feature distillation), and ``pod`` the maps
PLOP's pooled distillation reads: every encoder level's output, then ``penultimate``. XLA drops
whichever output a step does not use.
H and W must be divisible by ``2**(L-1)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clseg_jax.models import layers


class DoubleConv(nnx.Module):
    """Two [3x3 conv -> norm -> ReLU]; the first conv may take a split (skip) input."""

    def __init__(
        self,
        in_splits: tuple[int, ...],
        out_features: int,
        *,
        norm: str,
        rngs: nnx.Rngs,
        dtype: jnp.dtype | None,
    ):
        bias = norm == "none"  # a bias before a norm layer is redundant
        self.conv1 = layers.Conv(
            sum(in_splits),
            out_features,
            3,
            use_bias=bias,
            in_splits=in_splits,
            rngs=rngs,
            dtype=dtype,
        )
        self.norm1 = layers.make_norm(norm, out_features, rngs=rngs)
        self.conv2 = layers.Conv(
            out_features, out_features, 3, use_bias=bias, rngs=rngs, dtype=dtype
        )
        self.norm2 = layers.make_norm(norm, out_features, rngs=rngs)

    def __call__(self, *xs: jax.Array, train: bool) -> jax.Array:
        x = jax.nn.relu(layers.apply_norm(self.norm1, self.conv1(*xs), train))
        return jax.nn.relu(layers.apply_norm(self.norm2, self.conv2(x), train))


class UNet(nnx.Module):
    """Configurable UNet; see the module docstring for the layout and call signature."""

    def __init__(
        self,
        num_classes: int,
        *,
        widths: tuple[int, ...] = (16, 32, 64, 128),
        norm: str = "batch",
        in_channels: int = 3,
        dtype: str | None = None,
        rngs: nnx.Rngs,
    ):
        cdtype = jnp.dtype(dtype) if dtype else None
        kw = dict(norm=norm, rngs=rngs, dtype=cdtype)
        self.down = nnx.List([])
        c_in = in_channels
        for w in widths:
            self.down.append(DoubleConv((c_in,), w, **kw))
            c_in = w
        self.ups = nnx.List([])
        self.up_convs = nnx.List([])
        for w in reversed(widths[:-1]):
            self.ups.append(layers.UpConv2x2(c_in, w, rngs=rngs, dtype=cdtype))
            # Skip first, upsampled second: the concatenation order of the PyTorch reference.
            self.up_convs.append(DoubleConv((w, w), w, **kw))
            c_in = w
        self.head = layers.Conv(c_in, num_classes, 1, use_bias=True, rngs=rngs, dtype=cdtype)
        self.num_classes = num_classes

    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = layers.max_pool_2x2(x)
            x = block(x, train=train)
            skips.append(x)
        features = x
        for up, block, skip in zip(self.ups, self.up_convs, reversed(skips[:-1]), strict=True):
            x = block(skip, up(x), train=train)
        logits = self.head(x).astype(jnp.float32)
        return {
            "logits": logits,
            "features": features,
            "penultimate": x,
            "pod": (*skips, x),
        }
