"""Tiny configs for tests: small images, a narrow UNet, a few steps per experience."""

from __future__ import annotations

import ml_collections

from configs import shapes_di


def config(**overrides) -> ml_collections.ConfigDict:
    """The demo config shrunk to seconds per run; ``overrides`` use dotted names.

    Keep ``tests/test_train.py``'s ``TINY_FLAGS`` (the same config through the CLI) in step.
    """
    c = shapes_di.get_config()
    c.data.image_size = 32
    c.data.train_per_exp = 64
    c.data.test_per_exp = 16
    c.model.kwargs.widths = (8, 16)
    c.batch_size = 8
    c.eval_batch_size = 16
    # 32 Adam steps per experience (the demo's optimizer): enough to learn visibly.
    c.epochs = 4
    c.log_every_steps = 1
    c.progress = False
    c.log.tensorboard = False
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c
