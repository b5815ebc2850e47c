"""Model registry: ``MODELS[name](num_classes=..., rngs=..., **config.model.kwargs)``."""

from __future__ import annotations

from collections.abc import Callable

import ml_collections
from flax import nnx

from clseg_jax.models import unet

MODELS: dict[str, Callable[..., nnx.Module]] = {
    "unet": unet.UNet,
}


def make(cfg: ml_collections.ConfigDict, num_classes: int, seed: int) -> nnx.Module:
    """Builds ``MODELS[cfg.name]`` with the head sized to ``num_classes``."""
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model {cfg.name!r}; valid: {sorted(MODELS)}")
    kwargs = dict(cfg.get("kwargs", {}))
    return MODELS[cfg.name](num_classes=num_classes, rngs=nnx.Rngs(seed), **kwargs)
