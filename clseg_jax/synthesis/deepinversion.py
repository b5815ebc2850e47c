"""DeepInversion (Yin et al., "Dreaming to Distill", CVPR 2020) as one compiled program.

A batch of input images is optimised so that a frozen teacher predicts given targets while the
statistics of its features look like the training data's::

    loss = main_scale * CE(teacher(x~), y)                     # x~: a rolled (and flipped) copy
         + bn_scale * sum_l w_l (||mu_l(x~) - mu_l||_2 + ||var_l(x~) - var_l||_2)
         + tv_l2 * TV_l2(x~) + tv_l1 * TV_l1(x~) + l2 * L2(x~)
         + adi_scale * (1 - JS(teacher, student))              # Adaptive DeepInversion, optional

with ``mu_l, var_l`` the running statistics of the teacher's l-th BatchNorm, ``mu_l(x~)`` and
``var_l(x~)`` its input's moments over the *whole* synthetic batch (biased variance), ``w_0 =
first_bn_multiplier`` and ``w_l = 1`` otherwise. Each iteration draws one random roll of
``[-jitter, jitter]`` pixels per spatial axis and (with ``flip``) a horizontal flip with
probability 1/2, applied to the whole batch; the loss, priors included, is computed on that copy
and its gradient flows back to the images through the roll and flip. Adam updates the pixels,
which are then clipped to the valid input range.

``synthesize`` runs the whole optimisation as ONE compiled program (``jax.jit`` around a
``lax.scan`` over iterations); ``synthesize_many`` ``vmap``s independent syntheses (seeds, class
groups, optionally teachers) inside one program. The teacher is any function
``teacher(params, batch_stats, images) -> (logits, moments)``; ``make_teacher_fn`` builds one from
an NNX graphdef (eval mode, no BatchNorm update, moments from ``layers.capture_moments``).

Defaults (``DIConfig``), from NVlabs/DeepInversion unless said otherwise. The reference's
recommended run is ``imagenet_inversion.py --setting_id=1|0 --r_feature=0.01 --lr 0.25 --do_flip``
(README) on ImageNet's normalised inputs at 224 px; ``setting_id=1`` is 2,000 iterations at full
resolution, which is what we implement (no multi-resolution warm start):

- ``iterations = 2000``: ``setting_id=1``.
- ``lr = 0.1``: the step in pixel units of *our* input space. The reference's 0.25 is in
  ImageNet-normalised units, where the valid range [0, 1] spans ``1 / std ~ 4.4`` units; our
  range [-1, 1] spans 2, so the same relative step is ``0.25 * 2 / 4.4 ~ 0.11``. The reference's
  CIFAR-10 script (32 px, our resolution) uses 0.1.
- ``betas = (0.5, 0.9)``, ``eps = 1e-8``: Adam of ``setting_id`` 0 and 1 (setting 2: PyTorch's
  default betas, no clipping).
- ``warmup_iterations = 100``, ``cosine_factor = 0.5``: ``lr_cosine_policy(lr, 100, iterations)``,
  ``lr * (i + 1) / 100`` for ``i < 100``, then ``cosine_factor * (1 + cos(pi (i - 100) /
  (iterations - 100))) * lr``.
- ``bn_scale = 0.01`` (``--r_feature`` in the README's command; argparse default 0.05),
  ``first_bn_multiplier = 10``.
- ``tv_l1 = 0``, ``tv_l2 = 1e-4``, ``l2 = 1e-5``, ``main_scale = 1``: argparse defaults.
- ``adi_scale = 0`` (off; the paper's ADI runs use 0.2), ``adi_temperature = 3``: the reference.
- ``jitter = 2``: the reference's CIFAR-10 script at 32 px (its ImageNet script rolls by up to
  30 px at 224 px, ~13% of the side).
- ``flip = True``: the README's ``--do_flip``.
- ``init_std = 1``: the reference starts from ``torch.randn``.
- ``clip = (-1, 1)``: after every step the reference clamps each pixel to the valid range of its
  input space; ours is [-1, 1] (``step.make_forward`` maps uint8 to it, takes floats as they are).

The priors are the reference's ``get_image_prior_losses`` and L2: ``TV_l2`` sums the Frobenius
norms (over the whole batch) of the four neighbour differences (right, down and both diagonals),
``TV_l1`` sums their mean absolute values, ``L2`` is the mean over images of each image's L2 norm.
``TV_l2`` is a norm over the whole batch, so it grows with ``sqrt(N H W)``: its weight was tuned
for the reference's batch (84-152 images at 224 px).

The reference keeps a "best" iterate whose cost it never updates, so it returns the last one;
so do we. The ADI term follows the reference's code: teacher and student softmaxes at
temperature 3 (the student's gradient is not stopped, as the reference's ``detach_student=False``),
``M = (P + Q) / 2``, all three clamped to [0.01, 0.99], ``JS = (KL(M || P) + KL(M || Q)) / 2``
summed over classes and averaged over rows (PyTorch's ``KLDivLoss(reduction="batchmean")``), and
the term ``1 - clip(JS, 0, 1)``. (The paper's JS takes ``KL(P || M)``; the code's direction is
the one its results come from.) The student runs in eval mode (the reference's CIFAR script;
its ImageNet script leaves the student's BatchNorm in train mode, updating its running statistics
as a side effect of synthesis).

Dense targets ``[N,H,W]`` (segmentation teachers, logits ``[N,H,W,K]`` at input resolution) get
the per-pixel CE (label 255 ignored) and are rolled and flipped with the images; the ADI term is
then averaged over pixels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from clseg_jax import losses, stopping
from clseg_jax.models import layers

PyTree = Any
Moments = Sequence[tuple[jax.Array, jax.Array, jax.Array, jax.Array]]
# teacher(params, batch_stats, images [N,H,W,C] float) -> (logits [N,K] or [N,H,W,K], moments)
TeacherFn = Callable[..., tuple[jax.Array, Moments]]


class DIConfig(NamedTuple):
    """DeepInversion hyperparameters; the module docstring gives each default's source."""

    iterations: int = 2000
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    eps: float = 1e-8
    warmup_iterations: int = 100
    cosine_factor: float = 0.5
    bn_scale: float = 0.01
    first_bn_multiplier: float = 10.0
    tv_l1: float = 0.0
    tv_l2: float = 1e-4
    l2: float = 1e-5
    main_scale: float = 1.0
    adi_scale: float = 0.0
    adi_temperature: float = 3.0
    jitter: int = 2
    flip: bool = True
    init_std: float = 1.0
    clip: tuple[float, float] | None = (-1.0, 1.0)


