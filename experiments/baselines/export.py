"""Exports W2's stream and the W1 UNet's initial weights for the PyTorch/Avalanche side.

Both files are built by clseg_jax's own code from ``configs/w2.py``, so the two sides see exactly
the same pixels and start from exactly the same weights:

* ``stream.npz``: for each experience t, ``train_images_t`` uint8 ``[N,H,W,3]``,
  ``train_labels_t`` uint8 ``[N,H,W]`` (255 = ignore), ``test_images_t``, ``test_labels_t``; plus
  ``num_classes`` and ``names`` (experience names).
* ``init.npz``: every parameter and BatchNorm statistic of ``models.init(config.model, K, seed)``
  under its Flax path joined by '/', e.g. ``params/down/0/conv1/kernel`` (HWIO ``[3,3,3,16]``),
  ``params/ups/0/kernel`` (``[2,2,Cin,Cout]``), ``batch_stats/down/0/norm1/mean``.

  python experiments/baselines/export.py --out /tmp/w2_export [--train-per-exp 64]
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import ml_collections
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:  # ``configs`` is a folder of the repository, not an installed package
    sys.path.insert(0, REPO)

from clseg_jax import data, models  # noqa: E402
from configs import w2  # noqa: E402


def w2_config(
    strategy: str = "naive", train_per_exp: int | None = None, epochs: int | None = None
) -> ml_collections.ConfigDict:
    """``configs/w2.py``'s config with the smoke-run overrides both sides apply identically."""
    config = w2.get_config(f"strategy={strategy}")
    if train_per_exp is not None:
        config.data.train_per_exp = train_per_exp
        # EWC's Fisher runs over the experience's whole training set on both sides.
        config.strategy.ewc_samples = train_per_exp
    if epochs is not None:
        config.epochs = epochs
    return config


def flat_arrays(tree: dict, prefix: str) -> dict[str, np.ndarray]:
    """``{"a": {0: {"b": x}}}`` -> ``{"prefix/a/0/b": np.asarray(x)}``."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        out["/".join([prefix, *keys])] = np.asarray(leaf)
    return out


def export_stream(config: ml_collections.ConfigDict, path: str) -> None:
    """Writes the stream of ``config.data`` to ``path`` (see the module docstring)."""
    stream = data.make(config.data)
    arrays: dict[str, np.ndarray] = {
        "num_classes": np.int64(stream.num_classes),
        "names": np.array([e.name for e in stream.experiences]),
    }
    for t, exp in enumerate(stream.experiences):
        arrays[f"train_images_{t}"] = exp.train.images
        arrays[f"train_labels_{t}"] = exp.train.labels
        arrays[f"test_images_{t}"] = exp.test.images
        arrays[f"test_labels_{t}"] = exp.test.labels
    np.savez(path, **arrays)


def export_init(config: ml_collections.ConfigDict, num_classes: int, path: str) -> None:
    """Writes the model's initial params and batch statistics (``config.seed``) to ``path``."""
    _, params, stats = models.init(config.model, num_classes, seed=config.seed)
    np.savez(path, **flat_arrays(params, "params"), **flat_arrays(stats, "batch_stats"))


def export(config: ml_collections.ConfigDict, out_dir: str) -> tuple[str, str]:
    """Both files into ``out_dir``; returns ``(stream_path, init_path)``."""
    os.makedirs(out_dir, exist_ok=True)
    stream_path = os.path.join(out_dir, "stream.npz")
    init_path = os.path.join(out_dir, "init.npz")
    export_stream(config, stream_path)
    with np.load(stream_path) as f:
        num_classes = int(f["num_classes"])
    export_init(config, num_classes, init_path)
    return stream_path, init_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for stream.npz and init.npz")
    parser.add_argument("--train-per-exp", type=int, default=None)
    args = parser.parse_args()
    paths = export(w2_config(train_per_exp=args.train_per_exp), args.out)
    print("\n".join(paths))


if __name__ == "__main__":
    main()
