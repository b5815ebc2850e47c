"""Class impressions (CCSI: Ayromlou et al., "Class Impression for Data-free Incremental
Learning", MICCAI 2022, and "CCSI: Continual Class-Specific Impression", arXiv:2406.05631).

A class impression is a DeepInversion image of a past class that starts from the class's *mean
image* plus Gaussian noise instead of pure noise (medical images of one class share landmarks, so
the mean is already a plausible prototype). The mean images, computed while the class is being
trained, are the only real-derived data the strategy keeps; ``class_sums`` accumulates them over
batches, ``class_means`` divides.

The optimisation is ``deepinversion.synthesize`` with ``init = impression_init(...)``; its moment
regulariser is DeepInversion's ``bn_statistics_loss`` over the model's normalization layers. With
``norm="continual"`` (``layers.ContinualNorm``: group norm, then batch norm) the statistics are
the batch-norm part's running mean and variance, taken on its input (the group-normalised
features), which ``layers.capture_moments`` captures like any BatchNorm's. CCSI regularises with
"the moments stored in the normalization layers"; neither its CN layer nor our ``ContinualNorm``
keeps moments *per class* (the running statistics pool every class trained so far), so the
regulariser uses the running moments exactly as DeepInversion does, for every class of the batch.
CCSI's public code likewise hooks ``nn.BatchNorm2d`` and uses the running statistics (its public
model also lacks the CN layer the paper describes).

Defaults (``ccsi_config``, ``NOISE_STD``) from CCSI's code, ``data_synthesis/
continual_class_specific_impression.py`` and the MedMNIST ``configs/*/sweep_task_*.yaml`` (all
tasks alike), run at 32 px with inputs in [0, 1] (mean 0, std 1 "normalisation"):

- ``iterations = 5000``: ``setting_id=1`` runs 5,000 iterations at full resolution in their copy.
- ``lr = 0.1``: ``generation_lr = 0.05`` in their [0, 1] pixel units; our range [-1, 1] is twice
  as wide, so the same relative step is 0.1. ``betas = (0.5, 0.9)`` (``beta_2 = 0.9``), eps 1e-8.
- ``warmup_iterations = 100`` and ``cosine_factor = 0.2``: their ``lr_cosine_policy`` decays with
  ``0.2 (1 + cos)`` where DeepInversion's uses 0.5 (the rate drops to 0.4 lr after the warm-up).
- ``bn_scale = 1`` (``r_feature``), ``first_bn_multiplier = 10``, ``tv_l2 = 0.01``, ``l2 = 0.1``,
  ``tv_l1 = 0``, ``main_scale = 1``: the configs' values, not rescaled to our pixel range (the
  priors would change by about 2x; the statistics term belongs to the model, not the range).
- ``jitter = 30``, ``flip = True``: hard-coded in their ``main.py`` and ``do_flip: True``; on
  32 px images a roll of up to 30 px wraps around, i.e. an almost uniform random translation.
- ``NOISE_STD = 0.2``: their start is ``mean + N(0, 1) / 10`` in [0, 1] units, 0.2 in ours.
- ``clip = (-1, 1)``: our valid range (their ``clip`` keeps ImageNet's per-channel limits, which do
  not bound their [0, 1] inputs).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clseg_jax.synthesis import deepinversion

NOISE_STD = 0.2


def ccsi_config(**overrides) -> deepinversion.DIConfig:
    """``DIConfig`` with CCSI's synthesis defaults (module docstring); ``overrides`` replace
    fields."""
    cfg = deepinversion.DIConfig(
        iterations=5000,
        lr=0.1,
        betas=(0.5, 0.9),
        eps=1e-8,
        warmup_iterations=100,
        cosine_factor=0.2,
        bn_scale=1.0,
        first_bn_multiplier=10.0,
        tv_l1=0.0,
        tv_l2=0.01,
        l2=0.1,
        main_scale=1.0,
        adi_scale=0.0,
        jitter=30,
        flip=True,
        clip=(-1.0, 1.0),
    )
    return cfg._replace(**overrides)


def _as_input(images: jax.Array) -> jax.Array:
    """The model's input space: uint8 mapped to [-1, 1] as ``step.make_forward``; floats kept."""
    images = jnp.asarray(images)
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32) / 127.5 - 1.0
    return images.astype(jnp.float32)


def class_sums(
    images: jax.Array, labels: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array]:
    """Per-class sums of images, to accumulate means over batches.

    Args:
      images: ``[B,H,W,C]`` uint8 (mapped to [-1, 1]) or float (the model's input space).
      labels: ``int [B]``; ids outside ``0..num_classes-1`` (255 padding) are skipped.
      num_classes: ``K``.

    Returns ``(sums float32 [K,H,W,C], counts int32 [K])``.
    """
    x = _as_input(images)
    labels = jnp.asarray(labels).astype(jnp.int32)
    valid = (labels >= 0) & (labels < num_classes)
    one_hot = jax.nn.one_hot(jnp.where(valid, labels, 0), num_classes) * valid[:, None]  # [B,K]
    sums = jnp.einsum("bk,bhwc->khwc", one_hot, x, precision=jax.lax.Precision.HIGHEST)
    return sums, jnp.sum(one_hot, axis=0).astype(jnp.int32)


