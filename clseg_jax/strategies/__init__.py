"""Strategy registry. ``config.strategy.name`` is one name or several joined by '+' (chained).

Every factory has the signature ``make(cfg, env) -> base.Strategy`` where ``cfg`` is the whole
``config.strategy`` ConfigDict (each method reads its own prefixed fields, e.g. ``ewc_lambda``) and
``env`` a ``base.Env`` (forward function, class count, stream length). Each strategy module
declares its hyperparameters with their defaults in ``DEFAULTS`` and what each sets in ``HELP``
(docs/strategies.md's table is generated from both); ``default_hparams`` merges them into every
config, so any of them can be overridden with ``--config.strategy.<field>=<value>``.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import ml_collections

from clseg_jax.strategies import (
    agem,
    base,
    ccsi,
    deepinversion,
    der,
    ewc,
    gem,
    icarl,
    ilt,
    lfl,
    lwf,
    mas,
    mib,
    naive,
    plop,
    ppi,
    recall,
    rehearsal,
    replay,
    rwalk,
    si,
)

STRATEGIES: dict[str, Callable[..., base.Strategy]] = {
    "naive": naive.make,
    "joint": rehearsal.make_joint,
    "cumulative": rehearsal.make_cumulative,
    "si": si.make,
    "lwf": lwf.make,
    "lfl": lfl.make,
    "ewc": ewc.make,
    "mas": mas.make,
    "rwalk": rwalk.make,
    "replay": replay.make,
    "gem": gem.make,
    "agem": agem.make,
    "ppi": ppi.make,
    "der": der.make,
    "icarl": icarl.make,
    "recall": recall.make,
    "mib": mib.make,
    "ilt": ilt.make,
    "plop": plop.make,
    "deepinversion": deepinversion.make,
    "ccsi": ccsi.make,
}


# The modules of the registered factories, in registry order: their DEFAULTS go into every
# config.strategy (so registering a strategy is its one STRATEGIES line).
MODULES: tuple[types.ModuleType, ...] = tuple(
    dict.fromkeys(sys.modules[f.__module__] for f in STRATEGIES.values())
)


def module_of(name: str) -> types.ModuleType:
    """The module that defines registry name ``name`` (its ``DEFAULTS``, ``HELP``)."""
    return sys.modules[STRATEGIES[name].__module__]


def default_hparams() -> dict[str, Any]:
    """Every strategy's hyperparameters with their defaults (names are prefixed per method)."""
    out: dict[str, Any] = {}
    for module in MODULES:
        for key, value in getattr(module, "DEFAULTS", {}).items():
            if key in out:
                raise ValueError(f"hyperparameter {key!r} declared by two strategies")
            out[key] = value
    return out


def names(spec: str) -> list[str]:
    """Splits 'ewc+lwf' into registry names, raising a one-line error for unknown ones."""
    parts = [p.strip() for p in spec.split("+")]
    for p in parts:
        if p not in STRATEGIES:
            raise ValueError(f"unknown strategy {p!r}; valid: {sorted(STRATEGIES)}")
    return parts


def make(cfg: ml_collections.ConfigDict, env: base.Env) -> base.Strategy:
    """Builds ``config.strategy.name`` (chaining '+'-joined names)."""
    parts = names(cfg.name)
    return base.chain(*(STRATEGIES[n](cfg, env) for n in parts), names=tuple(parts))