DEFAULT = DIConfig()


# ----------------------------------------------------------------------------- loss parts


def _safe_norm(x: jax.Array) -> jax.Array:
    """``||x||_2`` over all entries, with gradient 0 (not NaN) at ``x = 0`` as PyTorch's norm."""
    sq = jnp.sum(jnp.square(x.astype(jnp.float32)))
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def bn_statistics_loss(moments: Moments, first_bn_multiplier: float = 10.0) -> jax.Array:
    """The feature-statistics regulariser ``R_feature``. Returns a scalar.

    ``sum_l w_l (||var_l - running_var_l||_2 + ||mean_l - running_mean_l||_2)`` with ``w_0 =
    first_bn_multiplier`` and ``w_l = 1`` for the others: plain (not squared) L2 distances, as
    the reference's BatchNorm hooks compute them.

    Args:
      moments: one ``(mean [C], var [C], running_mean [C], running_var [C])`` per BatchNorm call
        (``layers.captured_moments``); the first entry gets the multiplier, so the list must be
        in call order (the reference weights the BatchNorm nearest the input).
      first_bn_multiplier: weight of the first layer.
    """
    total = jnp.zeros((), jnp.float32)
    for i, (mean, var, running_mean, running_var) in enumerate(moments):
        dist = _safe_norm(running_var - var) + _safe_norm(running_mean - mean)
        total = total + (first_bn_multiplier if i == 0 else 1.0) * dist
    return total


