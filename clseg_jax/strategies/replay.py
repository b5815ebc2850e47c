"""Experience replay (ER; Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning").

Every step trains on the new batch followed by ``replay_batch`` rows drawn uniformly (without
replacement) from a fixed-size memory; the task loss is the cross-entropy over all of them, as in
Avalanche's replay. The memory is rebuilt after each phase by a selection policy
(``memory.selection``: reservoir, random per experience, experience- or class-balanced, herding).

Rows are stored as the phase saw them (background shift included) and without augmentation.
While the memory is empty the replayed rows are copies of new rows with ignored labels: the step
keeps one shape from the first experience on and they add no loss.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from clseg_jax.memory import buffer, selection, update
from clseg_jax.strategies import base

DEFAULTS = {
    "replay_mem_size": 200,  # rows in memory (BENCHMARKS.md W2: 200)
    "replay_batch": 32,  # replayed rows per step, added to the new batch (W2: 32 + 32)
    "replay_policy": "reservoir",
}

# What each field of DEFAULTS sets (the hyperparameter table of docs/strategies.md).
HELP = {
    "replay_mem_size": "rows in the episodic memory (BENCHMARKS.md W2: 200)",
    "replay_batch": "replayed rows per step, added to the new batch (W2: 32 + 32)",
    "replay_policy": (
        "selection policy: `reservoir`, `random`, `experience_balanced`, `class_balanced` or "
        "`herding` (see Episodic memory)"
    ),
}


def memory_rng(seed: int, phase_index: int, salt: int) -> np.random.Generator:
    """The selection generator for one phase: fixed by the run's seed, different per phase."""
    return np.random.default_rng([seed, phase_index, salt])


def make(cfg: ml_collections.ConfigDict, env: base.Env) -> base.Strategy:
    selection.check(cfg.replay_policy)
    size, n = int(cfg.replay_mem_size), int(cfg.replay_batch)
    if not 1 <= n <= size:
        raise ValueError(f"replay_batch must be in 1..replay_mem_size={size}, got {n}")
    row_fn = update.make_features_fn(env.forward) if cfg.replay_policy == "herding" else None

    def init(params, batch_stats):
        del params, batch_stats
        return buffer.empty(size, env.image_shape, env.label_shape)

    def prepare_batch(batch, sstate, key):
        rows, ok = buffer.sample(sstate, key, n)
        return buffer.append_replay(batch, rows, ok)

    def after_phase(params, batch_stats, sstate, phase):
        return update.update(
            sstate,
            phase,
            cfg.replay_policy,
            memory_rng(env.seed, phase.index, 0),
            num_classes=env.num_classes,
            num_experiences=env.num_experiences,
            params=params,
            batch_stats=batch_stats,
            row_fn=row_fn,
        )

    return base.Strategy(init=init, prepare_batch=prepare_batch, after_phase=after_phase)
