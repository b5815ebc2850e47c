"""CCSI: Continual Class-Specific Impression (Ayromlou, Tsang, Abolmaesumi & Li, "Class Impression
for Data-Free Incremental Learning", MICCAI 2022, extended as arXiv 2406.05631; official code
sanaAyrml/Class-Impresion-for-Data-free-Incremental-Learning): data-free class-incremental
classification. No real image of a past class is kept; old classes are replayed as synthetic
"class impressions" inverted from the previous model, and the model update replaces the task loss::

    loss = CN-CE + kd_weight * L_dis + margin_weight * L_MR + idc_weight * L_IdC

- CN-CE (``cn_cross_entropy``): softmax cross-entropy of the cosine classifier's logits
  ``sigma * cos(w_k, f)`` (``models.cosine``: build the model with ``head="cosine"``; with a linear
  head the step's logits give a plain CE, and ``init`` warns), weighted per class
  by ``max_c n_c / n_k`` over the phase's real rows plus the stored synthetic ones (the code's
  ``compute_class_weights``; ``ccsi_class_weights``).
- L_dis (``feature_distillation``): ``1 - cos(f, f_old)`` between the current and the frozen
  previous model's penultimate features, on every labelled row (LUCIR's less-forget constraint),
  weighted by ``lambda * sqrt(n_old / n_new)`` (``adaptive_weight``; n = class counts).
- L_MR (``margin_ranking_loss``): on rows of old classes, ``max(0, m - cos_y + cos_k)`` for the
  top-K new-class cosine scores ``cos_k`` (unscaled), averaged over rows x K.
- L_IdC (``idc_loss``): the intra-domain contrastive loss (the issue's "conservative"). Class
  centroids of the unscaled cosine score vectors of the labelled rows (source: real new rows and
  synthetic old rows, true labels) and of the current experience's real training rows (target,
  pseudo-labelled by the model's argmax over the seen classes) are L2-normalised, and
  ``-log sum_k e^{<t_k, s_k>/T} + log sum_{k,k'} e^{<t_k, s_k'>/T}`` over the seen classes pulls
  each target centroid to its source centroid.
- Weight imprinting (``imprint``, before every phase with old and new classes): a new class's
  weight is the normalised mean of its training images' normalised eval-mode features, scaled
  to the old classes' mean weight norm (LUCIR, as the CCSI code).
- Old classes' weights are frozen in later phases (``ccsi_freeze_old``; the code trains them at
  learning rate 0). Here their gradient is zeroed: an optimizer with momentum or Adam moments
  carried over from the previous phase can still move them (``optimizer.reset_per_phase``).
- Replay: after each phase but the last, ``synthesize`` (a callable, e.g. the class-impression
  synthesis of ``clseg_jax.synthesis.impressions``) makes images of *every* class seen so far from
  the model just trained; they replace the memory (as the code regenerates its proto-set each
  phase) and ``prepare_batch`` appends ``n`` of them to every batch, with a row flag
  ``batch["synthetic"]`` (bool ``[B+n]``) that tells the IdC loss which rows are real.

Contract of the callable (``ccsi_synthesize = "callable:<module:function>"`` or ``make(...,
synthesize=fn)``)::

    synthesize(params, batch_stats, classes int32 [S], key, *, means, n) -> (images, labels)

``means`` float32 ``[K,H,W,3]``: per-class mean training images in the model's [-1, 1] input space
(zeros where a class has none), the start of class impressions; ``n``: rows wanted (the memory
size). ``images``: ``[N<=n,H,W,3]``, uint8, or float in [-1, 1] (stored quantised to uint8, as
saving them as images would); ``labels``: ``[N]`` class ids. ``noise_synthesize`` is a stand-in.

The mean images are the only real-derived data in the state; a class with fewer than 2 training
images gets none (its mean would be that image).

Defaults and where they come from (paper = arXiv 2406.05631; code = the official repository's
``main.py`` arguments and its MedMNIST sweep configs, identical across BloodMNIST, PathMNIST,
OrganAMNIST and TissueMNIST unless noted):
- ``ccsi_lambda = 5``, ``ccsi_adaptive_lambda = True``: the code's ``--lamda`` default (no config
  overrides it) and ``adapt_lamda``; the paper's ``lambda * sqrt(|C_old| / |C_new|)``.
- ``ccsi_margin = 0.3``, ``ccsi_top_k = 1``: the configs' ``dist`` and ``K`` (``main.py`` defaults
  0.5 and 1; LUCIR used 0.5 and 2); ``ccsi_margin_weight = 1``: ``alpha_3 * lw_mr``.
- ``ccsi_idc_weight = 1``: ``da_coef``; ``ccsi_idc_temperature = 1``: BloodMNIST and PathMNIST
  (OrganAMNIST and TissueMNIST use 5, the ``main.py`` default).
- ``ccsi_mem_size = 640``: BloodMNIST's ``nb_generation = 16`` batches of ``bs = 40``.
- ``ccsi_replay_fraction = 0.66``: the code's ``rs_ratio``, the expected share of synthetic rows in
  a batch; ``ccsi_replay_batch = 0`` derives the replayed rows per step from it
  (``round(B * f / (1 - f))``, 2B for f = 0.66), a positive value fixes it.
- ``ccsi_imprint``, ``ccsi_freeze_old``, ``ccsi_class_weights``: True, as ``imprint_weights``,
  ``less_forget`` and the weighted CE of every config.

Where this differs from the code, and why:
- Continual Normalization: the paper's model normalises with CN (group norm without affine, then
  batch norm); the public code has a ``continual_norm`` flag but no CN layer. Use
  ``norm="continual"`` in the model (``models.layers.ContinualNorm``), as the paper.
- IdC target rows: the code pseudo-labels a batch of the *test* set of all seen classes; here the
  target is the current experience's *training* rows (the new rows of the step's batch), as the
  issue requires, so no evaluation image ever shapes the model.
- IdC centroids: the code keeps them as moving averages within an epoch (``c = (1 - rho) *
  detach(c) + rho * batch``, rho = 0.9 or 0.99, reset every epoch); the step cannot carry state
  out of the loss, so each step uses its batch's centroids, which is what the code does on the
  first batch of every epoch (after normalisation ``rho * batch`` is the batch's direction).
  ``idc_loss`` takes the previous centroids and rho for that use.
- The previous model is the snapshot taken after every phase (the code, with ``continual_norm``,
  skips refreshing its reference model, which we take to be an oversight).

State (``CCSIState``, fixed shapes): the frozen previous model (``snapshot``, inactive during the
first phase, which makes every term but the CE exactly 0 there), the synthetic memory
(``memory.buffer.Buffer``, uint8), the mean images ``[K,H,W,3]`` and their mask, the old/new class
masks, the class weights ``[K]`` and the distillation weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from clseg_jax import losses
from clseg_jax.data import replay_sources
from clseg_jax.memory import buffer, update
from clseg_jax.models import cosine
from clseg_jax.strategies import base, snapshot
from clseg_jax.synthesis import impressions

PyTree = Any
# synthesize(params, batch_stats, classes [S], key, *, means [K,H,W,3], n) -> (images, labels)
Synthesize = Callable[..., tuple[Any, Any]]

DEFAULTS = {
    # "" = class impressions (synthesis/impressions.py, CCSI's synthesis settings) of this model;
    # or "callable:<module:function>".
    "ccsi_synthesize": "",
    "ccsi_iterations": 5000,  # synthesis iterations per phase (CCSI's code; 2000+ on a GPU)
    "ccsi_synth_batch": 40,  # images per independent synthesis batch (CCSI's bs)
    "ccsi_mem_size": 640,
    "ccsi_replay_fraction": 0.66,
    "ccsi_replay_batch": 0,  # 0 = from ccsi_replay_fraction
    "ccsi_lambda": 5.0,
    "ccsi_adaptive_lambda": True,
    "ccsi_margin": 0.3,
    "ccsi_top_k": 1,
    "ccsi_margin_weight": 1.0,
    "ccsi_idc_weight": 1.0,
    "ccsi_idc_temperature": 1.0,
    "ccsi_imprint": True,
    "ccsi_freeze_old": True,
    "ccsi_class_weights": True,
}

# What each field of DEFAULTS sets (the hyperparameter table of docs/strategies.md).
HELP = {
    "ccsi_synthesize": (
        "`''` = class impressions of this model (CCSI's synthesis settings), or "
        "`callable:<module:function>`"
    ),
    "ccsi_iterations": "synthesis iterations per phase (CCSI's code; 2000+ on a GPU)",
    "ccsi_synth_batch": "images per independent synthesis batch (CCSI's bs)",
    "ccsi_mem_size": "synthetic images kept (BloodMNIST's 16 batches of 40)",
    "ccsi_replay_fraction": "expected share of synthetic rows in a batch (the code's `rs_ratio`)",
    "ccsi_replay_batch": (
        "synthetic rows per step; 0 = from `ccsi_replay_fraction` (`round(B f / (1 - f))`)"
    ),
    "ccsi_lambda": "feature-distillation weight lambda (the code's `--lamda`)",
    "ccsi_adaptive_lambda": "scale lambda by `sqrt(n_old / n_new)` (the code's `adapt_lamda`)",
    "ccsi_margin": "margin m of the margin ranking loss on old-class rows",
    "ccsi_top_k": "new-class cosine scores per row in the margin ranking loss",
    "ccsi_margin_weight": "weight of the margin ranking loss",
    "ccsi_idc_weight": "weight of the intra-domain contrastive loss (the code's `da_coef`)",
    "ccsi_idc_temperature": (
        "temperature of that loss (BloodMNIST, PathMNIST: 1; OrganAMNIST, TissueMNIST: 5)"
    ),
    "ccsi_imprint": "imprint new classes' weights from normalised class-mean features",
    "ccsi_freeze_old": "old classes' weights frozen in later phases",
    "ccsi_class_weights": "class-weighted CE, weights `max(n) / n_k`",
}
_SALT = 0xC51  # separates the synthesis keys from other seeded randomness
_HOST_BATCH = 64  # rows per host-side forward between phases


class CCSIState(NamedTuple):
    snap: snapshot.Snapshot  # the model at the end of the previous phase
    memory: buffer.Buffer  # synthetic class impressions of every class seen so far
    means: jax.Array  # float32 [K,H,W,3]: mean training image per class, in [-1, 1]
    has_mean: jax.Array  # bool [K]
    old: jax.Array  # bool [K]: classes of earlier phases
    new: jax.Array  # bool [K]: classes first labelled in this phase
    class_weights: jax.Array  # float32 [K]: CE weight per class
    kd_weight: jax.Array  # float32 []: lambda * sqrt(n_old / n_new), 0 before any old class


# -- losses (pure) -------------------------------------------------------------------------------


def _row_ok(labels: jax.Array, num_classes: int) -> jax.Array:
    return (labels != losses.IGNORE) & (labels < num_classes)


def weighted_cross_entropy(
    logits: jax.Array, labels: jax.Array, class_weights: jax.Array
) -> jax.Array:
    """PyTorch's ``CrossEntropyLoss(weight)``: ``sum_i w_{y_i} nll_i / sum_i w_{y_i}`` over rows
    with a label (255 = none). ``logits [B,K]`` (masked), ``labels [B]``, ``class_weights [K]``."""
    k = logits.shape[-1]
    ok = _row_ok(labels, k)
    safe = jnp.where(ok, labels, 0).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, safe[:, None], axis=-1)[:, 0]
    w = jnp.where(ok, class_weights[safe], 0.0)
    return jnp.sum(w * nll) / jnp.maximum(jnp.sum(w), 1e-12)


def cn_cross_entropy(
    cos: jax.Array,
    sigma: jax.Array,
    labels: jax.Array,
    class_mask: jax.Array,
    class_weights: jax.Array,
) -> jax.Array:
    """Cosine-normalised CE: the weighted CE of ``sigma * cos`` over the classes in ``class_mask``.

    ``cos [B,K]``: unscaled cosine scores (``cosine.cosine_scores``); ``sigma []`` the scale.
    """
    return weighted_cross_entropy(
        losses.mask_logits(sigma * cos, class_mask), labels, class_weights
    )


def feature_distillation(features: jax.Array, old_features: jax.Array, ok: jax.Array) -> jax.Array:
    """``mean_{rows ok} 1 - <f/|f|, f_old/|f_old|>`` (``CosineEmbeddingLoss`` with target 1).

    ``features``, ``old_features`` ``[B,C]``; ``ok`` bool ``[B]``. 0 without rows.
    """
    f = cosine.normalize(features.astype(jnp.float32))
    g = cosine.normalize(old_features.astype(jnp.float32))
    per = 1.0 - jnp.sum(f * g, axis=-1)
    return jnp.sum(jnp.where(ok, per, 0.0)) / jnp.maximum(jnp.sum(ok), 1)


def adaptive_weight(lam: float, n_old: int, n_new: int) -> float:
    """``lam * sqrt(n_old / n_new)``: more old classes per new one, more distillation. ``lam``
    itself when no class is new (nothing to balance against)."""
    return lam * math.sqrt(n_old / n_new) if n_new > 0 else lam


def margin_ranking_loss(
    cos: jax.Array,
    labels: jax.Array,
    old: jax.Array,
    new: jax.Array,
    margin: float,
    k: int,
) -> jax.Array:
    """LUCIR's inter-class separation on rows of old classes. Returns a scalar.

    ``mean_{rows i with y_i old, j <= k} max(0, m - cos[i, y_i] + topk_j)``, ``topk`` the ``k``
    largest cosine scores of the row over the ``new`` classes (``cos [B,K]`` unscaled; ``old``,
    ``new`` bool ``[K]``). With fewer than ``k`` new classes only those count; 0 without any row.
    """
    nk = cos.shape[-1]
    ok = _row_ok(labels, nk)
    safe = jnp.where(ok, labels, 0).astype(jnp.int32)
    hard = ok & old[safe]
    gt = jnp.take_along_axis(cos, safe[:, None], axis=-1)  # [B,1]
    top, idx = jax.lax.top_k(jnp.where(new, cos, -jnp.inf), k)  # [B,k]
    live = hard[:, None] & new[idx]
    hinge = jnp.maximum(margin - gt + jnp.where(live, top, 0.0), 0.0)
    return jnp.sum(jnp.where(live, hinge, 0.0)) / jnp.maximum(jnp.sum(live), 1)


def class_centroids(scores: jax.Array, labels: jax.Array, ok: jax.Array, k: int) -> jax.Array:
    """``[K,D]``: the mean of ``scores [N,D]`` over the rows ``ok`` of each class (0 if none)."""
    onehot = jax.nn.one_hot(jnp.where(ok, labels, k), k, dtype=jnp.float32)  # k -> all zeros
    sums = onehot.T @ scores.astype(jnp.float32)
    return sums / jnp.maximum(jnp.sum(onehot, axis=0), 1.0)[:, None]


def idc_loss(
    source: jax.Array,
    source_labels: jax.Array,
    source_ok: jax.Array,
    target: jax.Array,
    target_labels: jax.Array,
    target_ok: jax.Array,
    class_mask: jax.Array,
    temperature: float,
    rho: float = 1.0,
    prev_source: jax.Array | None = None,
    prev_target: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The intra-domain contrastive loss between source and target class centroids.

    Args:
      source, target: ``[Ns,D]``, ``[Nt,D]`` row vectors (CCSI: unscaled cosine scores).
      source_labels, target_labels: int ``[Ns]``, ``[Nt]`` (target: pseudo-labels).
      source_ok, target_ok: bool, the rows that count.
      class_mask: bool ``[K]``, the classes the sums run over (the seen ones).
      temperature: ``T``.
      rho, prev_source, prev_target: centroid update ``c = (1 - rho) * detach(prev) + rho *
        batch`` (prev = 0 when None, as at the start of the code's epochs).

    Returns ``(loss, source_centroids [K,D], target_centroids [K,D])`` where, with ``s_k``, ``t_k``
    the L2-normalised centroids (``c / (|c| + 1e-10)``, 0 for an empty class) and ``z = t s^T / T``,
    ``loss = -log sum_k exp(z_kk) + log sum_{k,k'} exp(z_kk')``, sums over ``class_mask``.
    """
    k = class_mask.shape[0]

    def update_centroids(rows, labels, ok, prev):
        batch = class_centroids(rows, labels, ok, k)
        prev = jnp.zeros_like(batch) if prev is None else jax.lax.stop_gradient(prev)
        return (1.0 - rho) * prev + rho * batch

    s = update_centroids(source, source_labels, source_ok, prev_source)
    t = update_centroids(target, target_labels, target_ok, prev_target)
    s_n = s / (cosine.safe_norm(s) + 1e-10)
    t_n = t / (cosine.safe_norm(t) + 1e-10)
    z = (t_n @ s_n.T) / temperature  # [K,K]: target k against source k'
    pair = class_mask[:, None] & class_mask[None, :]
    diag = jnp.where(class_mask, jnp.diagonal(z), -jnp.inf)
    loss = -jax.nn.logsumexp(diag) + jax.nn.logsumexp(jnp.where(pair, z, -jnp.inf))
    return loss, s, t


