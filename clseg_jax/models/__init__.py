"""Model registry: ``MODELS[name](num_classes=..., rngs=..., **config.model.kwargs)``."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from flax import nnx
from ml_collections import config_dict

from clseg_jax.kernels import select
from clseg_jax.models import bisenet, deeplab, resnet, unet

# Tiny CPU variants (tests, smoke runs): ResNet-18-style BasicBlocks at an eighth of the width.
_SMALL = dict(depth=18, base_width=8)

# The outputs strategies read: every model returns "logits" and "features"; "penultimate" and
# "pod" where the readers below need them (tests/test_model_outputs.py checks every family).
OUTPUTS: dict[str, str] = {
    "logits": "[B,H,W,K] (segmentation) or [B,K] (classification) float32; every strategy, "
    "the task loss and the evaluator",
    "features": "[B,h,w,C], the backbone's last feature map; LFL, ILT, CCSI, iCaRL and memory "
    "herding (pooled by memory.update.pooled_features)",
    "penultimate": "the head's input: [B,H',W',F] for segmentation, [B,F] for classification "
    "(F = the head kernel's input size); DeepInversion's ABD loss, CCSI, iCaRL, LFL, PLOP",
    "pod": "segmentation only: a tuple of [B,h_i,w_i,C_i] maps, the stages then the head's "
    "input, for PLOP's pooled-output distillation",
}

MODELS: dict[str, Callable[..., nnx.Module]] = {
    "unet": unet.UNet,
    "resnet18": functools.partial(resnet.ResNet, depth=18),
    "resnet34": functools.partial(resnet.ResNet, depth=34),
    "resnet50": functools.partial(resnet.ResNet, depth=50),
    "resnet101": functools.partial(resnet.ResNet, depth=101),
    "deeplabv3": deeplab.DeepLabV3,  # kwargs pick depth, output_stride, ...; ResNet-101 OS16
    "deeplabv3_r50": functools.partial(deeplab.DeepLabV3, depth=50),
    "deeplabv3_r101": functools.partial(deeplab.DeepLabV3, depth=101),
    "deeplabv3_small": functools.partial(deeplab.DeepLabV3, aspp_channels=32, **_SMALL),
    "bisenet": bisenet.BiSeNet,  # ResNet-18 context path
    "bisenet_small": functools.partial(bisenet.BiSeNet, **_SMALL),
}

# Models with one output per image ([B,K] logits: classification, multi-label); the others
# predict a class per pixel.
IMAGE_MODELS = frozenset({"resnet18", "resnet34", "resnet50", "resnet101"})


# The constructor's own arguments, not the user's: the head size comes from the stream.
_NOT_KWARGS = ("num_classes", "rngs")


def _defaults(name: str) -> dict[str, Any]:
    """``{kwarg: default}`` of ``MODELS[name]``'s constructor (a partial's keywords included)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {sorted(MODELS)}")
    factory = MODELS[name]
    fixed = factory.keywords if isinstance(factory, functools.partial) else {}
    params = inspect.signature(_class(factory).__init__).parameters.values()
    return {
        p.name: fixed.get(p.name, p.default)
        for p in params
        if p.kind is p.KEYWORD_ONLY and p.name not in _NOT_KWARGS
    }


def _class(factory: Callable[..., Any]) -> type:
    return factory.func if isinstance(factory, functools.partial) else factory


def _field_type(name: str, key: str) -> type:
    """The non-None type of ``key``'s annotation (``str | None`` -> str, ``tuple[int, ...] |
    None`` -> tuple): what a ``None`` default's placeholder accepts from the command line."""
    hint = typing.get_type_hints(_class(MODELS[name]).__init__)[key]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kind = next(a for a in args if a is not type(None))
    return typing.get_origin(kind) or kind


def kwargs_config(name: str, **given: Any) -> ml_collections.ConfigDict:
    """Every keyword ``MODELS[name]`` takes, at its default unless ``given``.

    What configs declare as ``model.kwargs``, so that ``--config.model.kwargs.<k>=...`` works
    for every argument of the chosen model; a ``None`` default (``dtype``, ``widths``) becomes a
    typed placeholder, so it too takes a command-line value.
    """
    defaults = _defaults(name)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"model {name!r} takes no {unknown}; its kwargs: {sorted(defaults)}")
    out = {}
    for key, default in defaults.items():
        value = given.get(key, default)
        out[key] = config_dict.placeholder(_field_type(name, key)) if value is None else value
    return ml_collections.ConfigDict(out)


def init_key(seed: int) -> jax.Array:
    """The initialisers' key for ``seed``.

    XLA:CPU compiles threefry-based initialisers slowly (27 s for the W1 UNet, 4 s with rbg);
    rbg is deterministic given the seed on a given backend, which is all initialisation needs.
    """
    return jax.random.key(seed, impl="rbg")


def make(cfg: ml_collections.ConfigDict, num_classes: int, seed: int | jax.Array) -> nnx.Module:
    """Builds ``MODELS[cfg.name]`` eagerly, with the head sized to ``num_classes``; ``seed`` is an
    int or an ``init_key``. ``cfg.conv_impl`` (default ``xla``) picks the convolutions."""
    kwargs = dict(cfg.kwargs)
    valid = set(_defaults(cfg.name))
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        # A config whose model.name was switched without its kwargs (kwargs_config).
        raise ValueError(
            f"model {cfg.name!r} takes no model.kwargs {unknown}; its kwargs: {sorted(valid)}"
        )
    impl = cfg.get("conv_impl", "xla")
    if impl == "auto":  # setup resolves it with the run's mesh; here one device is assumed
        impl = select.resolve(impl, dtype=str(kwargs.get("dtype") or "float32"), devices=1)
    select.check(impl)
    key = init_key(seed) if isinstance(seed, int) else seed
    model = MODELS[cfg.name](num_classes=num_classes, rngs=nnx.Rngs(key), **kwargs)
    # A static attribute of every conv layer: part of the graphdef, so the forward function
    # built from it traces the chosen convolution.
    model.set_attributes(conv_impl=impl, raise_if_not_found=False)
    return model


def init(
    cfg: ml_collections.ConfigDict, num_classes: int, seed: int
) -> tuple[nnx.GraphDef, dict[str, Any], dict[str, Any]]:
    """``(graphdef, params, batch_stats)`` as pure dicts, initialised in one compiled program.

    Building the module eagerly runs (and compiles) every initialiser separately: one XLA
    compilation per layer. Under ``jax.jit`` the whole initialisation is a single program; the
    key is its argument, so every seed shares one compiled program (and the persistent cache
    entry) instead of compiling its own.
    """

    def build(key):
        _, params, stats = nnx.split(make(cfg, num_classes, key), nnx.Param, nnx.BatchStat)
        return params.to_pure_dict(), stats.to_pure_dict()

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(cfg, num_classes, seed)))
    params, stats = jax.jit(build)(init_key(seed))
    return graphdef, params, stats
