"""torchvision ResNet / DeepLab-v3 weights -> clseg_jax weights (``clseg_jax.models.weights``).

Two kinds of ``state_dict``:

* ``resnet18/34/50/101`` -> ``ResNet(K, depth=..., small_input=False)`` (default widths, K from
  the checkpoint's ``fc``), which then gives torchvision's logits on the same (normalised) images,
  transposed to NHWC. The same file is an ImageNet backbone for a segmentation model:
  ``weights.load(path, params, stats, into="backbone")`` (its ``head`` is skipped).
* ``deeplabv3_resnet50/101`` -> ``DeepLabV3(K, depth=..., output_stride=8, head_conv=True)``,
  torchvision's layout (OS8, rates 12/24/36, a 3x3 conv between ASPP and classifier), which then
  gives torchvision's ``out`` logits. The auxiliary FCN head (``aux_classifier.*``, torchvision's
  ``aux_loss=True``) has no counterpart and is dropped.

Name mapping, ``[...]`` the layout change; ``P.`` is ``backbone.`` in a DeepLab state dict (to
``backbone/`` in ours) and empty in a ResNet's:

    P.conv1.weight                    -> params/[backbone/]stem/conv/kernel   OIHW -> HWIO
    P.bn1.weight / bias               -> params/[backbone/]stem/bn/scale / bias
    P.bn1.running_mean / _var         -> batch_stats/[backbone/]stem/bn/mean / var
    P.layerS.I.convJ.weight           -> params/.../layerS/I/convJ/kernel     J = 1, 2 [, 3]
    P.layerS.I.bnJ.*                  -> .../layerS/I/bnJ/*                   as bn1
    P.layerS.I.downsample.0.weight    -> params/.../layerS/I/downsample/conv/kernel
    P.layerS.I.downsample.1.*         -> .../layerS/I/downsample/bn/*
    fc.weight / fc.bias               -> params/head/kernel / bias            [K,C] -> [C,K]
    classifier.0.convs.B.0.weight     -> params/aspp/convs/B/conv/kernel      B = 0 (1x1), 1-3
    classifier.0.convs.B.1.*          -> .../aspp/convs/B/bn/*                (atrous 3x3)
    classifier.0.convs.4.1.weight     -> params/aspp/pool/conv/kernel         image pooling
    classifier.0.convs.4.2.*          -> .../aspp/pool/bn/*
    classifier.0.project.0.weight     -> params/aspp/project/conv/kernel
    classifier.0.project.1.*          -> .../aspp/project/bn/*
    classifier.1.weight               -> params/head_conv/conv/kernel
    classifier.2.*                    -> .../head_conv/bn/*
    classifier.4.weight / bias        -> params/head/kernel / bias            OIHW -> HWIO

``num_batches_tracked`` is dropped (Flax's BatchNorm has a fixed momentum). ``convert`` uses NumPy
only and checks that every residual block is a whole BasicBlock or Bottleneck; the command line
reads the ``.pth`` with torch (the ``baselines`` extra), writes the ``.npz`` and loads it back
into a freshly built model to check every key and shape:

  .venv-baselines/bin/python experiments/baselines/convert_torchvision.py \\
      --pth resnet101.pth --out resnet101.npz [--depth 101]

The ``.pth`` is a ``state_dict`` saved with ``torch.save(model.state_dict(), path)``, e.g. from
``torchvision.models.resnet101(weights=...)`` or ``torchvision.models.segmentation.
deeplabv3_resnet101(weights=...)`` on a machine that can download weights.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from collections.abc import Mapping

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_BN = {"weight": ("params", "scale"), "bias": ("params", "bias")}
_BN.update({"running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")})
_BLOCK = r"layer([1-4])\.(\d+)"
# torchvision module name (without the parameter, the DeepLab ``backbone.`` prefix removed) ->
# our module path; the last element says the kind: "conv...", "bn..." or "head".
_MODULE = [
    (re.compile(r"^conv1$"), lambda m: ["stem", "conv"]),
    (re.compile(r"^bn1$"), lambda m: ["stem", "bn"]),
    (re.compile(rf"^{_BLOCK}\.((?:conv|bn)[123])$"), lambda m: [f"layer{m[1]}", int(m[2]), m[3]]),
    (
        re.compile(rf"^{_BLOCK}\.downsample\.([01])$"),
        lambda m: [f"layer{m[1]}", int(m[2]), "downsample", "conv" if m[3] == "0" else "bn"],
    ),
    (re.compile(r"^fc$"), lambda m: ["head"]),
]
_DEEPLAB = [
    (
        re.compile(r"^classifier\.0\.convs\.([0-3])\.([01])$"),
        lambda m: ["aspp", "convs", int(m[1]), "conv" if m[2] == "0" else "bn"],
    ),
    (
        re.compile(r"^classifier\.0\.convs\.4\.([12])$"),
        lambda m: ["aspp", "pool", "conv" if m[1] == "1" else "bn"],
    ),
    (
        re.compile(r"^classifier\.0\.project\.([01])$"),
        lambda m: ["aspp", "project", "conv" if m[1] == "0" else "bn"],
    ),
    (re.compile(r"^classifier\.1$"), lambda m: ["head_conv", "conv"]),
    (re.compile(r"^classifier\.2$"), lambda m: ["head_conv", "bn"]),
    (re.compile(r"^classifier\.4$"), lambda m: ["head"]),
]
_DROPPED = ("num_batches_tracked", "aux_classifier.")
# A residual block's module names (besides an optional downsample).
_BLOCK_KINDS = {
    frozenset({"conv1", "bn1", "conv2", "bn2"}): "BasicBlock",
    frozenset({"conv1", "bn1", "conv2", "bn2", "conv3", "bn3"}): "Bottleneck",
}
DEPTHS = {
    ((2, 2, 2, 2), "BasicBlock"): 18,
    ((3, 4, 6, 3), "BasicBlock"): 34,
    ((3, 4, 6, 3), "Bottleneck"): 50,
    ((3, 4, 23, 3), "Bottleneck"): 101,
}


def _module_path(module: str) -> list | None:
    if module.startswith("backbone."):
        rules, module, prefix = _MODULE[:-1], module[len("backbone.") :], ["backbone"]
    else:
        rules, prefix = _MODULE + _DEEPLAB, []
    for pattern, path_of in rules:
        m = pattern.match(module)
        if m is not None:
            return prefix + path_of(m)
    return None


def _target(name: str, value: np.ndarray) -> tuple[str, list, np.ndarray]:
    """One torchvision entry -> ``(group, path, array)``; ``ValueError`` on an unknown name."""
    module, _, leaf = name.rpartition(".")
    path = _module_path(module)
    kind = path[-1] if path else ""
    if kind == "head" and leaf in ("weight", "bias"):
        if leaf == "bias":
            return "params", [*path, "bias"], value
        # Linear [K,C] -> [C,K]; 1x1 conv OIHW -> HWIO.
        return (
            "params",
            [*path, "kernel"],
            value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0),
        )
    if kind.startswith("conv") and leaf == "weight" and value.ndim == 4:
        return "params", [*path, "kernel"], value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if kind.startswith("bn") and leaf in _BN:
        group, ours = _BN[leaf]
        return group, [*path, ours], value
    raise ValueError(f"convert: no clseg_jax ResNet/DeepLabV3 counterpart for {name!r}")


def _check_blocks(names: list[str]) -> None:
    """Every ``layerS.I`` must hold exactly a BasicBlock's or a Bottleneck's convs and norms."""
    blocks: dict[str, list[str]] = collections.defaultdict(list)
    for name in names:
        m = re.match(rf"^((?:backbone\.)?{_BLOCK})\.(\w+)\.", name)
        if m is not None and m[4] != "downsample":
            blocks[m[1]].append(name)
    for block, entries in blocks.items():
        modules = frozenset(n[len(block) + 1 :].split(".")[0] for n in entries)
        if modules not in _BLOCK_KINDS:
            raise ValueError(
                f"convert: block {block!r} ({entries[0]!r}, ...) has {sorted(modules)}, "
                "neither a BasicBlock's nor a Bottleneck's convs and norms"
            )


def convert(state_dict: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """Maps a torchvision ResNet or DeepLab-v3 state dict to ``(params, batch_stats)``.

    Args:
      state_dict: torchvision names -> NumPy arrays (``{k: v.numpy() for k, v in sd.items()}``).

    Returns:
      The pure dicts of ``ResNet(K, depth=..., small_input=False)`` or ``DeepLabV3(K, depth=...,
      output_stride=8, head_conv=True)`` (blocks and branches keyed by int, as ``nnx`` pure
      dicts), float arrays in their checkpoint dtype.

    Raises:
      ValueError: for a name with no counterpart, or a residual block that is neither a whole
        BasicBlock nor a whole Bottleneck.
    """
    names = [n for n in state_dict if not any(d in n for d in _DROPPED)]
    _check_blocks(names)
    trees: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for name in names:
        group, path, array = _target(name, np.asarray(state_dict[name]))
        node = trees[group]
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(array)
    return trees["params"], trees["batch_stats"]


def infer_depth(params: Mapping) -> int:
    """18, 34, 50 or 101 from converted ``params`` (a ResNet's, or a DeepLab's ``backbone``)."""
    params = params.get("backbone", params)
    blocks = tuple(len(params.get(f"layer{s}", {})) for s in range(1, 5))
    kind = "Bottleneck" if "conv3" in params.get("layer1", {}).get(0, {}) else "BasicBlock"
    if (blocks, kind) not in DEPTHS:
        raise ValueError(f"convert: {kind}s per stage {blocks} are not ResNet-18/34/50/101")
    return DEPTHS[(blocks, kind)]


def template(params: Mapping, depth: int | None = None):
    """An abstract (``nnx.eval_shape``) model matching converted ``params``, and its description."""
    from flax import nnx

    from clseg_jax.models import deeplab, resnet

    depth = depth or infer_depth(params)
    num_classes = params["head"]["bias"].shape[0]
    if "aspp" in params:
        desc = f"DeepLabV3 depth {depth}, {num_classes} classes, output_stride=8, head_conv=True"
        kwargs = dict(output_stride=8, head_conv=True)
        cls = deeplab.DeepLabV3
    else:
        desc = f"ResNet-{depth}, {num_classes} classes, small_input=False"
        kwargs = dict(small_input=False)
        cls = resnet.ResNet
    build = lambda: cls(num_classes, depth=depth, rngs=nnx.Rngs(0), **kwargs)
    return nnx.eval_shape(build), desc


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pth", required=True, help="torch.save'd state_dict (ResNet/DeepLabV3)")
    parser.add_argument("--out", required=True, help="the .npz to write")
    parser.add_argument("--depth", type=int, default=None, help="18/34/50/101 (default: inferred)")
    args = parser.parse_args(argv)

    try:
        import torch  # the baselines extra; only the command line needs it
    except ImportError:
        sys.exit("convert_torchvision: reading a .pth needs torch: pip install -e '.[baselines]'")

    if REPO not in sys.path:  # ``clseg_jax`` may not be installed in the baselines venv
        sys.path.insert(0, REPO)
    from flax import nnx

    from clseg_jax.models import weights

    state = torch.load(args.pth, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)  # a training checkpoint may wrap it
    params, stats = convert({k: v.detach().cpu().numpy() for k, v in state.items()})
    weights.save(args.out, params, stats)

    # Load it back into a model of the matching shape: a converter bug fails here, not later.
    model, desc = template(params, args.depth)
    _, ref_params, ref_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    out = args.out if args.out.endswith(".npz") else args.out + ".npz"
    weights.load(out, nnx.to_pure_dict(ref_params), nnx.to_pure_dict(ref_stats))
    dropped = sum(k.startswith("aux_classifier.") for k in state)
    note = f" ({dropped} aux_classifier entries dropped)" if dropped else ""
    print(f"wrote {out}: {desc}{note}")
    return out


if __name__ == "__main__":
    main()