# -- host-side pieces ----------------------------------------------------------------------------


def imprint(
    kernel: np.ndarray, features: np.ndarray, labels: np.ndarray, new: np.ndarray, old: np.ndarray
) -> np.ndarray:
    """Weight imprinting of the new classes' columns of ``kernel [C,K]`` (numpy, host side).

    Column ``c`` (``new[c]``, with rows in ``labels``) becomes ``normalize(mean_i normalize(f_i))
    * mean_{k old} |w_k|`` over the rows ``i`` of class ``c`` of ``features [N,C]``; other
    columns are unchanged.
    """
    kernel = np.array(kernel, copy=True)
    old_norm = np.linalg.norm(kernel[:, old], axis=0).mean() if old.any() else 1.0
    f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), cosine.EPS)
    for c in np.flatnonzero(new):
        rows = labels == c
        if rows.any():
            m = f[rows].mean(axis=0)
            kernel[:, c] = m / max(np.linalg.norm(m), cosine.EPS) * old_norm
    return kernel


def class_weights_from_counts(counts: np.ndarray) -> np.ndarray:
    """The code's ``compute_class_weights``: ``max(n) / n_k`` where ``n_k > 0``, 1 elsewhere."""
    counts = np.asarray(counts, np.float64)
    return np.where(counts > 0, counts.max() / np.maximum(counts, 1), 1.0).astype(np.float32)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Synthetic images as stored: uint8 as they are, floats in [-1, 1] quantised to 0..255."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def noise_synthesize(params, batch_stats, classes, key, *, means, n):
    """A stand-in ``synthesize``: uniform noise in [-1, 1], labels cycling over ``classes``."""
    del params, batch_stats
    images = jax.random.uniform(key, (n, *means.shape[1:]), jnp.float32, -1.0, 1.0)
    return images, np.resize(np.asarray(classes), n)


