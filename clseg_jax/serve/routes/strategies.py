"""``/strategies``: what a lineage may train with, for the page's strategy picker."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from clseg_jax import strategies
from clseg_jax.serve import lineage
from clseg_jax.serve.routes.deps import ERRORS, Owner

router = APIRouter()


class Param(BaseModel):
    name: str
    default: float | int | bool | str
    help: str


class StrategyOut(BaseModel):
    name: str
    params: list[Param]
    # Per lineage task ("segmentation", "classification"): None when a lineage of that task can
    # use it, else why not (iCaRL classifies; MiB, PLOP, ... segment).
    unavailable: dict[str, str | None]


def _catalogue() -> list[StrategyOut]:
    out = []
    for name in strategies.STRATEGIES:
        module = strategies.module_of(name)
        helps = getattr(module, "HELP", {})
        params = [
            Param(name=k, default=v, help=helps.get(k, ""))
            for k, v in getattr(module, "DEFAULTS", {}).items()
            if isinstance(v, float | int | bool | str)
        ]
        why: dict[str, str | None] = {}
        for task, model in (("segmentation", "unet"), ("classification", "resnet18")):
            try:
                lineage.validate_spec({"strategy": name, "model": model})
                why[task] = None
            except ValueError as err:
                why[task] = str(err)
        out.append(StrategyOut(name=name, params=params, unavailable=why))
    return out


@router.get("/strategies", responses=ERRORS)
def list_strategies(who: Owner, request: Request) -> list[StrategyOut]:
    """Every registered strategy with its hyperparameters (defaults and what they set), and
    whether a lineage of each task can use it; ``+`` chains of them are valid too."""
    del who
    state: Any = request.app.state
    if getattr(state, "strategies", None) is None:  # built once per app: it builds each one
        state.strategies = _catalogue()
    return state.strategies
