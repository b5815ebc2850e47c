"""Data-free replay of DeepInversion images (Yin et al., CVPR 2020, "Dreaming to Distill").

No training image is stored. After each phase the model that just finished is inverted
(``synthesis.deepinversion.synthesize``: its BatchNorm statistics, priors, jitter, Adam on the
pixels; one compiled program on accelerators, one compiled iteration per step on CPU) into
``di_mem_size`` images of the classes seen so far, spread evenly over them, which replace the
memory (``memory.buffer``); every later step trains on its new batch plus ``di_replay_batch``
rows drawn from it.

How the two kinds of rows are used (``di_loss``; "auto": "abd" for classification, "replay" for
segmentation):

- "replay": one CE over the new rows and the synthetic rows together, like ``replay`` with stored
  images. Measured on split digits (``configs/digits_data_free.py``), this keeps nothing: the
  model separates synthetic from real images and real old digits end up in the new classes
  (old-experience accuracy 0.00-0.01 after the next step, as with fine-tuning).
- "abd": Always Be Dreaming (Smith et al., ICCV 2021; GT-RIPL/AlwaysBeDreaming-DFCIL's
  ``AlwaysBeDreaming.update_model``), the loss that makes inverted images useful for
  class-incremental learning (``abd_terms``): a *local* CE of the new rows over the new classes
  only (real images never push old logits down), a CE of every row over all seen classes
  through the linear head alone (features without gradient, so the backbone cannot learn
  "synthetic vs real"), class-balanced with weights ``n_old / n_seen`` for old-class rows and
  ``1 - n_old / n_seen`` for new ones, and the importance-weighted feature distillation
  ``di_kd * ||(h - h_old) W_old||^2 / n_old`` on every row. As the reference, the synthetic
  batch has the size of the real one (``di_replay_batch`` = the batch size in the configs) and
  the first phase is plain CE. Needs a linear head ``params["head"]`` and the model's
  ``penultimate`` output (``models.resnet``). ABD trains a generator network to produce its
  replay; here the replay is DeepInversion's optimised pixels instead (this library's design:
  synthesis compiled on device, no generator to train).

- Classification: each synthetic image's label is the class it was inverted for.
- Segmentation: the inversion target is a centred square of the class on background (half the
  side), and the stored label is the frozen model's own prediction on the synthetic image,
  restricted to the classes it knew (the old model labels its dreams, as the BiSeNet project and
  RECALL label replay images).
- ``di_logit_mse > 0`` adds the BiSeNet project's term: the mean squared difference between the
  current and the frozen model's logits on the synthetic rows, over the old classes.

The memory has one fixed size for the whole stream (the number of images per class shrinks as
classes arrive), so the synthesis compiles once and the step once. The synthetic images are
quantised to uint8 like stored rows. After each synthesis the log says how well the model that
was inverted recognises its own images (accuracy, CE, BN-statistics gap).

Defaults: the synthesis hyperparameters are ``DIConfig``'s (NVlabs/DeepInversion's, see
``synthesis/deepinversion.py``) except ``di_iterations``: 2,000 iterations per phase is the
reference's ImageNet setting; 200 is what a CPU run of a 28-32 px stream can afford and already
brings the teacher's accuracy on its dreams near 1. ``di_mem_size = 200`` and ``di_replay_batch =
32`` are replay's defaults (BENCHMARKS.md W2). ``di_kd = 0.1`` was chosen on split digits
(five experiences of two digits, 3 epochs each) from 0.1 and 0.5: 0.5 forgot less (0.23 / 0.35
against 0.42 / 0.46, seeds 0 / 1) but learned each new experience less (mean diag 0.62 / 0.79
against 0.84 / 0.78).

State: ``DIState(snap, memory)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

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
    "di_loss": "auto",
    "di_kd": 0.1,
}

# What each field of DEFAULTS sets (the hyperparameter table of docs/strategies.md).
HELP = {
    "di_mem_size": "synthetic images in the memory, inverted anew after each phase",
    "di_replay_batch": "synthetic rows added to each step's batch",
    "di_iterations": "synthesis iterations per phase (the reference's ImageNet setting: 2,000)",
    "di_lr": "Adam learning rate on the pixels",
    "di_bn_scale": "weight of the BatchNorm-statistics loss",
    "di_first_bn_multiplier": "multiplier of the first BatchNorm in that loss",
    "di_tv_l2": "weight of the L2 total-variation prior",
    "di_l2": "weight of the L2 prior on the pixels",
    "di_jitter": "largest random roll (pixels) per iteration",
    "di_logit_mse": (
        "weight of the MSE between new and old logits on the synthetic rows (the BiSeNet "
        "project's term; 0 = off)"
    ),
    "di_loss": (
        "`abd` (Always Be Dreaming's loss) or `replay` (one CE over real and synthetic rows); "
        "`auto` = abd for classification, replay for segmentation"
    ),
    "di_kd": "weight of ABD's feature distillation `||(h - h_old) W_old||^2 / n_old`",
}


class DIState(NamedTuple):
    snap: snapshot.Snapshot
    memory: buffer.Buffer


def synthesis_config(cfg: ml_collections.ConfigDict) -> di.DIConfig:
    """``DIConfig`` from the strategy's ``di_*`` fields (warm-up scaled to the iterations)."""
    iterations = int(cfg.di_iterations)
    return di.DIConfig(
        iterations=iterations,
        lr=base.hparam(cfg.di_lr),
        warmup_iterations=min(100, max(iterations // 20, 1)),
        bn_scale=base.hparam(cfg.di_bn_scale),
        first_bn_multiplier=base.hparam(cfg.di_first_bn_multiplier),
        tv_l2=base.hparam(cfg.di_tv_l2),
        l2=base.hparam(cfg.di_l2),
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


def abd_terms(
    logits: jax.Array,
    penultimate: jax.Array,
    old_penultimate: jax.Array,
    labels: jax.Array,
    head: dict[str, jax.Array],
    old_kernel: jax.Array,
    seen: jax.Array,
    old: jax.Array,
    num_real: int,
) -> dict[str, jax.Array]:
    """Always Be Dreaming's three terms on a batch of real rows followed by synthetic ones.

    Args:
      logits: ``[B,K]`` the current model's (train-mode) logits.
      penultimate: ``[B,C]`` its pooled features; ``old_penultimate`` the frozen model's.
      labels: ``[B]`` class ids, 255 = no label (rows without a stored image).
      head: the current linear head ``{"kernel": [C,K], "bias": [K]}``; ``old_kernel [C,K]`` the
        frozen model's.
      seen, old: ``bool [K]``: the classes seen so far and those the frozen model knew.
      num_real: rows ``[:num_real]`` are the experience's own, the rest synthetic.

    Returns ``{"local", "head", "kd"}``:
      local: CE of the real rows over the new classes only, weighted ``1 - r``;
      head: CE of every row over the seen classes through the head alone (features without
        gradient), weighted ``r`` for old-class rows and ``1 - r`` for new ones,
        ``r = n_old / n_seen`` (each class then weighs about the same);
      kd: ``mean_rows sum_{k old} ((h - h_old) @ W_old)_k^2 / n_old`` over every row.
    Both CEs average over the rows with a label (PyTorch's ``(w * nll).mean()``).
    """
    new = seen & ~old
    n_old, n_seen = jnp.sum(old), jnp.maximum(jnp.sum(seen), 1)
    r = n_old / n_seen
    ok = labels != losses.IGNORE
    safe = jnp.where(ok, labels, 0).astype(jnp.int32)
    weight = jnp.where(old[safe], r, 1.0 - r) * ok

    def weighted_nll(scores, mask, rows):
        logp = jax.nn.log_softmax(losses.mask_logits(scores[rows], mask), axis=-1)
        nll = -jnp.take_along_axis(logp, safe[rows, None], axis=-1)[:, 0]
        return jnp.sum(weight[rows] * nll) / jnp.maximum(jnp.sum(ok[rows]), 1)

    real = slice(0, num_real)
    local = weighted_nll(logits, new, real)
    head_logits = jax.lax.stop_gradient(penultimate) @ head["kernel"] + head["bias"]
    head_ce = weighted_nll(head_logits, seen, slice(None))
    w_old = jnp.where(old, old_kernel, 0.0)
    change = (penultimate - old_penultimate) @ w_old
    kd = jnp.mean(jnp.sum(jnp.square(change), axis=-1)) / jnp.maximum(n_old, 1)
    return {"local": local, "head": head_ce, "kd": kd}


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
    mse_weight = base.hparam(cfg.di_logit_mse)
    mode = str(cfg.di_loss)
    if mode not in ("auto", "abd", "replay"):
        raise ValueError(f"di_loss must be 'auto', 'abd' or 'replay', got {mode!r}")
    use_abd = mode == "abd" or (mode == "auto" and not dense)
    if use_abd and dense:
        raise ValueError("di_loss='abd' is for classification (it needs one label per image)")
    kd_weight = base.hparam(cfg.di_kd)
    synth_cfg = synthesis_config(cfg)
    teacher = di.make_teacher_fn(env.graphdef)
    k = env.num_classes

    def init(params, batch_stats) -> DIState:
        head = params.get("head", {}) if isinstance(params, dict) else {}
        if use_abd and not {"kernel", "bias"} <= set(head):
            raise ValueError(
                "di_loss='abd' needs a linear head params['head'] = {kernel, bias} (ResNet "
                f"head='linear'), got {sorted(head)}; use di_loss='replay' for other models"
            )
        return DIState(
            snapshot.empty(params, batch_stats, k),
            buffer.empty(size, env.image_shape, env.label_shape),
        )

    def prepare_batch(batch, state: DIState, key):
        rows, ok = buffer.sample(state.memory, key, n)
        return buffer.append_replay(batch, rows, ok)

    def abd(inputs: base.LossInputs, snap: snapshot.Snapshot):
        images, b = inputs.batch["image"], inputs.batch["image"].shape[0] - n
        old = snap.class_mask & (snap.active > 0)
        terms = abd_terms(
            inputs.outputs["logits"],
            inputs.outputs["penultimate"],
            snapshot.outputs(env.forward, snap, images)["penultimate"],
            inputs.batch["label"],
            inputs.params["head"],
            snap.params["head"]["kernel"],
            inputs.class_mask,
            old,
            b,
        )
        value = terms["local"] + terms["head"] + kd_weight * terms["kd"]
        # Before any old class exists this is the plain CE over the batch (ABD's first task).
        total = jnp.where(snap.active > 0, value, inputs.task_loss)
        return total, {f"abd_{k}": v for k, v in terms.items()}

    def loss(inputs: base.LossInputs, state: DIState, key):
        del key
        snap = state.snap
        total, logs = abd(inputs, snap) if use_abd else (0.0, {})
        if mse_weight == 0.0:
            return total, logs
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
        return total + value, {**logs, "di_logit_mse": value}

    # One program: run eagerly, the forward compiled one small program per op.
    @jax.jit
    def dense_labels(snap, images):
        """The frozen model's labels of its own dreams, ``uint8 [N,H,W]``."""
        logits = snapshot.outputs(env.forward, snap, images)["logits"]
        logits = losses.mask_logits(logits, snap.class_mask)
        return jnp.argmax(logits, axis=-1).astype(jnp.uint8)

    def after_phase(params, batch_stats, state: DIState, phase: base.Phase) -> DIState:
        snap = snapshot.take(params, batch_stats, phase.class_mask)
        if phase.index + 1 >= env.num_experiences:
            return DIState(snap, state.memory)  # no phase follows: nothing would replay them
        classes = tuple(c for c in phase.seen_classes if not (dense and c == 0))
        wanted = spread(classes, size)
        hw = tuple(env.image_shape[:2])
        targets = square_targets(wanted, hw) if dense else wanted
        key = jax.random.fold_in(jax.random.key(env.seed), phase.index)
        logging.info(
            "deepinversion: inverting %d images of classes %s after phase %d (%d iterations)",
            size,
            classes,
            phase.index,
            synth_cfg.iterations,
        )
        images, info = di.synthesize(
            teacher,
            (params, batch_stats),
            jnp.asarray(targets),
            key,
            synth_cfg,
            image_shape=tuple(env.image_shape),
            class_mask=jnp.asarray(phase.class_mask),
            should_stop=env.stop,
        )
        logging.info(
            "deepinversion: %d images of classes %s after phase %d; the model's accuracy on "
            "them %.3f (CE %.3f, BN-statistics gap %.3f)",
            size,
            classes,
            phase.index,
            float(info["final_accuracy"]),
            float(info["final_main"]),
            float(info["final_bn"]),
        )
        if dense:
            labels = dense_labels(snap, images)
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
        return DIState(snap, base.place_like(memory, state.memory))

    return base.Strategy(
        init=init,
        prepare_batch=prepare_batch,
        loss=loss,
        after_phase=after_phase,
        replaces_task_loss=use_abd,
    )