# -- the strategy --------------------------------------------------------------------------------


def make(
    cfg: ml_collections.ConfigDict, env: base.Env, *, synthesize: Synthesize | None = None
) -> base.Strategy:
    """CCSI; a ``synthesize`` given here overrides ``ccsi_synthesize``."""
    get = lambda key: cfg.get(key, DEFAULTS[key])
    if env.task.name != "classification":
        raise ValueError(f"ccsi needs a classification stream, got a {env.task.name} one")
    if synthesize is None:
        spec = str(get("ccsi_synthesize"))
        kind, _, path = spec.partition(":")
        if not spec:
            if env.graphdef is None or env.input_norm != "symmetric":
                raise ValueError(
                    "ccsi's class impressions need the model's graphdef in its Env and "
                    "model.input_norm='symmetric'"
                )
            synthesize = impressions.make_synthesizer(
                env.graphdef,
                impressions.ccsi_config(iterations=int(get("ccsi_iterations"))),
                batch_size=int(get("ccsi_synth_batch")),
                should_stop=env.stop,
            )
        elif kind != "callable" or not path:
            raise ValueError(
                "ccsi: config.strategy.ccsi_synthesize must be '' (class impressions) or "
                f"'callable:<module:function>', got {spec!r}"
            )
        else:
            synthesize = replay_sources.load_callable(path)
    size, n_fixed = int(get("ccsi_mem_size")), int(get("ccsi_replay_batch"))
    fraction = base.hparam(get("ccsi_replay_fraction"))
    lam, adapt = base.hparam(get("ccsi_lambda")), bool(get("ccsi_adaptive_lambda"))
    margin, top_k = base.hparam(get("ccsi_margin")), int(get("ccsi_top_k"))
    w_mr, w_idc = base.hparam(get("ccsi_margin_weight")), base.hparam(get("ccsi_idc_weight"))
    temperature = base.hparam(get("ccsi_idc_temperature"))
    do_imprint, freeze = bool(get("ccsi_imprint")), bool(get("ccsi_freeze_old"))
    balance = bool(get("ccsi_class_weights"))
    if not 0.0 < fraction < 1.0 or n_fixed < 0 or size < 1 or top_k < 1:
        raise ValueError(
            "ccsi: need 0 < ccsi_replay_fraction < 1, ccsi_replay_batch >= 0, ccsi_mem_size >= 1 "
            f"and ccsi_top_k >= 1, got {fraction}, {n_fixed}, {size}, {top_k}"
        )
    k = env.num_classes
    features_fn = update.make_features_fn(env.forward)

    def init(params: PyTree, batch_stats: PyTree) -> CCSIState:
        if "sigma" not in params.get("head", {}):
            logging.warning("ccsi: the head is not cosine; CCSI's CN-CE needs head='cosine'")
        none = jnp.zeros(k, bool)
        return CCSIState(
            snapshot.empty(params, batch_stats, k),
            buffer.empty(size, env.image_shape, env.label_shape),
            jnp.zeros((k, *env.image_shape), jnp.float32),
            none,
            none,
            none,
            jnp.ones(k, jnp.float32),
            jnp.zeros((), jnp.float32),
        )

    def before_phase(params, batch_stats, st: CCSIState, phase: base.Phase):
        new = np.zeros(k, bool)
        new[list(phase.new_classes)] = True
        old = np.zeros(k, bool)
        old[sorted(set(phase.seen_classes) - set(phase.new_classes))] = True
        # One pass: image sums for the new classes' means, counts, and eval-mode features. The
        # features are computed in every phase so that their program compiles in the first.
        sums = np.zeros((k, *env.image_shape), np.float64)
        counts = np.zeros(k, np.int64)
        feats, labels = [], []
        for batch in phase.batches(_HOST_BATCH):
            lab = np.asarray(batch["label"]).astype(np.int64)
            ok = lab < k
            for c in np.unique(lab[ok]):
                sums[c] += batch["image"][lab == c].sum(axis=0, dtype=np.float64)
            counts += np.bincount(lab[ok], minlength=k)
            feats.append(
                update.apply_rows(features_fn, params, batch_stats, batch["image"], _HOST_BATCH)[
                    "features"
                ]
            )
            labels.append(np.where(ok, lab, -1))
        means, has_mean = np.array(st.means), np.array(st.has_mean)
        for c in np.flatnonzero(new):
            if counts[c] >= 2:
                means[c] = (sums[c] / counts[c]) / 127.5 - 1.0
                has_mean[c] = True
            else:  # one image's mean is the image itself: keep nothing
                logging.warning("ccsi: class %d has %d training images: no mean", c, counts[c])
        head = params["head"]
        if do_imprint and old.any() and new.any() and feats:
            kernel = imprint(
                np.asarray(head["kernel"]), np.concatenate(feats), np.concatenate(labels), new, old
            )
            # Back where the old kernel lived: the step then reuses its program.
            placed = base.place_like(kernel, head["kernel"])
            params = {**params, "head": {**head, "kernel": placed}}
        mem = buffer.to_host(st.memory)
        counts = counts + np.bincount(mem["label"][mem["valid"]].astype(np.int64), minlength=k)[:k]
        weights = class_weights_from_counts(counts) if balance else np.ones(k, np.float32)
        kd = adaptive_weight(lam, int(old.sum()), int(new.sum())) if adapt else lam
        host = {
            "means": means.astype(np.float32),
            "has_mean": has_mean,
            "old": old,
            "new": new,
            "class_weights": weights,
            "kd_weight": np.float32(kd if old.any() else 0.0),
        }
        # device_put, not jnp.asarray: the latter compiles a staging program per new shape.
        return params, st._replace(**jax.device_put(host))

    def prepare_batch(batch: base.Batch, st: CCSIState, key: jax.Array) -> base.Batch:
        b = batch["image"].shape[0]
        n = n_fixed or max(1, round(b * fraction / (1.0 - fraction)))
        if n > size:
            raise ValueError(f"ccsi: {n} replayed rows per step exceed ccsi_mem_size = {size}")
        rows, ok = buffer.sample(st.memory, key, n)
        out = buffer.append_replay(batch, rows, ok)
        # Which rows are synthetic: the IdC target must be the experience's real rows only.
        return {**out, "synthetic": jnp.arange(b + n) >= b}

    def loss(inputs: base.LossInputs, st: CCSIState, key: jax.Array):
        del key
        labels, out = inputs.batch["label"], inputs.outputs
        ok = _row_ok(labels, k)
        ce = weighted_cross_entropy(out["logits"], labels, st.class_weights)
        active = st.snap.active
        feats = out["penultimate"]
        old_feats = snapshot.outputs(env.forward, st.snap, inputs.batch["image"])["penultimate"]
        kd = st.kd_weight * feature_distillation(feats, old_feats, ok)
        cos = cosine.cosine_scores(feats, inputs.params["head"]["kernel"])
        mr = active * w_mr * margin_ranking_loss(cos, labels, st.old, st.new, margin, top_k)
        seen = inputs.class_mask
        scores = jnp.where(seen, cos, 0.0)  # the code's score vectors span the seen classes only
        pseudo = jax.lax.stop_gradient(jnp.argmax(out["logits"], axis=-1))  # masked to seen
        real = ~inputs.batch["synthetic"] & ok
        idc, _, _ = idc_loss(scores, labels, ok, scores, pseudo, real, seen, temperature)
        idc = active * w_idc * idc
        total = ce + kd + mr + idc
        return total, {"ccsi_ce": ce, "ccsi_kd": kd, "ccsi_mr": mr, "ccsi_idc": idc}

    def transform_grads(grads, inputs, st: CCSIState, key):
        del inputs, key
        if not freeze:
            return grads
        head = dict(grads["head"])
        head["kernel"] = jnp.where(st.old, 0.0, head["kernel"])  # [C,K]: old columns
        if "bias" in head:
            head["bias"] = jnp.where(st.old, 0.0, head["bias"])
        return {**grads, "head": head}

    def after_phase(params, batch_stats, st: CCSIState, phase: base.Phase) -> CCSIState:
        st = st._replace(snap=snapshot.take(params, batch_stats, phase.class_mask))
        if phase.index + 1 >= env.num_experiences:
            return st  # no phase follows: nothing will replay them
        classes = np.asarray(phase.seen_classes, np.int32)
        key = jax.random.fold_in(jax.random.PRNGKey(env.seed), _SALT * 1000 + phase.index)
        images, labels = synthesize(
            params, batch_stats, classes, key, means=np.asarray(st.means), n=size
        )
        images, labels = to_uint8(images), np.asarray(labels).astype(np.int64)
        m = len(images)
        if m > size or images.shape[1:] != tuple(env.image_shape) or labels.shape != (m,):
            raise ValueError(
                f"ccsi synthesize: need at most {size} images {list(env.image_shape)} and one "
                f"label each, got images {list(images.shape)}, labels {list(labels.shape)}"
            )
        if not np.isin(labels, classes).all():
            raise ValueError(f"ccsi synthesize: labels {np.unique(labels)} not in {classes}")
        host = {
            "image": np.zeros((size, *env.image_shape), np.uint8),
            "label": np.full((size, *env.label_shape), losses.IGNORE, np.uint8),
            "exp": np.full(size, -1, np.int32),
            "rank": np.zeros(size, np.int32),
            "valid": np.arange(size) < m,
            "seen": np.asarray(m, np.int32),
        }
        host["image"][:m], host["label"][:m] = images, labels
        host["exp"][:m], host["rank"][:m] = phase.index, np.arange(m)
        return st._replace(memory=buffer.Buffer(**jax.device_put(host), extra={}))

    return base.Strategy(
        init=init,
        before_phase=before_phase,
        prepare_batch=prepare_batch,
        loss=loss,
        transform_grads=transform_grads,
        after_phase=after_phase,
        replaces_task_loss=True,
    )
