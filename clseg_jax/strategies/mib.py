"""MiB: Modeling the Background (Cermelli, Mancini, Rota Bulò, Ricci & Caputo, CVPR 2020,
"Modeling the Background for Incremental Learning in Semantic Segmentation"; official code
fcdl94/MiB).

In class-incremental segmentation the background of step t hides the old classes (unlabelled
now) and the future ones. MiB replaces the task loss by::

    loss = unbiased CE + active * mib_kd * unbiased KD

- ``losses.unbiased_cross_entropy``: a pixel labelled background scores the probability of
  background *or* any old class, so predicting an old class there is not punished.
- ``losses.unbiased_distillation``: the frozen previous model's softmax over its classes is the
  target; the current model's background probability absorbs the new classes (where the old
  model saw background, a new class may be right).
- Classifier initialisation (``init_classifier``, before every phase after the first): each new
  class gets the background's weights and the bias ``b_0 - log(N_new + 1)``, and so does the
  background, so that at the start the new classes and the background share the old background
  probability equally and the unbiased losses start where the old model stopped.

In the first phase there are no old classes: the loss is the plain cross-entropy and the KD term
is 0 (``active``). In a phase with no new class (a domain-incremental stream) nothing is shifted
into the background, so the CE folds nothing (``any(new)`` factor) and the KD is plain KD.

Defaults, and where they come from:
- ``mib_kd = 10``: the code's ``--method MiB`` preset (``loss_kd = 10``), the paper's lambda;
  many-step protocols (VOC 15-1) use 100, set by the config (``configs/voc_ci.kd_weight``).
- ``mib_alpha = 1``: the code's ``--alpha`` (multiplies the old logits; 1 = no change).
- ``mib_init = True``: the preset's ``init_balanced``.
- ``mib_ce_pixels = "valid"``: the CE is averaged over non-ignored pixels like the library's task
  loss (so the first phase equals it). MiB's code averages over *all* pixels, ignored ones
  counting 0 (``reduction='none'`` then ``.mean()``), which weighs the CE by the labelled fraction
  against the KD; ``"all"`` reproduces that.
- KD normalisation ``1 / |old classes|`` (background included) and the mean over every pixel:
  the code's ``UnbiasedKnowledgeDistillationLoss``, which the weight 10 assumes.

State (``MiBState``): a ``snapshot.Snapshot`` of the previous model (inactive in the first
phase), and ``old``/``new`` class masks ``bool [K]`` set before each phase from the phase's
seen and new classes (old = seen - new, background included from the second phase on). Shapes
never change, so one compiled step serves every phase.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from clseg_jax import losses
from clseg_jax.strategies import base, snapshot

PyTree = Any

DEFAULTS = {"mib_kd": 10.0, "mib_alpha": 1.0, "mib_init": True, "mib_ce_pixels": "valid"}

# What each field of DEFAULTS sets (the hyperparameter table of docs/strategies.md).
HELP = {
    "mib_kd": (
        "weight of the unbiased KD (the paper's lambda; `configs/voc_ci.py` sets 100 on VOC 15-1)"
    ),
    "mib_alpha": "the code's `--alpha`: multiplies the old logits (1 = no change)",
    "mib_init": (
        "new classes' classifier initialised from the background's (bias `b_0 - log(N_new + 1)`)"
    ),
    "mib_ce_pixels": (
        "`valid`: CE averaged over non-ignored pixels; `all`: the reference code's averaging "
        "over all pixels (set by `configs/voc_ci.py`)"
    ),
}


class MiBState(NamedTuple):
    snap: snapshot.Snapshot
    old: jax.Array  # bool [K]: classes of earlier phases (background from phase 1 on)
    new: jax.Array  # bool [K]: classes first labelled in this phase


def init_classifier(head: dict[str, jax.Array], new: np.ndarray) -> dict[str, jax.Array]:
    """MiB's background-based initialisation of the new classes' classifier.

    Args:
      head: ``{"kernel": [..., C, K], "bias": [K]}`` (a 1x1 conv's kernel is ``[1,1,C,K]``).
      new: ``bool [K]``, the classes to initialise.

    Returns the head with ``kernel[..., c] = kernel[..., 0]`` and ``bias[c] = b_0 - log(N + 1)``
    for every new class ``c`` (``N`` of them), and the background bias set to the same value.
    Then ``exp(b)`` splits the old background's share into ``N + 1`` equal parts: the softmax
    of background-or-new is what the old background probability was.
    """
    if "kernel" not in head or "bias" not in head:
        raise ValueError("mib_init: params['head'] needs a 'kernel' [..., C, K] and a 'bias' [K]")
    # numpy on the host: this runs once per phase, and eager jnp ops would each compile a kernel.
    new = np.asarray(new, bool)
    kernel, bias = np.asarray(head["kernel"]), np.asarray(head["bias"])
    shared = bias[0] - np.log(new.sum() + 1.0).astype(bias.dtype)
    kernel = np.where(new, kernel[..., :1], kernel)  # [..., C, K]: background's column
    bias = np.where(new, shared, bias)
    bias[0] = shared
    # Back where the old arrays lived: hooks downstream reuse their compiled programs.
    new_head = {"kernel": kernel, "bias": bias}
    return {**head, **base.place_like(new_head, {k: head[k] for k in new_head})}


def make(cfg: ml_collections.ConfigDict, env: base.Env) -> base.Strategy:
    get = lambda key: cfg.get(key, DEFAULTS[key])
    kd_weight, alpha = base.hparam(get("mib_kd")), base.hparam(get("mib_alpha"))
    do_init, ce_pixels = bool(get("mib_init")), get("mib_ce_pixels")
    if ce_pixels not in ("valid", "all"):
        raise ValueError(f"mib_ce_pixels must be 'valid' or 'all', got {ce_pixels!r}")
    if env.task.name != "segmentation":
        raise ValueError(f"mib models a background class: segmentation only, not {env.task.name}")
    # Said in the run log: configs pick it by protocol (MiB's 100 for a-1 stalls small models).
    logging.info("mib: distillation weight mib_kd=%g, mib_ce_pixels=%s", kd_weight, ce_pixels)
    k = env.num_classes

    def init(params: PyTree, batch_stats: PyTree) -> MiBState:
        none = jnp.zeros(k, bool)
        return MiBState(snapshot.empty(params, batch_stats, k), none, none)

    def before_phase(
        params: PyTree, batch_stats: PyTree, state: MiBState, phase: base.Phase
    ) -> tuple[PyTree, MiBState]:
        del batch_stats
        new = np.zeros(k, bool)
        new[list(phase.new_classes)] = True
        old = np.zeros(k, bool)
        old[sorted(set(phase.seen_classes) - set(phase.new_classes))] = True
        if do_init and old.any() and new.any():
            params = {**params, "head": init_classifier(params["head"], new)}
        return params, state._replace(old=jnp.asarray(old), new=jnp.asarray(new))

    def loss(
        inputs: base.LossInputs, state: MiBState, key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        del key
        logits = inputs.outputs["logits"]  # masked to the seen classes
        # A phase without new classes has no background shift: fold nothing (no branch).
        fold = state.old & jnp.any(state.new)
        ce = losses.unbiased_cross_entropy(logits, inputs.batch["label"], fold, ce_pixels)
        old = snapshot.outputs(env.forward, state.snap, inputs.batch["image"])
        kd = losses.unbiased_distillation(
            logits, old["logits"], state.old, inputs.class_mask, alpha
        )
        kd = state.snap.active * kd_weight * kd
        return ce + kd, {"mib_ce": ce, "mib_kd": kd}

    def after_phase(
        params: PyTree, batch_stats: PyTree, state: MiBState, phase: base.Phase
    ) -> MiBState:
        return state._replace(snap=snapshot.take(params, batch_stats, phase.class_mask))

    return base.Strategy(
        init=init,
        before_phase=before_phase,
        loss=loss,
        after_phase=after_phase,
        replaces_task_loss=True,
    )
