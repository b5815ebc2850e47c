"""Model weights as one ``.npz`` file: params and BatchNorm statistics, checked on load.

Format: a NumPy ``.npz`` with one array per leaf of the model's pure dicts (``nnx.to_pure_dict`` of
``nnx.split(model, nnx.Param, nnx.BatchStat)``'s states, or ``models.init``'s output), keyed by
the leaf's path joined by '/' under ``params`` or ``batch_stats``::

    params/stem/conv/kernel          [7,7,3,64]   HWIO conv kernel
    params/layer1/0/bn1/scale        [64]         BatchNorm gamma (bias: beta)
    batch_stats/layer1/0/bn1/mean    [64]         BatchNorm running mean (var: running variance)
    params/head/kernel               [512,K]      linear layer, [in, out]

List indices (``layer1/0``) are written as decimal strings. Arrays keep their dtype. The same
layout as ``experiments/baselines/export.py``'s ``init.npz``, and what
``experiments/baselines/convert_torchvision.py`` writes.

``load`` never trusts the file: every key and shape is checked against a freshly initialised model
(its pure dicts, concrete or from ``nnx.eval_shape``), and the first missing, unexpected or
mis-shaped key is named in a one-line ``ValueError``. ``skip_head=True`` keeps the template's
``head`` and ignores the file's, to put a pretrained backbone under a head with another class count.
``into="backbone"`` loads a whole classification network's file (its ``head`` skipped) into one
sub-tree of a larger model (an ImageNet ResNet under DeepLab's ``backbone``), keeping the
template's other leaves (ASPP, classifier) as initialised.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

HEAD = "head"  # the classifier's top-level name in every model of MODELS
GROUPS = ("params", "batch_stats")


def flatten(tree: Mapping[Any, Any], prefix: str) -> dict[str, Any]:
    """``{"a": {0: {"b": x}}}`` -> ``{"prefix/a/0/b": x}``; leaves untouched, in tree order."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def save(path: str | os.PathLike, params: Mapping, batch_stats: Mapping) -> None:
    """Writes ``params`` and ``batch_stats`` (pure dicts of arrays) to ``path`` (a ``.npz``).

    NumPy appends ``.npz`` to a path that lacks it.
    """
    arrays = {
        **{k: np.asarray(v) for k, v in flatten(params, "params").items()},
        **{k: np.asarray(v) for k, v in flatten(batch_stats, "batch_stats").items()},
    }
    np.savez(path, **arrays)


def _is_head(key: str) -> bool:
    return any(key.startswith(f"{g}/{HEAD}/") for g in GROUPS)


def from_arrays(
    arrays: Mapping[str, np.ndarray],
    params: Mapping,
    batch_stats: Mapping,
    *,
    skip_head: bool = False,
    into: str | None = None,
) -> tuple[dict, dict]:
    """``arrays`` (flat, as in the file) checked against and shaped like the template pure dicts.

    Args:
      arrays: ``{"params/...": array, "batch_stats/...": array}``.
      params, batch_stats: a freshly initialised model's pure dicts; only the structure, shapes
        and dtypes are used (``jax.ShapeDtypeStruct`` leaves are fine) unless leaves are kept
        (``skip_head``, ``into``): kept leaves must be concrete arrays.
      skip_head: keep the template's ``head`` leaves and ignore the ``head`` entries of
        ``arrays``, whatever their shapes.
      into: load ``arrays`` (without their ``head``) into the template's top-level sub-tree of
        this name; every leaf outside it is kept.

    Returns:
      ``(params, batch_stats)``: the template's nesting with the loaded values, in the template's
      dtypes, as ``jax.Array``.

    Raises:
      ValueError: one line naming the first missing, mis-shaped or unexpected key.
    """
    if into:
        arrays = {
            f"{group}/{into}/{rest}": v
            for k, v in arrays.items()
            for group, _, rest in [k.partition("/")]
            if not _is_head(k)
        }

    def keep(path: str) -> bool:
        if skip_head and _is_head(path):
            return True
        return bool(into) and not any(path.startswith(f"{g}/{into}/") for g in GROUPS)

    used = set()

    def fill(tree: Mapping, prefix: str) -> dict:
        out = {}
        for key, ref in tree.items():
            path = f"{prefix}/{key}"
            if isinstance(ref, Mapping):
                out[key] = fill(ref, path)
            elif keep(path):
                out[key] = jnp.asarray(ref)
            elif path not in arrays:
                raise ValueError(f"weights: missing key {path!r} (model expects {ref.shape})")
            else:
                value = np.asarray(arrays[path])
                if value.shape != tuple(ref.shape):
                    hint = "; pass skip_head=True for a new head" if _is_head(path) else ""
                    raise ValueError(
                        f"weights: key {path!r} has shape {value.shape}, "
                        f"model expects {tuple(ref.shape)}{hint}"
                    )
                out[key] = jnp.asarray(value, dtype=ref.dtype)
                used.add(path)
        return out

    new_params, new_stats = fill(params, "params"), fill(batch_stats, "batch_stats")
    unexpected = [k for k in arrays if k not in used and not (skip_head and _is_head(k))]
    if unexpected:
        raise ValueError(
            f"weights: unexpected key {unexpected[0]!r} ({len(unexpected)} in all) not in the model"
        )
    return new_params, new_stats


def load(
    path: str | os.PathLike,
    params: Mapping,
    batch_stats: Mapping,
    *,
    skip_head: bool = False,
    into: str | None = None,
) -> tuple[dict, dict]:
    """Reads ``path`` (written by ``save``) into the structure of the template pure dicts.

    See ``from_arrays`` for the arguments, the checks and the ``ValueError``.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file {os.fspath(path)!r} does not exist")
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return from_arrays(arrays, params, batch_stats, skip_head=skip_head, into=into)


def save_model(path: str | os.PathLike, model: nnx.Module) -> None:
    """``save`` of an NNX model's params and batch statistics."""
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    save(path, nnx.to_pure_dict(params), nnx.to_pure_dict(stats))


def load_into(path: str | os.PathLike, model: nnx.Module, *, skip_head: bool = False) -> None:
    """``load`` into an NNX model in place (``model`` is the template; see ``from_arrays``)."""
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    new_params, new_stats = load(
        path, nnx.to_pure_dict(params), nnx.to_pure_dict(stats), skip_head=skip_head
    )
    nnx.replace_by_pure_dict(params, new_params)
    nnx.replace_by_pure_dict(stats, new_stats)
    nnx.update(model, params, stats)
