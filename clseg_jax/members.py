"""Who the members of an ensemble are, and the members axis they are trained over.

``config.ensemble`` turns one run into N *members* trained as one compiled program
(``clseg_jax/ensemble.py``): every seed of ``seeds`` times every point of the ``sweep`` grid.

  seeds: ``(0, 1, 2, 3)``; empty: the config's own seed.
  sweep: a dict literal as a string, ``"{'strategy.ewc_lambda': (10., 100., 1000.)}"`` (the
    command line cannot override a dict); several fields give their grid.
  shuffle_per_member: each member reads the batches of its own seed; otherwise every member
    reads those of ``data_order_seed`` (unset: the config's seed), so members differ only in
    what is swept.
  chunk: members computed side by side (``jax.vmap``) at a time; the groups follow one another
    in the same program (``vectorize``). 0: ``auto`` = 1 on CPU, where a vmapped convolution
    becomes a grouped one that XLA's CPU backend runs several times slower than the separate
    ones (experiments/bench_ensemble.py), all members on GPU/TPU.

Sweepable: the float hyperparameters of the strategies in ``strategy.name`` (read inside the
step as arrays, and by each member's own between-phase hooks) and ``optimizer.lr`` /
``optimizer.lr_next`` (the step reads the rate from the optimizer state). Anything else (a
memory size, a batch size, a policy) sets shapes or code paths and is refused with one line.
"""

from __future__ import annotations

import ast
import difflib
import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import config_dict

from clseg_jax import strategies

MEMBER = "member"  # the mesh axis the members may be sharded over
OPTIMIZER_FIELDS = ("optimizer.lr", "optimizer.lr_next")


def fields() -> ml_collections.ConfigDict:
    """``config.ensemble``'s defaults: one member."""
    return ml_collections.ConfigDict(
        {
            "seeds": (),
            "sweep": "",
            "shuffle_per_member": False,
            "data_order_seed": config_dict.placeholder(int),
            "chunk": 0,
        }
    )


class Member(NamedTuple):
    """One member: its seed, its swept values (``{"strategy.ewc_lambda": 10.0}``) and the config
    of the separate run it equals (seed, swept values and data order set; one member)."""

    index: int
    seed: int
    values: dict[str, float]
    config: ml_collections.ConfigDict


def enabled(config: ml_collections.ConfigDict) -> bool:
    e = config.get("ensemble", None)
    return bool(e and (len(e.seeds) > 0 or e.sweep))


def order_seed(config: ml_collections.ConfigDict) -> int:
    """The seed the training batches are shuffled with."""
    e = config.get("ensemble", None)
    given = e.get("data_order_seed", None) if e else None
    return int(config.seed if given is None else given)


# Float fields a strategy uses outside arithmetic inside its step, so they cannot be arrays
# there; tests/test_contract.py traces every strategy's step with each of its float fields as an
# array and checks that exactly these fail.
UNSWEEPABLE = {
    "strategy.di_logit_mse": "a Python branch skips the logit MSE when it is 0",
    "strategy.ccsi_replay_fraction": "it sets the replayed rows per step, a shape",
}


def float_fields(config: ml_collections.ConfigDict) -> list[str]:
    """``strategy.<field>`` for every float hyperparameter of ``config``'s strategies."""
    out = []
    for name in strategies.names(config.strategy.name):
        for key, value in getattr(strategies.module_of(name), "DEFAULTS", {}).items():
            if isinstance(value, float) and f"strategy.{key}" not in out:
                out.append(f"strategy.{key}")
    return out


def sweepable(config: ml_collections.ConfigDict) -> list[str]:
    """The fields ``config``'s strategy can sweep (module docstring)."""
    return [*OPTIMIZER_FIELDS, *(f for f in float_fields(config) if f not in UNSWEEPABLE)]


def parse_sweep(config: ml_collections.ConfigDict) -> dict[str, tuple[float, ...]]:
    """``config.ensemble.sweep`` as ``{field: values}``; one-line errors for what cannot be
    swept."""
    text = config.ensemble.sweep
    if not text:
        return {}
    example = "e.g. \"{'strategy.ewc_lambda': (10., 100.)}\""
    try:
        sweep = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        sweep = None
    if not isinstance(sweep, dict) or not sweep:
        raise ValueError(
            f"config.ensemble.sweep={text!r} is not a dict of field: values; {example}"
        )
    valid = sweepable(config)
    every = _every_field(config)
    out = {}
    for field, values in sweep.items():
        if not isinstance(field, str) or field not in every:
            close = difflib.get_close_matches(str(field), every, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"config.ensemble.sweep: no field {field!r}{hint} sweepable: {valid}")
        if field not in valid:
            why = _why_not(config, field)
            raise ValueError(
                f"config.ensemble.sweep: {field!r} cannot be swept ({why}); sweepable here: {valid}"
            )
        values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
        if not values or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        ):
            raise ValueError(
                f"config.ensemble.sweep: {field!r} needs a tuple of numbers, got {values!r}"
            )
        out[field] = tuple(float(v) for v in values)
    return out


def _every_field(config: ml_collections.ConfigDict) -> list[str]:
    out = []
    for section in ("strategy", "optimizer"):
        out += [f"{section}.{k}" for k in config[section].keys()]
    return out


