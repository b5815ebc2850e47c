"""RECALL: replay of past classes from an external image source (Maracani et al., ICCV 2021).

No training image of a past step is kept. Before each phase after the first, ``before_phase``
fills a fixed-size memory with ``recall_per_class`` images of every past class taken from a
``data.replay_sources`` source (a folder per class, e.g. web-crawled images, or a user callable,
e.g. a GAN sampler). Inside the compiled step (``prepare_batch``), with the frozen model of the
previous phase (``snapshot``: eval mode, no BatchNorm update, no gradient):

- every step adds ``recall_replay_batch`` rows drawn from the memory to the new batch;
- replay labels: an image drawn for class ``c`` is labelled ``c`` where the old model scores
  ``c`` above background and ``0`` elsewhere (the prediction restricted to ``{0, c}``, the
  paper's per-class labelling; the official helper decoders take the argmax over their own
  step's classes, the same rule when a step adds one class; ties go to background);
- label mixing ("background inpainting"): in the new rows, pixels labelled background (0) take
  the old model's prediction, the argmax over the classes it knew (background included); other
  labels and 255 stay.

The task loss is then the usual cross-entropy over new and replay rows (RECALL adds no loss).
The paper can label replay images with per-step helper decoders instead of the old model; that
is the ``labeler`` hook (``recall_labeler = "callable:<module:function>"``, run on the host when
the memory is filled, ``fn(images uint8 [n,H,W,3], class_id) -> labels uint8 [n,H,W]``). The
default is the old model. RECALL labels its replay set once, offline, before the step; labelling
each drawn row inside the step with the frozen model gives the same labels (the model does not
change during the phase) without storing an ``[M,H,W]`` label map per row.

Defaults and where they come from:
- ``recall_per_class = 500``: the paper's replay set size per class; the official code
  (lttm/RECALL, ``gan/generate_gan.py``) samples 100 batches of 5 per class from BigGAN; its
  Flickr script downloads up to 1000 per class.
- ``recall_replay_batch = 0`` = as many replay rows as new rows: the official configs interleave
  replay and new images 1:1 (``interleave_ratio_old = interleave_ratio_new = 4``).
- ``recall_mix_labels = True``: the official overlapped/disjoint configs (``mix_labels = True``);
  the official code never mixes in the sequential setting, where old classes keep their labels
  (set it False there, and for domain-incremental streams).
- ``recall_mem_size = 0`` = ``recall_per_class * (num_classes - 1)`` rows, room for every class
  but background; set it to ``recall_per_class * (most past classes)`` to save device memory
  (uint8 images: VOC at 512 px with 500 per class and 15 past classes is 5.9 GB).

Differences from the official code: it maps ignore (255) pixels to background before mixing,
so they get the old prediction too, whereas here they stay ignored; its incremental steps train
the decoder only (frozen encoder), which is not reproduced here (an optimizer matter, not the
strategy's); its replay labels come from the step-0 model or the helper of the class's step,
ours from the model of the previous phase (which knows every past class); it augments replay
images like new ones (random scale, crop, flip), here they are replayed as stored.

State: ``RecallState(snap, memory)``: the frozen previous model (inactive during the first phase,
so nothing is mixed or replayed then) and a ``memory.buffer.Buffer`` whose ``label`` holds the
class id of each row (``[M]``) with the old-model labeler, or a pixel label (``[M,H,W]``) with an
external one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from clseg_jax import losses
from clseg_jax.data import replay_sources
from clseg_jax.memory import buffer
from clseg_jax.strategies import base, snapshot

PyTree = Any
# labeler(images uint8 [n,H,W,3], class_id) -> labels uint8 [n,H,W] (0, class_id or 255)
Labeler = Callable[[np.ndarray, int], np.ndarray]

DEFAULTS = {
    "recall_source": "",  # "folder:<path>" or "callable:<module:function>"; required
    "recall_per_class": 500,
    "recall_replay_batch": 0,  # 0 = as many as the new batch
    "recall_mix_labels": True,
    "recall_labeler": "old_model",  # or "callable:<module:function>"
    "recall_mem_size": 0,  # 0 = recall_per_class * (num_classes - 1)
}

# What each field of DEFAULTS sets (the hyperparameter table of docs/strategies.md).
HELP = {
    "recall_source": (
        "required: `folder:<dir>` (a sub-folder per class, e.g. web-crawled) or "
        "`callable:<module:function>` (e.g. a GAN sampler)"
    ),
    "recall_per_class": "replay images per past class (the paper's replay set size)",
    "recall_replay_batch": (
        "replay rows per step; 0 = as many as the new batch (the official 1:1 interleave)"
    ),
    "recall_mix_labels": (
        "label mixing: new images' background takes the old model's prediction (False for the "
        "sequential setting and domain-incremental streams)"
    ),
    "recall_labeler": (
        "who labels replay images: `old_model`, or `callable:<module:function>` (the paper's "
        "helper decoders)"
    ),
    "recall_mem_size": "memory rows; 0 = `recall_per_class * (num_classes - 1)`",
}
OLD_MODEL = "old_model"
_SALT = 0x7EC  # separates the replay draws from other seeded host randomness


class RecallState(NamedTuple):
    snap: snapshot.Snapshot
    memory: buffer.Buffer


def replay_labels(old_logits: jax.Array, class_ids: jax.Array) -> jax.Array:
    """Pixel labels of replay rows: ``c`` where ``z_c > z_0`` else 0 (ties to background).

    Args:
      old_logits: ``[n,H,W,K]`` the old model's logits.
      class_ids: int ``[n]``, the class each row was drawn for.

    Returns: int32 ``[n,H,W]``.
    """
    c = class_ids.astype(jnp.int32)[:, None, None]
    z_c = jnp.take_along_axis(old_logits, c[..., None], axis=-1)[..., 0]
    return jnp.where(z_c > old_logits[..., 0], c, 0)


def mix_labels(labels: jax.Array, old_logits: jax.Array, old_mask: jax.Array) -> jax.Array:
    """Background inpainting: label-0 pixels take the old model's argmax over ``old_mask``.

    Args:
      labels: ``[B,H,W]`` int, 0 = background, 255 = ignore.
      old_logits: ``[B,H,W,K]``.
      old_mask: bool ``[K]``, the classes the old model knew (background included).

    Returns: ``labels`` with background pixels replaced, same dtype.
    """
    old_pred = jnp.argmax(losses.mask_logits(old_logits, old_mask), axis=-1)
    return jnp.where(labels == 0, old_pred.astype(labels.dtype), labels)


def _labeler_from(cfg: ml_collections.ConfigDict, labeler: Labeler | None) -> Labeler | None:
    spec = str(cfg.recall_labeler)
    if labeler is not None or spec == OLD_MODEL:
        return labeler
    kind, _, path = spec.partition(":")
    if kind != "callable" or not path:
        raise ValueError(
            f"recall_labeler must be {OLD_MODEL!r} or 'callable:<module:function>', got {spec!r}"
        )
    return replay_sources.load_callable(path)


def make(
    cfg: ml_collections.ConfigDict,
    env: base.Env,
    *,
    source: replay_sources.ReplaySource | None = None,
    labeler: Labeler | None = None,
) -> base.Strategy:
    """RECALL; a ``source`` or ``labeler`` given here overrides ``recall_source`` or
    ``recall_labeler``."""
    if env.task.name != "segmentation":
        raise ValueError(f"recall needs a segmentation stream, got a {env.task.name} one")
    size = tuple(env.image_shape[:2])
    if source is None:
        if not cfg.recall_source:
            raise ValueError(
                "recall: set config.strategy.recall_source to 'folder:<path>' or "
                "'callable:<module:function>' (where replay images of past classes come from)"
            )
        names = getattr(env, "class_names", None)
        source = replay_sources.from_spec(str(cfg.recall_source), size, names)
    labeler = _labeler_from(cfg, labeler)
    stored = labeler is not None  # pixel labels made on the host and kept in the memory
    per_class, n_replay = int(cfg.recall_per_class), int(cfg.recall_replay_batch)
    capacity = int(cfg.recall_mem_size) or per_class * (env.num_classes - 1)
    mix = bool(cfg.recall_mix_labels)
    if per_class < 1 or n_replay < 0 or capacity < per_class:
        raise ValueError(
            f"recall: need recall_per_class >= 1, recall_replay_batch >= 0 and recall_mem_size "
            f">= recall_per_class, got {per_class}, {n_replay}, {capacity}"
        )
    if isinstance(source, replay_sources.FolderSource):
        missing = source.missing(range(1, env.num_classes))
        if missing:
            # Classes of the last step never become past classes and need no folder.
            logging.warning("recall: no replay folder for classes %s in %s", missing, source.root)
    label_shape = tuple(env.label_shape) if stored else ()

    def init(params: PyTree, batch_stats: PyTree) -> RecallState:
        snap = snapshot.empty(params, batch_stats, env.num_classes)
        return RecallState(snap, buffer.empty(capacity, env.image_shape, label_shape))

    def before_phase(
        params: PyTree, batch_stats: PyTree, state: RecallState, phase: base.Phase
    ) -> tuple[PyTree, RecallState]:
        del batch_stats
        past = sorted(set(phase.seen_classes) - set(phase.new_classes) - {0})
        if not past:
            return params, state
        need = per_class * len(past)
        if need > capacity:
            raise ValueError(
                f"recall: {len(past)} past classes x {per_class} images = {need} rows exceed "
                f"recall_mem_size = {capacity}"
            )
        host = {
            "image": np.zeros((capacity, *env.image_shape), np.uint8),
            "label": np.full((capacity, *label_shape), losses.IGNORE, np.uint8),
            "exp": np.full(capacity, -1, np.int32),
            "rank": np.zeros(capacity, np.int32),
            "valid": np.arange(capacity) < need,
            "seen": np.asarray(need, np.int32),
        }
        for i, c in enumerate(past):
            rows = slice(i * per_class, (i + 1) * per_class)
            # Seeded by class only: a class gets the same images in every phase, as RECALL's
            # replay set is made once.
            images = source.images(c, per_class, np.random.default_rng([env.seed, _SALT, c]))
            host["image"][rows] = images
            if stored:
                labels = np.asarray(labeler(images, c))
                if labels.shape != (per_class, *label_shape):
                    raise ValueError(
                        f"recall labeler: class {c} must give [{per_class}, *{label_shape}] "
                        f"labels, got {list(labels.shape)}"
                    )
                host["label"][rows] = labels
            else:
                host["label"][rows] = c
            host["exp"][rows] = phase.index
            host["rank"][rows] = np.arange(per_class)
        # device_put, not jnp.asarray: the latter compiles a staging program per new shape.
        return params, state._replace(memory=buffer.Buffer(**jax.device_put(host), extra={}))

    def prepare_batch(batch: base.Batch, state: RecallState, key: jax.Array) -> base.Batch:
        snap, memory = state
        b = batch["image"].shape[0]
        rows, ok = buffer.sample(memory, key, n_replay or b)
        if stored:
            out = buffer.append_replay(batch, rows, ok)
            if not mix:
                return out
            old = snapshot.outputs(env.forward, snap, out["image"][:b])["logits"]
            new_labels, replay = out["label"][:b], out["label"][b:]
        else:
            ok = ok & (snap.active > 0)  # an untrained snapshot labels nothing
            blank = jnp.zeros((ok.shape[0], *batch["label"].shape[1:]), batch["label"].dtype)
            out = buffer.append_replay(batch, {"image": rows["image"], "label": blank}, ok)
            # One old-model pass over the rows that need it: all of them when mixing.
            first = 0 if mix else b
            old = snapshot.outputs(env.forward, snap, out["image"][first:])["logits"]
            new_labels = out["label"][:b]
            replay = replay_labels(old[b - first :], rows["label"])
            replay = buffer.ignore_labels(replay.astype(new_labels.dtype), ok)
        if mix:
            mixed = mix_labels(new_labels, old[:b], snap.class_mask)
            new_labels = jnp.where(snap.active > 0, mixed, new_labels)
        return {**out, "label": jnp.concatenate([new_labels, replay])}

    def after_phase(
        params: PyTree, batch_stats: PyTree, state: RecallState, phase: base.Phase
    ) -> RecallState:
        return state._replace(snap=snapshot.take(params, batch_stats, phase.class_mask))

    return base.Strategy(
        init=init, before_phase=before_phase, prepare_batch=prepare_batch, after_phase=after_phase
    )
