"""PLOP (Douillard, Chen, Dapogny & Cord, CVPR 2021, "PLOP: Learning without Forgetting for
Continual Semantic Segmentation"; official code arthurdouillard/CVPR2021_PLOP).

From the second phase on, the objective is a rescaled cross-entropy on pseudo-labelled targets
plus Local POD distillation against the frozen model of the previous phase (``snapshot``)::

    loss = (1 - active) * task CE + active * (CE_pseudo + sqrt(|seen| / |new|) * L_POD)

so the first phase is the plain task CE, without a Python branch.

Local POD. Each map ``x [B,h,w,C]`` of ``outputs["pod"]`` (backbone stages, then the decoder
output), and the small logits ``head(penultimate)`` as a last map, is squared (the code's
``pod_prepro="pow"``), cut into ``s x s`` regions for ``s`` in ``plop_pod_scales`` (1, 2, 4), and
each region is averaged along the width (one value per row and channel) and along the height
(one per column and channel); these are concatenated (``pod_embedding``). A layer's distance is
the L2 (Frobenius) norm of the old minus the new embedding, averaged over the batch; the loss is
``sum_l factor_l * distance_l / L`` over the L maps. As in the code there is no normalisation
(``features_distillation`` forces ``normalize=False`` and PLOP leaves ``normalize_per_scale``
off): plain means. Regions are ``h // s`` by ``w // s`` (the code uses ``w // s`` for both, the
same for its square crops); the remainder rows/columns are dropped as in the code, and a scale
whose regions would be empty (a map smaller than ``s``) is skipped (the code would give NaN). For
the logits the new model's channels are folded as the code's ``extra_channels="sum"``: background
gets the sum of the new classes' logits, and only the old model's classes are compared. Defaults
from the official ``--method PLOP``: factor 0.01 for every feature map (the decoder output too),
0.0005 for the logits (``pod_options.switch.after.factor``), and the schedule
``sqrt(|classes seen| / |new classes|)`` (background counted, as the code's
``nb_current_classes``; ``use_pod_schedule`` on). The gradient of the norm at 0 is taken as 0
(torch's subgradient), so identical old and new maps give a finite gradient.

Pseudo-labels. A pixel labelled background (0) takes the old model's argmax class (background
included) when the old model is confident: its entropy ``u`` is below the threshold of that class,
else it is ignored (255). The code's ``mask_background`` is ``label < #old classes``: the same
pixels in the overlapped and disjoint settings, where old classes are labelled 0; in the sequential
setting we keep the ground truth of labelled old classes. ``u`` is on the code's scale::

    u = -sum_c p_c log p_c / (n_old * log(n_old) * log(n_cur))

(its ``entropy()`` is a *mean* over the ``n_old`` old-model channels divided by ``log n_old``, then
divided by ``log`` of the number of classes seen now): we keep it because the 0.001 threshold is
defined on it (about half of the [0, 1]-normalised entropy ``H / log n_old`` on ADE 100-50, about
0.05 on VOC 15-1). Thresholds: per class, the median ``u`` of the pixels labelled 0 that the old
model predicts as that class, over the phase's training data, computed in ``before_phase``; then
``max(median, plop_threshold)``: 0.001 is a *floor* (the code's ``entropy`` mode takes ``max``),
and a class the old model never predicts gets the floor. The median comes from a per-class
histogram of ``H / log(n_old)`` (in [0, 1], ``plop_entropy_bins`` bins) with linear interpolation
inside the median's bin: at most one bin off for odd counts. (The code uses 100 bins over [0, 1] of
``u`` itself, whose values stay below ``1 / (n_old log n_cur)``, so only the first few bins fill,
and its running sum adds bin indices instead of counts; we compute the median the paper
describes.) The first phase runs the pass on one batch and discards it, so that it compiles then
and no later phase compiles.

CE rescaling (``classif_adaptive_factor``): per image, ``nu = #(background pixels given a
pseudo-label) / #(background pixels)`` (1 for an image without background; the code divides by 0)
and ``CE_pseudo = mean_b nu_b / (h w) sum_{pixels not ignored} -log p(target)``: ignored pixels
count in the mean as zeros, as the code's per-pixel loss followed by ``.mean()``. No minimum factor
(the code's ``classif_adaptive_min_factor = 0``).

As the official ``--method PLOP`` (``init_balanced``), each phase after the first initialises the
new classes' classifier from the background's (``mib.init_classifier``; ``plop_init``).

State (``State``): the snapshot, ``thresholds float32 [K]``, ``entropy_scale float32 []`` (the
``1 / (n_old log n_old log n_cur)`` above) and ``pod_scale float32 []``, all fixed shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from clseg_jax import losses, rows
from clseg_jax.models import layers
from clseg_jax.strategies import base, importance, mib, snapshot

PyTree = Any

DEFAULTS = {
    "plop_pod_factor": 0.01,  # official --method PLOP: pod_factor
    "plop_pod_logits_factor": 0.0005,  # official pod_options switch.after.factor
    "plop_pod_logits": True,  # official pod_logits: the small logits are the last POD map
    "plop_pod_scales": (1, 2, 4),  # official spp_scales
    "plop_threshold": 0.001,  # official threshold: floor of the entropy thresholds
    "plop_entropy_bins": 1000,  # histogram resolution of the median (official: 100, see above)
    "plop_batch": 16,  # images per old-model forward in the threshold pass
    "plop_init": True,  # official --method PLOP: init_balanced (MiB's head initialisation)
}

# What each field of DEFAULTS sets (the hyperparameter table of docs/strategies.md).
HELP = {
    "plop_pod_factor": (
        "Local POD factor on the model's `pod` maps (official `pod_factor`; "
        "`configs/ade_ci.py`: 0.001)"
    ),
    "plop_pod_logits_factor": (
        "Local POD factor on the logits (official `pod_options.switch.after.factor`; "
        "`configs/ade_ci.py`: 0.00001)"
    ),
    "plop_pod_logits": (
        "the small logits `head(penultimate)` are the last POD map (official `pod_logits`)"
    ),
    "plop_pod_scales": (
        "Local POD strips: width/height pooling over 1, 1/2, 1/4 of the map (official `spp_scales`)"
    ),
    "plop_threshold": (
        "floor of the per-class entropy thresholds for pseudo-labels (official `threshold`)"
    ),
    "plop_entropy_bins": "histogram resolution of the per-class median entropy (official: 100)",
    "plop_batch": "images per old-model forward in the threshold pass",
    "plop_init": "MiB's head initialisation for new classes (official `init_balanced`)",
}


class State(NamedTuple):
    snap: snapshot.Snapshot
    thresholds: jax.Array  # float32 [K]: per-class entropy thresholds (code's scale)
    entropy_scale: jax.Array  # float32 []: u = H * entropy_scale
    pod_scale: jax.Array  # float32 []: sqrt(|seen| / |new|)


def pod_embedding(x: jax.Array, scales: Sequence[int]) -> jax.Array:
    """Local POD embedding of ``x [B,h,w,C]`` -> ``[B,D]`` (squared, then pooled; see above).

    Order (that of the code): per scale, per region in row-major order, the width-pooled values
    ``[C, rows]`` then the height-pooled values ``[C, columns]``.
    """
    x = jnp.square(x.astype(jnp.float32))
    b, h, w, c = x.shape
    parts = []
    for s in scales:
        kh, kw = h // s, w // s
        if kh == 0 or kw == 0:
            continue
        r = x[:, : s * kh, : s * kw].reshape(b, s, kh, s, kw, c)
        by_row = r.mean(axis=4).transpose(0, 1, 3, 4, 2).reshape(b, s, s, c * kh)
        by_col = r.mean(axis=2).transpose(0, 1, 2, 4, 3).reshape(b, s, s, c * kw)
        parts.append(jnp.concatenate([by_row, by_col], axis=-1).reshape(b, -1))
    return jnp.concatenate(parts, axis=-1)


def _norm(d: jax.Array) -> jax.Array:
    """L2 norm over the last axis with gradient 0 at 0 (a bare sqrt's would be NaN)."""
    sq = jnp.sum(jnp.square(d), axis=-1)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def pod_loss(
    old_maps: Sequence[jax.Array],
    new_maps: Sequence[jax.Array],
    factors: Sequence[float],
    scales: Sequence[int],
) -> jax.Array:
    """``sum_l factor_l * mean_b ||emb(old_l) - emb(new_l)||_2 / L``; a scalar."""
    total = 0.0
    for old, new, f in zip(old_maps, new_maps, factors, strict=True):
        d = pod_embedding(old, scales) - pod_embedding(new, scales)
        total = total + f * jnp.mean(_norm(d))
    return total / len(old_maps)


def head_logits(head: PyTree, penultimate: jax.Array, impl: str = "xla") -> jax.Array:
    """The classifier on ``penultimate [B,h,w,C']`` before any upsampling: ``[B,h,w,K]``."""
    kernel = head["kernel"].astype(jnp.float32)
    out = layers.conv2d(penultimate.astype(jnp.float32), kernel, impl=impl)
    return out + head["bias"].astype(jnp.float32) if head.get("bias") is not None else out


def fold_new_into_background(
    logits: jax.Array, old_mask: jax.Array, new_mask: jax.Array
) -> jax.Array:
    """Background (channel 0) += the new classes' logits; channels outside ``old_mask`` -> 0."""
    extra = jnp.sum(jnp.where(new_mask, logits, 0.0), axis=-1)
    logits = logits.at[..., 0].add(extra)
    return jnp.where(old_mask, logits, 0.0)


def entropy(probs: jax.Array) -> jax.Array:
    """``-sum_c p_c log p_c`` over the last axis (0 log 0 = 0)."""
    return jnp.sum(jax.scipy.special.entr(probs), axis=-1)


def pseudo_label(
    old_logits: jax.Array, labels: jax.Array, thresholds: jax.Array, entropy_scale: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Targets ``[B,H,W]`` int32 and the per-image CE factor ``nu [B]`` (see the module docstring).

    ``old_logits [B,H,W,K]`` must already be masked to the old model's classes.
    """
    probs = jax.nn.softmax(old_logits.astype(jnp.float32), axis=-1)
    pred = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    confident = entropy(probs) * entropy_scale < thresholds[pred]
    labels = labels.astype(jnp.int32)
    background = labels == 0
    targets = jnp.where(background, jnp.where(confident, pred, losses.IGNORE), labels)
    kept = jnp.sum(background & confident, axis=(1, 2))
    total = jnp.sum(background, axis=(1, 2))
    nu = jnp.where(total > 0, kept / jnp.maximum(total, 1), 1.0)
    return targets, nu.astype(jnp.float32)


def rescaled_cross_entropy(logits: jax.Array, targets: jax.Array, nu: jax.Array) -> jax.Array:
    """``mean_b nu_b * sum_{valid pixels} -log p(target) / (H W)``: ignored pixels count as 0."""
    num_classes = logits.shape[-1]
    valid = (targets != losses.IGNORE) & (targets < num_classes)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    per_image = jnp.mean(jnp.where(valid, nll, 0.0), axis=(1, 2))
    return jnp.mean(nu * per_image)


def histogram_median(hist: np.ndarray) -> np.ndarray:
    """Per-row median of values in [0, 1] from counts ``[K, bins]``; 0 for empty rows."""
    hist = np.asarray(hist, np.float64)
    bins = hist.shape[1]
    total = hist.sum(axis=1)
    cum = np.cumsum(hist, axis=1)
    half = total / 2
    j = np.argmax(cum >= half[:, None], axis=1)  # first bin reaching half the count
    at = np.arange(len(hist)), j
    below = cum[at] - hist[at]
    inside = (half - below) / np.maximum(hist[at], 1.0)
    return np.where(total > 0, (j + inside) / bins, 0.0)


def make(cfg: ml_collections.ConfigDict, env: base.Env) -> base.Strategy:
    get = lambda key: cfg.get(key, DEFAULTS[key])
    pod_factor, logits_factor = (
        base.hparam(get("plop_pod_factor")),
        base.hparam(get("plop_pod_logits_factor")),
    )
    use_logits, scales = bool(get("plop_pod_logits")), tuple(int(s) for s in get("plop_pod_scales"))
    floor, bins = base.hparam(get("plop_threshold")), int(get("plop_entropy_bins"))
    batch_size, do_init = int(get("plop_batch")), bool(get("plop_init"))
    k = env.num_classes
    if env.task.name != "segmentation":
        raise ValueError(
            f"plop pseudo-labels background pixels and distils pod maps: segmentation only, "
            f"not {env.task.name}"
        )

    def init(params: PyTree, batch_stats: PyTree) -> State:
        # Distinct buffers: the step donates its state, and one buffer must not be donated twice.
        zero = lambda: jnp.zeros((), jnp.float32)
        snap = snapshot.empty(params, batch_stats, k)
        return State(snap, jnp.zeros(k, jnp.float32), zero(), zero())

    def histogram(params, batch_stats, old_mask, log_n_old, images, labels):
        """``[K, bins]``: (old prediction, bin of H / log n_old) of the pixels labelled 0."""
        out, _ = env.forward(params, batch_stats, images, False)
        probs = jax.nn.softmax(losses.mask_logits(out["logits"], old_mask), axis=-1)
        pred = jnp.argmax(probs, axis=-1)
        b = jnp.clip(jnp.floor(entropy(probs) / log_n_old * bins), 0, bins - 1).astype(jnp.int32)
        hist = jnp.zeros((k, bins), jnp.int32)
        return hist.at[pred.ravel(), b.ravel()].add((labels == 0).astype(jnp.int32).ravel())

    add_histogram = rows.Sum(histogram, whole=4)

    def before_phase(params, batch_stats, state: State, phase: base.Phase):
        del batch_stats
        active = float(state.snap.active) > 0.0
        # The mask as numpy: a fresh snapshot's mask is not yet on the state's devices, and a
        # different input sharding would recompile the pass.
        old_mask = np.asarray(state.snap.class_mask)
        n_old, n_cur = int(old_mask.sum()), int(np.sum(phase.class_mask))
        n_new = len(phase.new_classes)
        log_old = np.float32(math.log(max(n_old, 2)))
        # Placed as the state is: the threshold pass then compiles once for the stream.
        hist = base.place_like(np.zeros((k, bins), np.int32), state.thresholds, cast=False)
        # Padding rows are all 255, so they add nothing; every batch has one shape (one compile).
        snap = state.snap
        mesh = rows.mesh_for(snap.params, batch_size)
        for batch, _ in importance.padded_batches(phase, batch_size, np.iinfo(np.int64).max):
            images, labels = rows.feed(batch["image"], mesh), rows.feed(batch["label"], mesh)
            hist = add_histogram(
                hist, snap.params, snap.batch_stats, old_mask, log_old, images, labels, mesh=mesh
            )
            if not active:
                break  # first phase (plain CE): one batch, only so that no later phase compiles
        if not active:
            return params, state
        new = np.zeros(k, bool)
        new[list(phase.new_classes)] = True
        if do_init and new.any():
            params = {**params, "head": mib.init_classifier(params["head"], new)}
        scale = 1.0 / (n_old * log_old * math.log(n_cur)) if min(n_old, n_cur) >= 2 else 0.0
        thresholds = np.maximum(histogram_median(np.asarray(hist)) * log_old * scale, floor)
        # The automatic setting a reader of a stalled run needs (issue 16): which thresholds
        # the paper's median rule gave on this model, and how many sat at the floor.
        olds = np.flatnonzero(old_mask)
        logging.info(
            "plop: pseudo-label entropy thresholds of old classes %s: %s (floor "
            "plop_threshold=%g; %d of %d at the floor)",
            olds.tolist(),
            np.round(thresholds[olds], 4).tolist(),
            floor,
            int(np.sum(thresholds[olds] <= floor)),
            olds.size,
        )
        pod_scale = math.sqrt(n_cur / n_new) if n_new else 1.0
        new = {"thresholds": thresholds, "entropy_scale": scale, "pod_scale": pod_scale}
        return params, state._replace(**base.place_like(new, {f: getattr(state, f) for f in new}))

    def loss(
        inputs: base.LossInputs, state: State, key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        del key
        snap = state.snap
        old = snapshot.outputs(env.forward, snap, inputs.batch["image"])
        old_logits = losses.mask_logits(old["logits"], snap.class_mask)
        targets, nu = pseudo_label(
            old_logits, inputs.batch["label"], state.thresholds, state.entropy_scale
        )
        ce = rescaled_cross_entropy(inputs.outputs["logits"], targets, nu)
        old_maps, new_maps = list(old["pod"]), list(inputs.outputs["pod"])
        factors = [pod_factor] * len(old_maps)
        if use_logits:
            new_mask = inputs.class_mask & ~snap.class_mask
            old_small = head_logits(snap.params["head"], old["penultimate"], env.conv_impl)
            new_small = head_logits(
                inputs.params["head"], inputs.outputs["penultimate"], env.conv_impl
            )
            old_maps.append(jnp.where(snap.class_mask, old_small, 0.0))
            new_maps.append(fold_new_into_background(new_small, snap.class_mask, new_mask))
            factors.append(logits_factor)
        pod = state.pod_scale * pod_loss(old_maps, new_maps, factors, scales)
        value = (1.0 - snap.active) * inputs.task_loss + snap.active * (ce + pod)
        return value, {"plop_ce": snap.active * ce, "plop_pod": snap.active * pod}

    def after_phase(params, batch_stats, state: State, phase: base.Phase) -> State:
        return state._replace(snap=snapshot.take(params, batch_stats, phase.class_mask))

    return base.Strategy(
        init=init,
        before_phase=before_phase,
        loss=loss,
        after_phase=after_phase,
        replaces_task_loss=True,
    )