def class_means(images: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """Per-class mean image ``float32 [K,H,W,C]`` in the model's input space (``class_sums``'s
    arguments); a class without images gets zeros (mid-grey)."""
    sums, counts = class_sums(images, labels, num_classes)
    return sums / jnp.maximum(counts, 1).astype(jnp.float32)[:, None, None, None]


def impression_init(
    means: jax.Array, targets: jax.Array, key: jax.Array, noise_std: float = NOISE_STD
) -> jax.Array:
    """Start of the synthesis: ``means[targets] + noise_std * N(0, 1)``, ``float32 [N,H,W,C]``.

    Args:
      means: ``[K,H,W,C]`` class means (``class_means``).
      targets: ``int [N]`` class of each image to synthesise.
      key: PRNG key of the noise.
      noise_std: the noise's standard deviation in input units (CCSI: 0.2 here, module docstring).
    """
    means = jnp.asarray(means, jnp.float32)
    start = means[jnp.asarray(targets)]
    return start + noise_std * jax.random.normal(key, start.shape, jnp.float32)


def synthesize(
    teacher: deepinversion.TeacherFn,
    teacher_vars,
    means: jax.Array,
    targets: jax.Array,
    key: jax.Array,
    cfg: deepinversion.DIConfig | None = None,
    *,
    noise_std: float = NOISE_STD,
    **kwargs,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Class impressions of ``targets``: ``deepinversion.synthesize`` from ``impression_init``.

    ``cfg`` defaults to ``ccsi_config()``; ``kwargs`` go to ``deepinversion.synthesize``
    (``class_mask``, a student). Returns what it returns.
    """
    k_init, k_run = jax.random.split(key)
    init = impression_init(means, targets, k_init, noise_std)
    cfg = ccsi_config() if cfg is None else cfg
    return deepinversion.synthesize(teacher, teacher_vars, targets, k_run, cfg, init=init, **kwargs)


# synthesize(params, batch_stats, classes int [S], key, *, means [K,H,W,C], n) -> (images, labels)
Synthesizer = Callable[..., tuple[jax.Array, np.ndarray]]


def make_synthesizer(
    graphdef: nnx.GraphDef,
    cfg: deepinversion.DIConfig | None = None,
    *,
    noise_std: float = NOISE_STD,
    batch_size: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Synthesizer:
    """The CCSI strategy's ``synthesize`` callable for a model: class impressions of ``classes``.

    ``synthesize(params, batch_stats, classes, key, *, means, n) -> (images, labels)``: ``labels
    int32 [N]`` cycle over ``classes`` (an even split; CCSI's configs draw them uniformly at
    random, ``random_label: true``), ``images float32 [N,H,W,C]`` in [-1, 1]
    start from ``impression_init(means, labels)``; the teacher's logits are masked to
    ``classes``. With ``batch_size`` the ``N = (n // batch_size) * batch_size`` images are
    synthesised as independent batches of that size in one ``vmap`` (each with its own batch
    statistics, as CCSI generates batches of ``bs = 40``); without, as one batch of ``N = n``.
    ``cfg`` defaults to ``ccsi_config()``; ``should_stop`` as ``deepinversion.synthesize``'s.
    """
    teacher = deepinversion.make_teacher_fn(graphdef)
    cfg = ccsi_config() if cfg is None else cfg

    def synthesize_fn(params, batch_stats, classes, key, *, means, n):
        classes = np.asarray(classes, np.int32)
        means = jnp.asarray(means, jnp.float32)
        mask = np.zeros(means.shape[0], bool)
        mask[classes] = True
        size = n if batch_size is None else min(batch_size, n)
        groups = n // size
        labels = classes[np.arange(groups * size) % len(classes)]
        k_init, k_run = jax.random.split(key)
        init = impression_init(means, labels, k_init, noise_std)
        variables = (params, batch_stats)
        if groups == 1:
            images, _ = deepinversion.synthesize(
                teacher,
                variables,
                labels,
                k_run,
                cfg,
                init=init,
                class_mask=mask,
                should_stop=should_stop,
            )
            return images, labels
        images, _ = deepinversion.synthesize_many(
            teacher,
            variables,
            labels.reshape(groups, size),
            jax.random.split(k_run, groups),
            cfg,
            init=init.reshape(groups, size, *init.shape[1:]),
            class_mask=mask,
            should_stop=should_stop,
        )
        return images.reshape(-1, *images.shape[2:]), labels

    return synthesize_fn
