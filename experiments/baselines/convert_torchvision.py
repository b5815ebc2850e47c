"""torchvision ResNet-18/34 weights -> clseg_jax ``ResNet`` weights (``clseg_jax.models.weights``).

The converted file loads into ``ResNet(K, depth=18 or 34, small_input=False)`` with the default
widths (K from the checkpoint's ``fc``), which then gives torchvision's logits on the same
(normalised) images, transposed to NHWC. Name mapping, ``[...]`` the layout change:

    conv1.weight                  -> params/stem/conv/kernel            OIHW -> HWIO
    bn1.weight / bn1.bias         -> params/stem/bn/scale / bias
    bn1.running_mean / _var       -> batch_stats/stem/bn/mean / var
    layerS.I.convJ.weight         -> params/layerS/I/convJ/kernel       OIHW -> HWIO
    layerS.I.bnJ.*                -> .../layerS/I/bnJ/*                 as bn1
    layerS.I.downsample.0.weight  -> params/layerS/I/downsample/conv/kernel
    layerS.I.downsample.1.*       -> .../layerS/I/downsample/bn/*
    fc.weight / fc.bias           -> params/head/kernel / bias          [K,C] -> [C,K]

``num_batches_tracked`` is dropped (Flax's BatchNorm has a fixed momentum). ``convert`` uses NumPy
only; the command line reads the ``.pth`` with torch (the ``baselines`` extra), writes the
``.npz`` and loads it back into a freshly built model to check every key and shape:

  .venv-baselines/bin/python experiments/baselines/convert_torchvision.py \\
      --pth resnet18.pth --out resnet18.npz [--depth 18]

The ``.pth`` is a ``state_dict`` saved with ``torch.save(model.state_dict(), path)``, e.g. from
``torchvision.models.resnet18(weights=...)`` on a machine that can download weights.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_BN = {"weight": ("params", "scale"), "bias": ("params", "bias")}
_BN.update({"running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")})
# torchvision name (without the parameter) -> our module path.
_MODULE = [
    (re.compile(r"^conv1$"), lambda m: ["stem", "conv"]),
    (re.compile(r"^bn1$"), lambda m: ["stem", "bn"]),
    (re.compile(r"^layer([1-4])\.(\d+)\.(conv[12])$"), lambda m: [f"layer{m[1]}", int(m[2]), m[3]]),
    (re.compile(r"^layer([1-4])\.(\d+)\.(bn[12])$"), lambda m: [f"layer{m[1]}", int(m[2]), m[3]]),
    (
        re.compile(r"^layer([1-4])\.(\d+)\.downsample\.([01])$"),
        lambda m: [f"layer{m[1]}", int(m[2]), "downsample", "conv" if m[3] == "0" else "bn"],
    ),
    (re.compile(r"^fc$"), lambda m: ["head"]),
]
DEPTHS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34}


def _target(name: str, value: np.ndarray) -> tuple[str, list, np.ndarray]:
    """One torchvision entry -> ``(group, path, array)``; ``ValueError`` on an unknown name."""
    module, _, leaf = name.rpartition(".")
    for pattern, path_of in _MODULE:
        m = pattern.match(module)
        if m is None:
            continue
        path = path_of(m)
        if path[-1] == "head":
            if leaf not in ("weight", "bias"):
                break
            return "params", [*path, "kernel" if leaf == "weight" else "bias"], value.T
        if path[-1].startswith("conv"):
            if leaf != "weight" or value.ndim != 4:
                break
            return "params", [*path, "kernel"], value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if leaf not in _BN:
            break
        group, ours = _BN[leaf]
        return group, [*path, ours], value
    raise ValueError(f"convert: no clseg_jax ResNet-18/34 counterpart for {name!r}")


def convert(state_dict: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """Maps a torchvision ``resnet18``/``resnet34`` state dict to ``(params, batch_stats)``.

    Args:
      state_dict: torchvision names -> NumPy arrays (``{k: v.numpy() for k, v in sd.items()}``).

    Returns:
      The pure dicts of ``ResNet(K, depth=..., small_input=False)`` (``layerS`` blocks keyed by
      int, as ``nnx`` pure dicts), float arrays in their checkpoint dtype.

    Raises:
      ValueError: for a name with no counterpart (e.g. a ResNet-50's ``conv3``).
    """
    trees: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for name, value in state_dict.items():
        if name.endswith("num_batches_tracked"):
            continue
        group, path, array = _target(name, np.asarray(value))
        node = trees[group]
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(array)
    return trees["params"], trees["batch_stats"]


def infer_depth(params: Mapping) -> int:
    """18 or 34 from the number of blocks per stage of converted ``params``."""
    blocks = tuple(len(params.get(f"layer{s}", {})) for s in range(1, 5))
    if blocks not in DEPTHS:
        raise ValueError(f"convert: blocks per stage {blocks} are neither ResNet-18 nor -34")
    return DEPTHS[blocks]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pth", required=True, help="torch.save'd state_dict of a ResNet-18/34")
    parser.add_argument("--out", required=True, help="the .npz to write")
    parser.add_argument("--depth", type=int, default=None, help="18 or 34 (default: inferred)")
    args = parser.parse_args(argv)

    try:
        import torch  # the baselines extra; only the command line needs it
    except ImportError:
        sys.exit("convert_torchvision: reading a .pth needs torch: pip install -e '.[baselines]'")

    if REPO not in sys.path:  # ``clseg_jax`` may not be installed in the baselines venv
        sys.path.insert(0, REPO)
    from flax import nnx

    from clseg_jax.models import resnet, weights

    state = torch.load(args.pth, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)  # a training checkpoint may wrap it
    params, stats = convert({k: v.detach().cpu().numpy() for k, v in state.items()})
    depth = args.depth or infer_depth(params)
    num_classes = params["head"]["bias"].shape[0]
    weights.save(args.out, params, stats)

    # Load it back into a model of the matching shape: a converter bug fails here, not later.
    model = nnx.eval_shape(
        lambda: resnet.ResNet(num_classes, depth=depth, small_input=False, rngs=nnx.Rngs(0))
    )
    _, ref_params, ref_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    out = args.out if args.out.endswith(".npz") else args.out + ".npz"
    weights.load(out, nnx.to_pure_dict(ref_params), nnx.to_pure_dict(ref_stats))
    print(f"wrote {out}: ResNet-{depth}, {num_classes} classes, small_input=False")
    return out


if __name__ == "__main__":
    main()
