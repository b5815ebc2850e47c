"""Data-free replay of DeepInversion images (Yin et al., CVPR 2020, "Dreaming to Distill").

No training image is stored. After each phase the model that just finished is inverted
(``synthesis.deepinversion.synthesize``: its BatchNorm statistics, priors, jitter, Adam on the
pixels, one compiled program) into ``di_mem_size`` images of the classes seen so far, spread
evenly over them, which replace the memory (``memory.buffer``); every later step trains on its
new batch plus ``di_replay_batch`` rows drawn from it, one loss over both, like ``replay``.

- Classification: each synthetic image's label is the class it was inverted for.
- Segmentation: the inversion target is a centred square of the class on background (half the
  side), and the stored label is the frozen model's own prediction on the synthetic image,
  restricted to the classes it knew (the old model labels its dreams, as the BiSeNet project and
  RECALL label replay images).
- ``di_logit_mse > 0`` adds the BiSeNet project's term: the mean squared difference between the
  current and the frozen model's logits on the synthetic rows, over the old classes.

The memory has one fixed size for the whole stream (the number of images per class shrinks as
classes arrive), so the synthesis compiles once and the step once. The synthetic images are
quantised to uint8 like stored rows.

Defaults: the synthesis hyperparameters are ``DIConfig``'s (NVlabs/DeepInversion's, see
``synthesis/deepinversion.py``) except ``di_iterations``: 2,000 iterations per phase is the
reference's ImageNet setting; 200 is what a CPU run of a 28-32 px stream can afford and already
brings the teacher's accuracy on its dreams near 1 (the behaviour test checks the effect).
``di_mem_size = 200`` and ``di_replay_batch = 32`` are replay's defaults (BENCHMARKS.md W2).

State: ``DIState(snap, memory)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clseg_jax import losses
from clseg_jax.memory import buffer
from clseg_jax.strategies import base, snapshot
from clseg_jax.synthesis import deepinversion as di

PyTree = Any

DEFAULTS = {
    "di_mem_size": 200,
    "di_replay_batch": 32,
    "di_iterations": 200,
    "di_lr": 0.1,
    "di_bn_scale": 0.01,
    "di_first_bn_multiplier": 10.0,
    "di_tv_l2": 1e-4,
    "di_l2": 1e-5,
    "di_jitter": 2,
    "di_logit_mse": 0.0,
}


class DIState(NamedTuple):
    snap: snapshot.Snapshot
    memory: buffer.Buffer


def synthesis_config(cfg: ml_collections.ConfigDict) -> di.DIConfig:
    """``DIConfig`` from the strategy's ``di_*`` fields (warm-up scaled to the iterations)."""
    iterations = int(cfg.di_iterations)
    return di.DIConfig(
        iterations=iterations,
        lr=float(cfg.di_lr),
        warmup_iterations=min(100, max(iterations // 20, 1)),
        bn_scale=float(cfg.di_bn_scale),
        first_bn_multiplier=float(cfg.di_first_bn_multiplier),
        tv_l2=float(cfg.di_tv_l2),
        l2=float(cfg.di_l2),
        jitter=int(cfg.di_jitter),
    )


def spread(classes: tuple[int, ...], n: int) -> np.ndarray:
    """``int32 [n]``: the classes repeated in turn (an even split of ``n`` rows over them)."""
    return np.asarray(classes, np.int32)[np.arange(n) % len(classes)]


def square_targets(classes: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``uint8 [n,H,W]``: class ``c`` on a centred square of half the side, background around."""
    h, w = hw
    out = np.zeros((len(classes), h, w), np.uint8)
    out[:, h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2] = classes[:, None, None]
    return out


def make(cfg: ml_collections.ConfigDict, env: base.Env) -> base.Strategy:
    size, n = int(cfg.di_mem_size), int(cfg.di_replay_batch)
    if not 1 <= n <= size:
        raise ValueError(f"di_replay_batch must be in 1..di_mem_size={size}, got {n}")
    if env.task.name == "multilabel":
        raise ValueError("deepinversion inverts class targets: not for multilabel tasks")
    if env.graphdef is None:
        raise ValueError("deepinversion needs the model's graphdef in its Env (base.Env.graphdef)")
    if env.input_norm != "symmetric":
        # Images are synthesised in the [-1, 1] input space and stored as uint8 through its
        # inverse; another normalisation would map the stored pixels elsewhere.
        raise ValueError(
            f"deepinversion needs model.input_norm='symmetric', got {env.input_norm!r}"
        )
    dense = env.task.name == "segmentation"
    mse_weight = float(cfg.di_logit_mse)
    synth_cfg = synthesis_config(cfg)
    teacher = di.make_teacher_fn(env.graphdef)
    k = env.num_classes

    def init(params, batch_stats) -> DIState:
        return DIState(
            snapshot.empty(params, batch_stats, k),
            buffer.empty(size, env.image_shape, env.label_shape),
        )

    def prepare_batch(batch, state: DIState, key):
        rows, ok = buffer.sample(state.memory, key, n)
        return buffer.append_replay(batch, rows, ok)

    def loss(inputs: base.LossInputs, state: DIState, key):
        del key
        if mse_weight == 0.0:
            return 0.0, {}
        snap = state.snap
        images = inputs.batch["image"][-n:]
        old = snapshot.outputs(env.forward, snap, images)["logits"]
        new = inputs.outputs["logits"][-n:]
        # Rows without a stored image carry ignored labels: they add nothing.
        label = inputs.batch["label"][-n:]
        row_ok = label != losses.IGNORE if label.ndim == 1 else jnp.any(label != 255, (1, 2))
        sq = jnp.where(snap.class_mask, jnp.square(new - old), 0.0)
        per_row = jnp.sum(sq, axis=-1) / jnp.maximum(jnp.sum(snap.class_mask), 1)
        per_row = per_row.reshape(per_row.shape[0], -1).mean(axis=1)
        value = snap.active * mse_weight * jnp.sum(per_row * row_ok) / jnp.maximum(row_ok.sum(), 1)
        return value, {"di_logit_mse": value}

    def after_phase(params, batch_stats, state: DIState, phase: base.Phase) -> DIState:
        snap = snapshot.take(params, batch_stats, phase.class_mask)
        classes = tuple(c for c in phase.seen_classes if not (dense and c == 0))
        wanted = spread(classes, size)
        hw = tuple(env.image_shape[:2])
        targets = square_targets(wanted, hw) if dense else wanted
        key = jax.random.fold_in(jax.random.key(env.seed), phase.index)
        images, _ = di.synthesize(
            teacher,
            (params, batch_stats),
            jnp.asarray(targets),
            key,
            synth_cfg,
            image_shape=tuple(env.image_shape),
            class_mask=jnp.asarray(phase.class_mask),
        )
        if dense:
            logits = snapshot.outputs(env.forward, snap, images)["logits"]
            logits = losses.mask_logits(logits, snap.class_mask)
            labels = jnp.argmax(logits, axis=-1).astype(jnp.uint8)
        else:
            labels = jnp.asarray(wanted, jnp.uint8)
        memory = state.memory._replace(
            image=di.to_uint8(images),
            label=labels,
            exp=jnp.full((size,), phase.index, jnp.int32),
            valid=jnp.ones((size,), bool),
            seen=jnp.asarray(size, jnp.int32),
        )
        # Back where the previous memory lived: the compiled step sees the same placements.
        memory = jax.tree.map(
            lambda new, old: jax.device_put(new, old.sharding), memory, state.memory
        )
        return DIState(snap, memory)

    return base.Strategy(init=init, prepare_batch=prepare_batch, loss=loss, after_phase=after_phase)
