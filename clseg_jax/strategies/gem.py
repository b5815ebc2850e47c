"""GEM (Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017).

Each past experience k keeps ``gem_mem_per_exp`` random rows (a fixed block of the memory). Every
step computes the memory gradient g_k of each filled block at the current parameters; if any
g . g_k < 0 the update becomes g~ = G^T v + g with v the solution of the dual QP
``min_v 1/2 v^T (G G^T + eps I) v + (G g)^T v, v >= margin`` (``solvers.qp.gem_project``), so that
g~ . g_k >= 0 for every k. g is the whole gradient the step would apply (task loss plus any
chained penalty).

Blocks exist for the first T-1 experiences only (the last one's memory would never be used).
On accelerators the memory gradients run one block after another (``lax.map``), each behind a
``lax.cond`` on whether the block holds rows, so a step pays only for the experiences seen so far.
XLA:CPU emits its own convolutions inside control flow as plain loops (``experiments/
bench_memory.py`` measured a conv gradient 37x slower inside ``lax.cond``), so on CPU with
``conv_impl="xla"`` every block is computed as straight-line code and empty blocks are masked out
instead; oneDNN's convolutions (custom calls) run as fast inside ``lax.cond`` as outside (1.0x,
same benchmark), so with ``conv_impl="onednn"`` the CPU takes the accelerators' path. The QP
runs only when a constraint is violated. Memory forwards use train-mode normalisation (batch
statistics of the block, as the reference computes them) and their BatchNorm updates are dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax
from jax.flatten_util import ravel_pytree

from clseg_jax import losses, tasks
from clseg_jax.memory import buffer, update
from clseg_jax.solvers import qp
from clseg_jax.strategies import base, replay

DEFAULTS = {
    "gem_mem_per_exp": 32,  # memory rows per experience (the Avalanche comparison's 32)
    "gem_margin": 0.5,  # memory strength gamma: dual variables v >= margin
    "gem_eps": 1e-3,  # ridge on G G^T, as in the reference code
}

# What each field of DEFAULTS sets (the hyperparameter table of docs/strategies.md).
HELP = {
    "gem_mem_per_exp": "memory rows per experience (the Avalanche comparison's 32)",
    "gem_margin": "memory strength gamma: dual variables `v >= margin`",
    "gem_eps": "ridge on `G G^T` in the dual QP, as in the reference code",
}


def memory_gradient(
    forward: base.Forward, task: tasks.Task, inputs: base.LossInputs, rows: dict, ok: jax.Array
) -> jax.Array:
    """Flat gradient ``[n]`` of the task loss on memory rows (rows where ``ok`` is False add
    nothing) at ``inputs.params``; train-mode forward, statistics update dropped."""

    def loss(p):
        out, _ = forward(p, inputs.batch_stats, rows["image"], True)
        logits = losses.mask_logits(out["logits"], inputs.class_mask)
        return task.loss(logits, buffer.ignore_labels(rows["label"], ok), inputs.class_mask)

    return ravel_pytree(jax.grad(loss)(inputs.params))[0]


def memory_gradients(
    env: base.Env,
    inputs: base.LossInputs,
    memory: buffer.Buffer,
    filled: jax.Array,
    q: int,
    *,
    skip: bool,
) -> jax.Array:
    """``G [blocks, n]``: the memory gradient of each block of ``q`` rows, 0 where not ``filled``.

    ``skip``: run blocks in a ``lax.map`` and skip empty ones with ``lax.cond`` (accelerators);
    else straight-line code over every block (XLA:CPU, see the module docstring).
    """
    blocks = filled.shape[0]
    zeros = jnp.zeros_like(ravel_pytree(inputs.params)[0])

    def block_grad(k):
        rows, ok = buffer.block(memory, k * q, q)
        return memory_gradient(env.forward, env.task, inputs, rows, ok)

    if skip:
        return lax.map(
            lambda k: lax.cond(filled[k], lambda: block_grad(k), lambda: zeros),
            jnp.arange(blocks),
        )
    return jnp.stack([jnp.where(filled[k], block_grad(k), 0.0) for k in range(blocks)])


def control_flow_is_free(env: base.Env) -> bool:
    """Whether the CPU may skip work with ``lax.cond`` / ``lax.map`` (module docstring): yes with
    oneDNN's convolutions, no with XLA:CPU's."""
    return env.conv_impl == "onednn"


def fill_block(env: base.Env, blocks: int, salt: int):
    """``after_phase``: experience i's random rows into memory block i (GEM, A-GEM); the last
    experience's memory would never be used, so it is not stored."""

    def after_phase(params, batch_stats, sstate, phase):
        del params, batch_stats
        if phase.index >= blocks:
            return sstate
        return update.update(
            sstate,
            phase,
            "random",
            replay.memory_rng(env.seed, phase.index, salt),
            num_classes=env.num_classes,
            num_experiences=blocks,
        )

    return after_phase


def make(cfg: ml_collections.ConfigDict, env: base.Env) -> base.Strategy:
    q, T = int(cfg.gem_mem_per_exp), env.num_experiences
    if q < 1:
        raise ValueError(f"gem_mem_per_exp must be >= 1, got {q}")
    blocks = max(T - 1, 1)

    def init(params, batch_stats):
        del params, batch_stats
        return buffer.empty(q * blocks, env.image_shape, env.label_shape)

    def transform_grads(grads, inputs, sstate, key):
        del key
        g, unravel = ravel_pytree(grads)
        filled = jnp.any(sstate.valid.reshape(blocks, q), axis=1)
        G = lax.platform_dependent(
            filled,
            cpu=lambda f: memory_gradients(
                env, inputs, sstate, f, q, skip=control_flow_is_free(env)
            ),
            default=lambda f: memory_gradients(env, inputs, sstate, f, q, skip=True),
        )
        return unravel(qp.gem_project(g, G, filled, cfg.gem_margin, cfg.gem_eps))

    return base.Strategy(
        init=init, transform_grads=transform_grads, after_phase=fill_block(env, blocks, salt=1)
    )
