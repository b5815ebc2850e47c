"""BENCHMARKS.md's W1 UNet in PyTorch, loadable from clseg_jax's exported initial weights.

Same architecture as ``clseg_jax/models/unet.py`` (482,805 parameters with widths 16-32-64-128 and
5 classes): per level two [3x3 conv (padding 1, no bias) -> BatchNorm (eps 1e-5, momentum 0.1) ->
ReLU], 2x2 max-pool between levels; decoder 2x2 stride-2 transposed conv, concatenation
``[skip, upsampled]`` (our kernel's input-channel order), two [3x3 conv -> BN -> ReLU]; final 1x1
conv with bias. Runs in ``channels_last`` (the fastest PyTorch CPU layout in BENCHMARKS.md W1).

Call: ``model(images [B,H,W,3] uint8) -> logits [B,K,H,W] float32`` (NCHW logits, as PyTorch's
``CrossEntropyLoss`` wants). uint8 images map to [-1, 1] as in ``clseg_jax.step.make_forward``;
the NHWC -> NCHW permute of a contiguous NHWC batch *is* a channels_last tensor, so no copy is made.

Module names mirror our Flax paths (``down.0.conv1`` <-> ``params/down/0/conv1``), so
``load_flax_init`` maps names mechanically. Check both sides agree (forward in train and eval mode,
loss gradients, BatchNorm updates) with ``python experiments/baselines/torch_unet.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn


class DoubleConv(nn.Module):
    """Two [3x3 conv (no bias) -> BatchNorm -> ReLU]: ``[B,Cin,H,W] -> [B,Cout,H,W]``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels, eps=1e-5, momentum=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(x)))