def priors(images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The reference's image priors of ``images [N,H,W,C]``: ``(tv_l1, tv_l2, l2)`` scalars.

    With ``d`` the four neighbour differences ``x[h, w] - x[h, w+1]``, ``x[h, w] - x[h+1, w]``,
    ``x[h+1, w] - x[h, w+1]`` and ``x[h, w] - x[h+1, w+1]`` over the whole batch and all
    channels: ``tv_l1 = sum_d mean |d|``, ``tv_l2 = sum_d ||d||_2`` (Frobenius), and ``l2`` the
    mean over images of each image's L2 norm.
    """
    x = images.astype(jnp.float32)
    diffs = (
        x[:, :, :-1] - x[:, :, 1:],
        x[:, :-1, :] - x[:, 1:, :],
        x[:, 1:, :-1] - x[:, :-1, 1:],
        x[:, :-1, :-1] - x[:, 1:, 1:],
    )
    tv_l1 = sum(jnp.mean(jnp.abs(d)) for d in diffs)
    tv_l2 = sum(_safe_norm(d) for d in diffs)
    l2 = jnp.mean(jax.vmap(_safe_norm)(x))
    return tv_l1, tv_l2, l2


def adi_loss(
    teacher_logits: jax.Array, student_logits: jax.Array, temperature: float = 3.0
) -> jax.Array:
    """Adaptive DeepInversion's competition term ``1 - JS`` as the reference computes it.

    Logits ``[..., K]``; ``P = softmax(student / T)``, ``Q = softmax(teacher / T)``, ``M = (P +
    Q) / 2``, each clamped to [0.01, 0.99]; ``JS = (KL(M || P) + KL(M || Q)) / 2`` summed over
    classes and averaged over the rows (every leading position). Returns ``1 - clip(JS, 0, 1)``:
    minimising it drives the images to where the student disagrees with the teacher.
    """
    t = jnp.asarray(temperature, jnp.float32)
    p = jax.nn.softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    q = jax.nn.softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    m = jnp.clip(0.5 * (p + q), 0.01, 0.99)
    p, q = jnp.clip(p, 0.01, 0.99), jnp.clip(q, 0.01, 0.99)
    rows = max(1, teacher_logits.size // teacher_logits.shape[-1])
    kl_mp = jnp.sum(m * (jnp.log(m) - jnp.log(p))) / rows
    kl_mq = jnp.sum(m * (jnp.log(m) - jnp.log(q))) / rows
    return 1.0 - jnp.clip(0.5 * kl_mp + 0.5 * kl_mq, 0.0, 1.0)


def learning_rate(
    i: jax.Array, lr: float, warmup: int, iterations: int, cosine_factor: float = 0.5
) -> jax.Array:
    """The reference's ``lr_cosine_policy`` at iteration ``i`` (0-based): ``lr (i + 1) / warmup``
    during the warm-up, then ``cosine_factor (1 + cos(pi (i - warmup) / (iterations - warmup)))
    lr``. CCSI's copy of the policy uses ``cosine_factor = 0.2``."""
    i = jnp.asarray(i, jnp.float32)
    warm = lr * (i + 1.0) / max(warmup, 1)
    frac = (i - warmup) / max(iterations - warmup, 1)
    cosine = cosine_factor * (1.0 + jnp.cos(jnp.pi * frac)) * lr
    return jnp.where(i < warmup, warm, cosine)


# ----------------------------------------------------------------------------- jitter and flip


def draw_jitter(key: jax.Array, jitter: int, flip: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One iteration's augmentation: ``(dy, dx, flipped)``, offsets uniform in ``[-jitter,
    jitter]`` (inclusive, as Python's ``random.randint``) and a fair coin for the flip (always
    False without ``flip``)."""
    k_roll, k_flip = jax.random.split(key)
    dy, dx = jax.random.randint(k_roll, (2,), -jitter, jitter + 1)
    flipped = jax.random.bernoulli(k_flip, 0.5) & flip
    return dy, dx, flipped


def apply_jitter(x: jax.Array, dy: jax.Array, dx: jax.Array, flipped: jax.Array) -> jax.Array:
    """``x [N,H,W,...]`` rolled by ``(dy, dx)`` (``torch.roll(shifts=(dy, dx))`` on H and W,
    wrapping around), then mirrored along W if ``flipped``. Images and dense labels alike."""
    x = jnp.roll(x, (dy, dx), axis=(1, 2))
    return jnp.where(flipped, jnp.flip(x, axis=2), x)


# ----------------------------------------------------------------------------- the teacher


@functools.lru_cache(maxsize=64)
def make_teacher_fn(graphdef: nnx.GraphDef) -> TeacherFn:
    """``teacher(params, batch_stats, images) -> (logits, moments)`` for an NNX model.

    Eval mode (running statistics, no BatchNorm update); ``images`` float in the model's input
    space, used as they are; ``moments`` as ``layers.captured_moments`` returns them. Also
    callable as ``teacher((params, batch_stats), images)``. Cached per graphdef, so building it
    again returns the same function and ``synthesize`` does not recompile.
    """

    def teacher(*args) -> tuple[jax.Array, list]:
        if len(args) == 2:
            (params, batch_stats), images = args
        else:
            params, batch_stats, images = args
        model = layers.capture_moments(nnx.merge(graphdef, params, batch_stats))
        outputs = model(images, train=False)
        return outputs["logits"], layers.captured_moments(model)

    return teacher


def to_uint8(images: jax.Array) -> jax.Array:
    """Synthesised images in [-1, 1] to uint8 (the inverse of the forward's ``x / 127.5 - 1``)."""
    return jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


# ----------------------------------------------------------------------------- the loop


class _Static(NamedTuple):
    """What shapes the program (static under jit); every float of ``DIConfig`` is traced, so
    changing a coefficient or the learning rate does not recompile."""

    iterations: int
    warmup_iterations: int
    jitter: int
    flip: bool
    clip: tuple[float, float] | None
    use_adi: bool
    image_shape: tuple[int, ...]


_HYPER = (
    "lr",
    "eps",
    "cosine_factor",
    "bn_scale",
    "first_bn_multiplier",
    "tv_l1",
    "tv_l2",
    "l2",
    "main_scale",
    "adi_scale",
    "adi_temperature",
    "init_std",
)


def _split_config(cfg: DIConfig, use_adi: bool, image_shape) -> tuple[_Static, dict]:
    static = _Static(
        int(cfg.iterations),
        int(cfg.warmup_iterations),
        int(cfg.jitter),
        bool(cfg.flip),
        None if cfg.clip is None else (float(cfg.clip[0]), float(cfg.clip[1])),
        use_adi,
        tuple(int(s) for s in image_shape),
    )
    hyper = {name: float(getattr(cfg, name)) for name in _HYPER}
    hyper["b1"], hyper["b2"] = float(cfg.betas[0]), float(cfg.betas[1])
    return static, hyper


class _Fns(NamedTuple):
    """The static half of a synthesis (hashable: a jit static argument)."""

    teacher: TeacherFn
    student: TeacherFn | None
    static: _Static


# The traced half, ``ctx``: {"hyper", "teacher_vars", "student_vars", "targets", "class_mask"}.


def _loss_parts(fns: _Fns, ctx: dict, x: jax.Array, labels: jax.Array):
    """The objective on one (jittered) batch: ``(total, parts)``."""
    hyper, class_mask = ctx["hyper"], ctx["class_mask"]

    def masked(logits):
        return logits if class_mask is None else losses.mask_logits(logits, class_mask)

    logits, moments = fns.teacher(*ctx["teacher_vars"], x)
    logits = masked(logits)
    main = losses.cross_entropy(logits, labels)
    bn = bn_statistics_loss(moments, hyper["first_bn_multiplier"])
    tv_l1, tv_l2, l2 = priors(x)
    adi = jnp.zeros((), jnp.float32)
    if fns.static.use_adi:
        student_logits, _ = fns.student(*ctx["student_vars"], x)
        adi = adi_loss(logits, masked(student_logits), hyper["adi_temperature"])
    total = (
        hyper["main_scale"] * main
        + hyper["tv_l2"] * tv_l2
        + hyper["tv_l1"] * tv_l1
        + hyper["bn_scale"] * bn
        + hyper["l2"] * l2
        + hyper["adi_scale"] * adi
    )
    parts = {
        "total": total,
        "main": main,
        "bn": bn,
        "tv_l1": tv_l1,
        "tv_l2": tv_l2,
        "l2": l2,
        "adi": adi,
        "accuracy": losses.pixel_accuracy(logits, labels),
    }
    return total, parts


def _adam(hyper: dict) -> optax.GradientTransformation:
    return optax.scale_by_adam(b1=hyper["b1"], b2=hyper["b2"], eps=hyper["eps"])


def _start(static: _Static, hyper: dict, targets, key, init):
    """The starting images, Adam's state and the loop's key."""
    k_init, k_loop = jax.random.split(key)
    if init is None:
        images = hyper["init_std"] * jax.random.normal(
            k_init, (targets.shape[0], *static.image_shape)
        )
    else:
        images = jnp.asarray(init, jnp.float32)
    return (images, _adam(hyper).init(images)), k_loop


def _iteration(fns: _Fns, ctx: dict, k_loop, carry, i):
    """Iteration ``i``: jitter, loss, Adam step, schedule, clip. ``(carry, parts)``."""
    static, hyper, targets = fns.static, ctx["hyper"], ctx["targets"]
    images, opt_state = carry
    dy, dx, flipped = draw_jitter(jax.random.fold_in(k_loop, i), static.jitter, static.flip)
    labels = apply_jitter(targets, dy, dx, flipped) if targets.ndim == 3 else targets

    def objective(images):
        return _loss_parts(fns, ctx, apply_jitter(images, dy, dx, flipped), labels)

    (_, parts), grad = jax.value_and_grad(objective, has_aux=True)(images)
    direction, opt_state = _adam(hyper).update(grad, opt_state)
    lr = learning_rate(
        i, hyper["lr"], static.warmup_iterations, static.iterations, hyper["cosine_factor"]
    )
    images = images - lr * direction
    if static.clip is not None:
        images = jnp.clip(images, *static.clip)
    return (images, opt_state), {**parts, "lr": lr}


def _finish(fns: _Fns, ctx: dict, images, history):
    """The result as the teacher sees it, without jitter: what a replay batch will contain."""
    _, final = _loss_parts(fns, ctx, images, ctx["targets"])
    info = {**history, **{f"final_{k}": final[k] for k in ("main", "bn", "accuracy")}}
    return images, info


def _one_program(fns: _Fns, ctx: dict, key, init):
    """One synthesis as one program: ``images [N,*image_shape]`` and the info dict."""
    carry, k_loop = _start(fns.static, ctx["hyper"], ctx["targets"], key, init)
    steps = jnp.arange(fns.static.iterations, dtype=jnp.int32)
    step = functools.partial(_iteration, fns, ctx, k_loop)
    (images, _), history = jax.lax.scan(step, carry, steps)
    return _finish(fns, ctx, images, history)


_run = jax.jit(_one_program, static_argnames=("fns",))


def _group_axes(stacked_teacher: bool) -> dict:
    """``vmap`` axes of ``ctx`` over groups: targets always, the teacher if stacked."""
    return {
        "hyper": None,
        "teacher_vars": 0 if stacked_teacher else None,
        "student_vars": None,
        "targets": 0,
        "class_mask": None,
    }


@functools.partial(jax.jit, static_argnames=("fns", "stacked_teacher"))
def _run_many(fns: _Fns, ctx: dict, keys, init, stacked_teacher: bool):
    one = lambda c, k, x: _one_program(fns, c, k, x)
    axes = (_group_axes(stacked_teacher), 0, None if init is None else 0)
    return jax.vmap(one, in_axes=axes)(ctx, keys, init)


# The CPU path: the same pieces, one compiled iteration per step (``vmap``ped over groups when
# ``stacked_teacher`` is not None).
@functools.partial(jax.jit, static_argnames=("static", "many"))
def _host_start(static: _Static, hyper: dict, targets, keys, init, many: bool):
    one = lambda t, k, x: _start(static, hyper, t, k, x)
    if not many:
        return one(targets, keys, init)
    return jax.vmap(one, in_axes=(0, 0, None if init is None else 0))(targets, keys, init)


@functools.partial(jax.jit, static_argnames=("fns", "stacked_teacher"), donate_argnames=("carry",))
def _host_iteration(fns: _Fns, ctx: dict, k_loop, carry, i, stacked_teacher: bool | None):
    one = lambda c, k, cy: _iteration(fns, c, k, cy, i)
    if stacked_teacher is None:
        return one(ctx, k_loop, carry)
    return jax.vmap(one, in_axes=(_group_axes(stacked_teacher), 0, 0))(ctx, k_loop, carry)


@functools.partial(jax.jit, static_argnames=("fns", "stacked_teacher"))
def _host_finish(fns: _Fns, ctx: dict, images, history, stacked_teacher: bool | None):
    one = lambda c, x, h: _finish(fns, c, x, h)
    if stacked_teacher is None:
        return one(ctx, images, history)
    return jax.vmap(one, in_axes=(_group_axes(stacked_teacher), 0, 0))(ctx, images, history)


def _like_iteration_outputs(carry, ctx: dict):
    """``carry`` replicated over the teacher's mesh, as ``_host_iteration`` returns it, so the
    first iteration and the later ones share one compiled program (they compiled twice)."""
    leaf = jax.tree.leaves(ctx["teacher_vars"])[0]
    sharding = getattr(leaf, "sharding", None)
    if not (isinstance(leaf, jax.Array) and leaf.committed and hasattr(sharding, "mesh")):
        return carry
    return jax.device_put(
        carry, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    )


def _check_stop(should_stop: Callable[[], bool] | None, i: int, total: int) -> None:
    if should_stop is not None and should_stop():
        raise stopping.Stopped(f"synthesis stopped at iteration {i} of {total}")


@functools.partial(
    jax.jit, static_argnames=("fns", "length", "stacked_teacher"), donate_argnames=("carry",)
)
def _scan_chunk(fns: _Fns, ctx: dict, k_loop, carry, start, length: int, stacked_teacher):
    """Iterations ``start .. start+length-1`` as one ``lax.scan`` (``_run``'s loop, in parts)."""

    def one(c, k, cy):
        steps = start + jnp.arange(length, dtype=jnp.int32)
        return jax.lax.scan(functools.partial(_iteration, fns, c, k), cy, steps)

    if stacked_teacher is None:
        return one(ctx, k_loop, carry)
    return jax.vmap(one, in_axes=(_group_axes(stacked_teacher), 0, 0))(ctx, k_loop, carry)


def _run_chunks(
    fns: _Fns,
    ctx: dict,
    key,
    init,
    should_stop: Callable[[], bool],
    chunk: int,
    stacked_teacher: bool | None = None,
):
    """``_run``'s (``_run_many``'s) scan in chunks of ``chunk`` iterations, ``should_stop``
    checked between them: the same arithmetic, and a stop request waits one chunk at most."""
    many = stacked_teacher is not None
    carry, k_loop = _host_start(fns.static, ctx["hyper"], ctx["targets"], key, init, many)
    carry = _like_iteration_outputs(carry, ctx)
    total, history = fns.static.iterations, []
    for start in range(0, total, chunk):
        _check_stop(should_stop, start, total)
        length = min(chunk, total - start)
        carry, parts = _scan_chunk(
            fns, ctx, k_loop, carry, jnp.int32(start), length, stacked_teacher
        )
        history.append(parts)
    stacked = {k: jnp.concatenate([h[k] for h in history], axis=-1) for k in history[0]}
    return _host_finish(fns, ctx, carry[0], stacked, stacked_teacher)


def _run_host(
    fns: _Fns,
    ctx: dict,
    key,
    init,
    stacked_teacher: bool | None = None,
    should_stop: Callable[[], bool] | None = None,
):
    """``_run``'s loop dispatched from Python, one compiled iteration at a time (with
    ``stacked_teacher`` not None: ``_run_many``'s, every iteration ``vmap``ped over groups).

    XLA:CPU runs convolutions inside a while loop (a scan) far slower than at a program's top
    level (2.7x on W4, BENCHMARKS.md; 3x on the split-digits ResNet), so on CPU this is the
    faster path; the arithmetic is the same. Nothing leaves the device inside the loop: the
    per-iteration parts stay device arrays until they are stacked."""
    many = stacked_teacher is not None
    carry, k_loop = _host_start(fns.static, ctx["hyper"], ctx["targets"], key, init, many)
    carry = _like_iteration_outputs(carry, ctx)
    history = []
    for i in range(fns.static.iterations):
        _check_stop(should_stop, i, fns.static.iterations)
        carry, parts = _host_iteration(fns, ctx, k_loop, carry, jnp.int32(i), stacked_teacher)
        history.append(parts)
    # Iterations on the last axis: [T] alone, [G,T] over groups, as the scan returns them.
    stacked = {k: jnp.stack([h[k] for h in history], axis=-1) for k in history[0]}
    return _host_finish(fns, ctx, carry[0], stacked, stacked_teacher)


def _prepare(
    teacher, teacher_vars, cfg, targets, init, student, student_vars, image_shape, class_mask, lead
) -> tuple[_Fns, dict]:
    """Checks the arguments; the static half and the traced half of a synthesis."""
    targets = jnp.asarray(targets)
    if targets.ndim - lead not in (1, 3):
        raise ValueError(
            f"targets must be class ids [N] or dense labels [N,H,W], got shape {targets.shape}"
        )
    if init is not None:
        image_shape = tuple(init.shape[lead + 1 :])
    if targets.ndim - lead == 3 and tuple(targets.shape[lead + 1 :]) != tuple(image_shape[:2]):
        raise ValueError(f"dense targets {targets.shape} do not match image shape {image_shape}")
    use_adi = cfg.adi_scale != 0.0
    if use_adi and (student is None or student_vars is None):
        raise ValueError("adi_scale != 0 needs a student and student_vars")
    static, hyper = _split_config(cfg, use_adi, image_shape)
    fns = _Fns(teacher, student if use_adi else None, static)
    ctx = {
        "hyper": hyper,
        "teacher_vars": tuple(teacher_vars),
        "student_vars": tuple(student_vars) if use_adi else None,
        "targets": targets,
        "class_mask": class_mask,
    }
    return fns, ctx


def _loop(loop: str) -> str:
    if loop not in ("auto", "scan", "host"):
        raise ValueError(f"loop must be 'auto', 'scan' or 'host', got {loop!r}")
    if loop == "auto":
        return "host" if jax.default_backend() == "cpu" else "scan"
    return loop


def synthesize(
    teacher: TeacherFn,
    teacher_vars: tuple[PyTree, PyTree],
    targets: jax.Array,
    key: jax.Array,
    cfg: DIConfig = DEFAULT,
    *,
    init: jax.Array | None = None,
    student: TeacherFn | None = None,
    student_vars: tuple[PyTree, PyTree] | None = None,
    image_shape: tuple[int, int, int] = (32, 32, 3),
    class_mask: jax.Array | None = None,
    loop: str = "auto",
    should_stop: Callable[[], bool] | None = None,
    chunk: int = 50,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Inverts ``teacher`` into a batch of images: one compiled program (``loop="scan"``) or one
    compiled iteration dispatched per step (``loop="host"``, the CPU default).

    Args:
      teacher: ``teacher(params, batch_stats, images) -> (logits, moments)`` (``make_teacher_fn``).
        Static under jit: build it once (``make_teacher_fn`` caches per graphdef).
      teacher_vars: ``(params, batch_stats)``.
      targets: class ids ``int [N]`` (CE of the logits ``[N,K]``) or dense labels ``int [N,H,W]``
        (per-pixel CE, 255 ignored).
      key: PRNG key. ``split(key)`` gives the random start's key and the loop's; iteration ``i``
        draws its roll and flip with ``draw_jitter(fold_in(loop_key, i), jitter, flip)``.
      cfg: hyperparameters; floats are traced (changing them does not recompile), the iteration
        counts, jitter, flip, clip and whether ADI is on are static.
      init: ``[N,H,W,C]`` start (class impressions start from class means); default
        ``init_std * N(0, 1)`` of ``image_shape``.
      student, student_vars: the ADI student, same calling convention; used iff ``cfg.adi_scale``.
      image_shape: ``(H, W, C)`` without ``init``.
      class_mask: ``bool [K]``; logits outside it are masked (a teacher sized to the stream's
        ``max_classes`` knows only its seen classes).
      loop: "scan" (one program: ``lax.scan`` inside ``jit``), "host" (one compiled iteration
        dispatched ``iterations`` times from Python; same arithmetic, faster on XLA:CPU) or
        "auto" (host on the CPU backend, scan on accelerators).
      should_stop: checked before every host iteration, or between scans of ``chunk``
        iterations (the scan then runs in chunks: the same arithmetic); when it says so,
        ``stopping.Stopped`` is raised. None: never checked, the scan is one program.

    Returns:
      ``images float32 [N,H,W,C]`` (within ``cfg.clip``) and ``info``: per iteration ``[T]``
      (before that iteration's update, on its jittered copy) ``total``, ``main`` (CE), ``bn``
      (unweighted ``R_feature``), ``tv_l1``, ``tv_l2``, ``l2``, ``adi``, ``accuracy`` (teacher's
      argmax vs targets) and ``lr``; and on the returned images, un-jittered, ``final_main``,
      ``final_bn`` and ``final_accuracy``.
    """
    fns, ctx = _prepare(
        teacher, teacher_vars, cfg, targets, init, student, student_vars, image_shape, class_mask, 0
    )
    if _loop(loop) == "host":
        return _run_host(fns, ctx, key, init, should_stop=should_stop)
    if should_stop is not None:
        return _run_chunks(fns, ctx, key, init, should_stop, chunk)
    return _run(fns, ctx, key, init)


def synthesize_many(
    teacher: TeacherFn,
    teacher_vars: tuple[PyTree, PyTree],
    targets: jax.Array,
    keys: jax.Array,
    cfg: DIConfig = DEFAULT,
    *,
    init: jax.Array | None = None,
    student: TeacherFn | None = None,
    student_vars: tuple[PyTree, PyTree] | None = None,
    image_shape: tuple[int, int, int] = (32, 32, 3),
    class_mask: jax.Array | None = None,
    stacked_teacher: bool = False,
    loop: str = "auto",
    should_stop: Callable[[], bool] | None = None,
    chunk: int = 50,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``G`` independent syntheses in one compiled program (``vmap`` of ``synthesize``'s loop).

    Each group has its own batch statistics, jitter draws and Adam state, exactly as if run
    alone with the same key. Args as ``synthesize`` with a leading group axis on ``targets``
    (``[G,N]`` or ``[G,N,H,W]``), ``keys`` (``[G]``) and ``init`` (``[G,N,H,W,C]``); with
    ``stacked_teacher`` every leaf of ``teacher_vars`` has a leading ``G`` axis too (one teacher
    per group, same architecture). The student and ``class_mask`` are shared.

    ``loop``, ``should_stop`` and ``chunk`` as ``synthesize``'s (the host loop ``vmap``s each
    iteration over the groups).

    Returns ``images [G,N,H,W,C]`` and ``info`` with a leading ``G`` axis on every entry.
    """
    fns, ctx = _prepare(
        teacher, teacher_vars, cfg, targets, init, student, student_vars, image_shape, class_mask, 1
    )
    stacked = bool(stacked_teacher)
    if _loop(loop) == "host":
        return _run_host(fns, ctx, keys, init, stacked_teacher=stacked, should_stop=should_stop)
    if should_stop is not None:
        return _run_chunks(fns, ctx, keys, init, should_stop, chunk, stacked_teacher=stacked)
    return _run_many(fns, ctx, keys, init, stacked)
