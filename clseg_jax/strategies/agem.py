"""A-GEM (Chaudhry et al., "Efficient Lifelong Learning with A-GEM", ICLR 2019).

One constraint instead of GEM's one per experience: g_ref is the gradient on ``agem_sample_size``
rows drawn uniformly from the memory of all past experiences (``agem_mem_per_exp`` random rows
each), and when g . g_ref < 0 the update becomes g - (g . g_ref / ||g_ref||^2) g_ref
(``solvers.qp.agem_project``). Before the first experience ends the memory is empty: on
accelerators the extra gradient pass is skipped (``lax.cond``); on CPU it runs on ignored rows
and gives g_ref = 0 (see gem.py for why CPU avoids the cond).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from jax import lax
from jax.flatten_util import ravel_pytree

from clseg_jax.memory import buffer
from clseg_jax.solvers import qp
from clseg_jax.strategies import base, gem

DEFAULTS = {
    "agem_mem_per_exp": 32,  # memory rows per experience
    "agem_sample_size": 32,  # rows per step for the reference gradient
}

# What each field of DEFAULTS sets (the hyperparameter table of docs/strategies.md).
HELP = {
    "agem_mem_per_exp": "memory rows per experience",
    "agem_sample_size": "rows per step drawn from all past experiences' memory for `g_ref`",
}


def make(cfg: ml_collections.ConfigDict, env: base.Env) -> base.Strategy:
    q, n = int(cfg.agem_mem_per_exp), int(cfg.agem_sample_size)
    blocks = max(env.num_experiences - 1, 1)  # the last experience's memory is never used
    size = q * blocks
    if not 1 <= n <= size:
        raise ValueError(f"agem_sample_size must be in 1..{size} (memory rows), got {n}")

    def init(params, batch_stats):
        del params, batch_stats
        return buffer.empty(size, env.image_shape, env.label_shape)

    def transform_grads(grads, inputs, sstate, key):
        g, unravel = ravel_pytree(grads)
        rows, ok = buffer.sample(sstate, key, n)

        def ref_grad(any_ok):
            return lax.cond(
                any_ok,
                lambda: gem.memory_gradient(env.forward, env.task, inputs, rows, ok),
                lambda: jnp.zeros_like(g),
            )

        def straight(any_ok):  # gem.py: XLA:CPU runs its convolutions in a cond as plain loops
            del any_ok
            return gem.memory_gradient(env.forward, env.task, inputs, rows, ok)

        cpu = ref_grad if gem.control_flow_is_free(env) else straight
        g_ref = lax.platform_dependent(jnp.any(ok), cpu=cpu, default=ref_grad)
        return unravel(qp.agem_project(g, g_ref))

    return base.Strategy(
        init=init, transform_grads=transform_grads, after_phase=gem.fill_block(env, blocks, salt=2)
    )