class UNet(nn.Module):
    """The W1 UNet; see the module docstring for the layout and call signature."""

    def __init__(
        self,
        num_classes: int = 5,
        widths: tuple[int, ...] = (16, 32, 64, 128),
        in_channels: int = 3,
    ):
        super().__init__()
        self.down = nn.ModuleList()
        c_in = in_channels
        for w in widths:
            self.down.append(DoubleConv(c_in, w))
            c_in = w
        self.ups = nn.ModuleList()
        self.up_convs = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.ups.append(nn.ConvTranspose2d(c_in, w, 2, stride=2))
            self.up_convs.append(DoubleConv(2 * w, w))
            c_in = w
        self.head = nn.Conv2d(c_in, num_classes, 1)
        self.to(memory_format=torch.channels_last)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """``[B,H,W,3]`` uint8 (or float, taken as is) -> ``[B,3,H,W]`` float32 channels_last."""
        x = images.permute(0, 3, 1, 2)  # a channels_last view of the NHWC batch
        if not x.is_floating_point():
            x = x.float() / 127.5 - 1.0
        return x.contiguous(memory_format=torch.channels_last)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every level's output (the last is the bottleneck ``[B,C,H/8,W/8]``)."""
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = nn.functional.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        return skips

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The bottleneck ``[B,128,H/8,W/8]``: our ``outputs["features"]`` (LFL's features)."""
        return self.encode(self.prepare(images))[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        skips = self.encode(self.prepare(images))
        x = skips[-1]
        for up, block, skip in zip(self.ups, self.up_convs, reversed(skips[:-1]), strict=True):
            x = block(torch.cat([skip, up(x)], dim=1))
        return self.head(x)


def _flax_to_torch(name: str, value: np.ndarray, module: nn.Module) -> tuple[str, np.ndarray]:
    """One exported Flax array -> (state_dict key, array in PyTorch's layout).

    Conv kernels are HWIO ``[kh,kw,Cin,Cout]`` -> OIHW ``[Cout,Cin,kh,kw]``. Our transposed conv's
    kernel ``[2,2,Cin,Cout]`` writes ``x[h,w] @ k[i,j]`` to output pixel ``(2h+i, 2w+j)``, which is
    ConvTranspose2d's ``weight [Cin,Cout,2,2]`` at ``[:, :, i, j]``: transpose (2, 3, 0, 1).
    """
    kind, *path, leaf = name.split("/")
    owner = module.get_submodule(".".join(path))
    if leaf == "kernel":
        if isinstance(owner, nn.ConvTranspose2d):
            value = value.transpose(2, 3, 0, 1)
        else:
            value = value.transpose(3, 2, 0, 1)
    del kind  # params/ and batch_stats/ names never collide once renamed
    renames = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
    return ".".join([*path, renames.get(leaf, leaf)]), value


def load_flax_init(model: UNet, arrays: Mapping[str, np.ndarray]) -> None:
    """Copies exported Flax arrays (``export.py``'s ``init.npz``) into ``model``, in place.

    Raises if a model tensor gets no value or a shape does not match, so a silent half-load can't
    happen.
    """
    state = model.state_dict()
    loaded = set()
    for name, value in arrays.items():
        key, value = _flax_to_torch(name, np.asarray(value), model)
        if key not in state:
            raise KeyError(f"{name} -> {key}: no such tensor in the PyTorch model")
        if tuple(state[key].shape) != value.shape:
            raise ValueError(f"{name} -> {key}: shape {value.shape} != {tuple(state[key].shape)}")
        state[key] = torch.from_numpy(np.array(value))  # a writable copy
        loaded.add(key)
    missing = [k for k in state if k not in loaded and not k.endswith("num_batches_tracked")]
    if missing:
        raise KeyError(f"no exported value for {missing}")
    model.load_state_dict(state)
    model.to(memory_format=torch.channels_last)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _torch_grads(
    arrays: Mapping[str, np.ndarray], images: np.ndarray, labels: np.ndarray, dtype: torch.dtype
) -> tuple[UNet, torch.Tensor, dict[str, np.ndarray]]:
    """A model in ``dtype`` loaded from ``arrays``, its train-mode logits and CE gradients."""
    model = UNet(5)
    load_flax_init(model, arrays)
    model.to(dtype)
    x = torch.from_numpy(images.astype(np.float64) / 127.5 - 1.0).to(dtype)
    logits = model(x)
    target = torch.from_numpy(labels).long()
    nn.functional.cross_entropy(logits, target, ignore_index=255).backward()
    grads = {n: p.grad.double().numpy() for n, p in model.named_parameters()}
    return model, logits.detach(), grads


def check_equivalence(batch: int = 8, size: int = 64, seed: int = 0) -> dict[str, float]:
    """Differences between our Flax UNet and this one on the same weights and batch.

    * ``logits_train`` / ``logits_eval``: max abs difference of the logits with batch statistics
      (train mode) and with the running statistics (eval mode), float32 on both sides.
    * ``grads_vs_torch64``: max over parameters of ``max |g_flax - g_torch64| / max |g_torch64|``
      for the pixel-wise cross-entropy in train mode, against PyTorch in float64 (our float32
      backward is ~1e-6 from it); ``grads_torch32_vs_torch64``: the same measure for PyTorch's own
      float32 backward, which is ~1e-2 off its float64 result on this batch (measured with
      torch 2.14.1 on CPU, either memory format), so float32 PyTorch is not the reference.
    * ``running_mean`` / ``running_var_biased``: the updated BatchNorm statistics; variances are
      compared after undoing PyTorch's unbiased correction ``n / (n-1)`` (Flax updates the
      running variance with the biased batch variance).

    Imports JAX lazily, so the Avalanche runner never loads it.
    """
    import jax

    from clseg_jax import losses, models
    from clseg_jax import step as step_lib

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import export

    config = export.w2_config()
    graphdef, params, stats = models.init(config.model, 5, seed=config.seed)
    forward = step_lib.make_forward(graphdef)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, (batch, size, size), dtype=np.uint8)

    def jax_loss(p):
        out, new_stats = forward(p, stats, images, True)
        return losses.cross_entropy(out["logits"], labels), (out["logits"], new_stats)

    (_, (logits_train, new_stats)), grads = jax.value_and_grad(jax_loss, has_aux=True)(params)
    logits_eval = forward(params, stats, images, False)[0]["logits"]

    arrays = {**export.flat_arrays(params, "params"), **export.flat_arrays(stats, "batch_stats")}
    model = UNet(5)
    load_flax_init(model, arrays)
    model.eval()  # before any train-mode call, which would move the running statistics
    with torch.no_grad():
        t_eval = model(torch.from_numpy(images))
    model, t_train, t_grads = _torch_grads(arrays, images, labels, torch.float32)
    _, _, t_grads64 = _torch_grads(arrays, images, labels, torch.float64)

    nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)
    out = {
        "logits_train": float(np.abs(nchw(logits_train) - t_train.numpy()).max()),
        "logits_eval": float(np.abs(nchw(logits_eval) - t_eval.numpy()).max()),
        "logits_scale": float(np.abs(t_train.numpy()).max()),
    }
    rel = lambda a, key: float(np.abs(a - t_grads64[key]).max() / np.abs(t_grads64[key]).max())
    flax_grads = dict(
        _flax_to_torch(n, v, model) for n, v in export.flat_arrays(grads, "params").items()
    )
    out["grads_vs_torch64"] = max(rel(g, key) for key, g in flax_grads.items())
    out["grads_torch32_vs_torch64"] = max(rel(t_grads[key], key) for key in t_grads)
    tstate = model.state_dict()
    worst_mean, worst_var = 0.0, 0.0
    for name, v in export.flat_arrays(new_stats, "batch_stats").items():
        key, v = _flax_to_torch(name, v, model)
        if key.endswith("running_mean"):
            worst_mean = max(worst_mean, float(np.abs(v - tstate[key].numpy()).max()))
        else:
            # torch: 0.9 * 1 + 0.1 * var * n/(n-1); map it back to the biased update.
            n = batch * (size // 2 ** _level(key)) ** 2
            biased = 0.9 + (tstate[key].numpy() - 0.9) * (n - 1) / n
            worst_var = max(worst_var, float(np.abs(v - biased).max()))
    out["running_mean"] = worst_mean
    out["running_var_biased"] = worst_var
    out["num_params_torch"] = num_params(model)
    out["num_params_flax"] = int(sum(np.size(v) for v in jax.tree.leaves(params)))
    return out


def _level(key: str) -> int:
    """Resolution level (0 = full size) of a BatchNorm from its state_dict key."""
    group, index = key.split(".")[:2]
    return int(index) if group == "down" else 2 - int(index)


def main() -> None:
    parser = argparse.ArgumentParser(description="Checks the PyTorch UNet against ours.")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args()
    torch.manual_seed(0)
    res = check_equivalence(batch=args.batch)
    for k, v in res.items():
        print(f"{k:>20}: {v:.3g}" if isinstance(v, float) else f"{k:>20}: {v}")
    rel = max(res["logits_train"], res["logits_eval"]) / res["logits_scale"]
    ok = rel < args.tol and res["grads_vs_torch64"] < args.tol
    ok = ok and res["num_params_torch"] == res["num_params_flax"] == 482_805
    print("equivalent" if ok else "NOT equivalent", f"(relative tolerance {args.tol})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
