"""``/lineages``: models that learn a stream of uploaded experiences, and their versions."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field
from sqlalchemy import orm

from clseg_jax.serve import lineage
from clseg_jax.serve.db import Lineage, Version
from clseg_jax.serve.routes.deps import ERRORS, Id, Owner, Session, Strict, get_owned
from clseg_jax.serve.routes.versions import VersionOut, version_out

router = APIRouter()


class LineageIn(Strict):
    name: str = Field(min_length=1, max_length=128)
    num_classes: int = Field(2, ge=2, le=255)
    image_size: list[Annotated[int, Field(ge=1, le=1024)]] = Field(
        [64, 64], min_length=2, max_length=2
    )
    kind: Literal["domain", "class"] = "domain"
    strategy: str = Field("naive", min_length=1, max_length=128)
    strategy_params: dict[str, float | int | bool | str] = Field({}, max_length=64)
    model_widths: list[Annotated[int, Field(ge=1, le=512)]] = Field(
        [8, 16, 32], min_length=2, max_length=5
    )
    max_experiences: int = Field(16, ge=1, le=256)
    epochs: int = Field(2, ge=1, le=1000)
    batch_size: int = Field(8, ge=1, le=1024)
    lr: float = Field(0.01, gt=0, le=10)
    checkpoint_every_steps: int = Field(20, ge=0, le=10**6)
    seed: int = Field(0, ge=0, le=2**31 - 1)


class LineageOut(BaseModel):
    id: str
    name: str
    spec: dict[str, Any]
    created_at: float
    versions: int
    latest_version: str | None
    accuracy_matrix: list[list[float | None]]


def _versions(s: orm.Session, lineage_id: str):
    return s.scalars(
        sa.select(Version).where(Version.lineage_id == lineage_id).order_by(Version.number)
    )


def lineage_out(s: orm.Session, lin: Lineage) -> LineageOut:
    versions = _versions(s, lin.id).all()
    latest = versions[-1] if versions else None
    return LineageOut(
        id=lin.id,
        name=lin.name,
        spec=lin.spec,
        created_at=lin.created_at,
        versions=len(versions),
        latest_version=latest.id if latest else None,
        accuracy_matrix=latest.metrics["accuracy_matrix"] if latest else [],
    )


@router.post("/lineages", status_code=201, responses={**ERRORS, 400: {}})
def create_lineage(who: Owner, s: Session, body: LineageIn) -> LineageOut:
    spec = body.model_dump()
    name = spec.pop("name")
    try:
        spec = lineage.validate_spec(spec)
    except ValueError as err:
        raise HTTPException(400, str(err)) from None
    row = Lineage(owner=who, name=name, spec=spec)
    s.add(row)
    s.commit()
    return lineage_out(s, row)


@router.get("/lineages", responses=ERRORS)
def list_lineages(who: Owner, s: Session) -> list[LineageOut]:
    rows = s.scalars(
        sa.select(Lineage).where(Lineage.owner == who).order_by(Lineage.created_at)
    ).all()
    return [lineage_out(s, r) for r in rows]


@router.get("/lineages/{lineage_id}", responses=ERRORS)
def get_lineage(who: Owner, s: Session, lineage_id: Id) -> LineageOut:
    return lineage_out(s, get_owned(s, Lineage, lineage_id, who, "lineage"))


@router.get("/lineages/{lineage_id}/versions", responses=ERRORS)
def list_versions(who: Owner, s: Session, lineage_id: Id) -> list[VersionOut]:
    get_owned(s, Lineage, lineage_id, who, "lineage")
    return [version_out(v) for v in _versions(s, lineage_id)]
