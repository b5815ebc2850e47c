"""Joint and cumulative training: upper bounds that keep all past data (they change the schedule).

- ``joint``: one phase over the union of every experience's training data (one row of R).
- ``cumulative``: phase i trains on the union of experiences 0..i, so nothing is forgotten for
  lack of data; its cost grows with the stream.
In a class-incremental stream the union's labels are those of the classes seen by that phase.
"""

from __future__ import annotations

import ml_collections

from clseg_jax.strategies import base


def joint_schedule(num_experiences: int) -> tuple[tuple[int, ...], ...]:
    return (tuple(range(num_experiences)),)


def cumulative_schedule(num_experiences: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(range(i + 1)) for i in range(num_experiences))


def make_joint(cfg: ml_collections.ConfigDict, env: base.Env) -> base.Strategy:
    del cfg, env
    return base.Strategy(schedule=joint_schedule)


def make_cumulative(cfg: ml_collections.ConfigDict, env: base.Env) -> base.Strategy:
    del cfg, env
    return base.Strategy(schedule=cumulative_schedule)