def _why_not(config: ml_collections.ConfigDict, field: str) -> str:
    section, key = field.split(".", 1)
    value = config[section][key]
    if field in UNSWEEPABLE:
        return UNSWEEPABLE[field]
    if section == "optimizer":
        return "only the learning rates of the optimizer are arrays in the step"
    if not isinstance(value, float):
        kind = {"int": "an integer", "bool": "a switch", "str": "a name"}
        return f"{kind.get(type(value).__name__, 'not a float')}: it sets shapes, loops or code"
    owners = [
        n for n in strategies.STRATEGIES if key in getattr(strategies.module_of(n), "DEFAULTS", {})
    ]
    return f"read by {owners}, not by strategy {config.strategy.name!r}"


def make(config: ml_collections.ConfigDict) -> list[Member]:
    """The members of ``config``'s ensemble (one, the run itself, without one); raises one
    line for what cannot be an ensemble."""
    if not enabled(config):
        return [Member(0, int(config.seed), {}, config)]
    e = config.ensemble
    seeds = tuple(int(s) for s in e.seeds) or (int(config.seed),)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"config.ensemble.seeds has repeats: {seeds}")
    if int(e.chunk) < 0:
        raise ValueError(f"config.ensemble.chunk must be >= 0 (0: auto), got {e.chunk}")
    sweep = parse_sweep(config)
    out = []
    grid = list(itertools.product(*sweep.values()))
    for seed in seeds:
        for point in grid:
            values = dict(zip(sweep, point, strict=True))
            out.append(Member(len(out), seed, values, _member_config(config, seed, values)))
    return out


def _member_config(config, seed: int, values: dict[str, float]) -> ml_collections.ConfigDict:
    c = config.copy_and_resolve_references()
    c.seed = seed
    for field, value in values.items():
        section, key = field.split(".", 1)
        c[section][key] = value
    order = seed if config.ensemble.shuffle_per_member else order_seed(config)
    c.ensemble = fields()
    c.ensemble.data_order_seed = order
    return c


class Overlay:
    """``config.strategy`` with some fields replaced (by a member's traced values): what a
    strategy factory reads inside the ensemble's step."""

    def __init__(self, base: ml_collections.ConfigDict, values: dict[str, Any]):
        self._base, self._values = base, values

    def __getattr__(self, key: str):
        values = self.__dict__["_values"]
        return values[key] if key in values else getattr(self.__dict__["_base"], key)

    def __getitem__(self, key: str):
        return self._values[key] if key in self._values else self._base[key]

    def __contains__(self, key: str) -> bool:
        return key in self._values or key in self._base

    def get(self, key: str, default=None):
        return self._values[key] if key in self._values else self._base.get(key, default)


def auto_chunk(chunk: int, size: int) -> int:
    """Members vectorised at a time (module docstring)."""
    if chunk:
        return min(int(chunk), size)
    return 1 if jax.default_backend() == "cpu" else size


def vectorize(
    fn: Callable,
    in_axes: Sequence[int | None],
    size: int,
    chunk: int,
    mesh: Mesh | None = None,
) -> Callable:
    """``fn`` over a leading members axis of the arguments whose ``in_axes`` is 0 (the others
    shared): ``jax.vmap`` for ``chunk >= size``; else the members in groups of ``chunk``, one
    copy of ``fn`` per group in the program (a group of one calls ``fn`` itself, not a size-1
    vmap). Unrolled rather than a ``lax.map`` loop: XLA's CPU backend ran convolutions inside a
    loop body ~35x slower than the same ones outside (measured here, jax 0.10.2). The outputs
    carry the members axis.

    With a ``mesh`` whose ``member`` axis has several devices, each device group computes its own
    members (``jax.shard_map``, manual over that axis only, the data axis still split by XLA):
    XLA's partitioner mis-splits the grouped convolutions a vmap over the members makes
    ("output feature dimension ... divisible by feature_group_count", jax 0.10.2)."""
    split = member_axis_size(mesh) if mesh is not None else 1
    if split > 1:
        local = vectorize(fn, in_axes, size // split, chunk)
        specs = tuple(PartitionSpec(MEMBER) if ax == 0 else PartitionSpec() for ax in in_axes)
        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=specs,
            out_specs=PartitionSpec(MEMBER),
            axis_names={MEMBER},
            check_vma=False,
        )
    group = jax.vmap(fn, in_axes=tuple(in_axes))
    if size > 1 and chunk >= size:
        return group

    def call(*args):
        outs = []
        for lo in range(0, size, chunk):
            hi = min(lo + chunk, size)
            if hi - lo == 1:
                picked = [
                    take(a, lo) if ax == 0 else a for a, ax in zip(args, in_axes, strict=True)
                ]
                outs.append(jax.tree.map(lambda x: x[None], fn(*picked)))
            else:
                picked = [
                    take(a, slice(lo, hi)) if ax == 0 else a
                    for a, ax in zip(args, in_axes, strict=True)
                ]
                outs.append(group(*picked))
        return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)

    return call


def take(tree, index):
    """Member ``index``'s slice of stacked arrays (or a ``slice`` of members)."""
    return jax.tree.map(lambda a: a[index], tree)


def placement(mesh: Mesh) -> NamedSharding:
    """Where per-member arrays with nothing else split go (metrics, statistics, values)."""
    return sharded(NamedSharding(mesh, PartitionSpec()))


def sharded(sh: NamedSharding) -> NamedSharding:
    """``sh`` with a leading members dimension, split over the mesh's ``member`` axis if it has
    one (else replicated along it)."""
    lead = MEMBER if MEMBER in sh.mesh.axis_names else None
    return NamedSharding(sh.mesh, PartitionSpec(lead, *sh.spec))


def member_axis_size(mesh: Mesh) -> int:
    return int(mesh.shape.get(MEMBER, 1))
