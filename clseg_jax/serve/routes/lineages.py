"""``/lineages``: models that learn a stream of uploaded experiences, and their versions."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, Field
from sqlalchemy import orm

from clseg_jax.serve import garbage, lineage
from clseg_jax.serve.db import Lineage, Version, Weights
from clseg_jax.serve.routes.deps import ERRORS, Id, Owner, Session, Strict, Svc, get_owned
from clseg_jax.serve.routes.versions import VersionOut, version_out
from clseg_jax.serve.routes.weights import weights_path

router = APIRouter()


_D = lineage.SPEC_DEFAULTS


class LineageIn(Strict):
    name: str = Field(min_length=1, max_length=128)
    num_classes: int = Field(_D["num_classes"], ge=2, le=255)
    class_names: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        [], max_length=255
    )
    image_size: list[Annotated[int, Field(ge=1, le=1024)]] = Field(
        _D["image_size"], min_length=2, max_length=2
    )
    kind: Literal["domain", "class"] = _D["kind"]
    model: Literal[lineage.SEG_MODELS + lineage.CLS_MODELS] = _D["model"]
    pretrained: str = Field(_D["pretrained"], max_length=32)
    strategy: str = Field(_D["strategy"], min_length=1, max_length=128)
    strategy_params: dict[str, float | int | bool | str] = Field({}, max_length=64)
    model_widths: list[Annotated[int, Field(ge=1, le=512)]] = Field(
        _D["model_widths"], min_length=2, max_length=5
    )
    max_experiences: int = Field(_D["max_experiences"], ge=1, le=256)
    epochs: int = Field(_D["epochs"], ge=1, le=1000)
    batch_size: int = Field(_D["batch_size"], ge=1, le=1024)
    optimizer: Literal[lineage.OPTIMIZERS] = _D["optimizer"]
    lr: float = Field(_D["lr"], gt=0, le=10)
    checkpoint_every_steps: int = Field(_D["checkpoint_every_steps"], ge=0, le=10**6)
    seed: int = Field(_D["seed"], ge=0, le=2**31 - 1)
    precision: Literal["float32", "bfloat16", "auto"] = _D["precision"]


class LineageOut(BaseModel):
    id: str
    name: str
    spec: dict[str, Any]
    # "segmentation" (a class per pixel; uploads hold masks) or "classification" (a ResNet: a
    # class per image; uploads hold [N] class ids). Fixed by the spec's model.
    task: Literal["segmentation", "classification"]
    created_at: float
    versions: int
    latest_version: str | None
    accuracy_matrix: list[list[float | None]]
    # A fork's starting point (``POST /lineages/{id}/fork``): the version it continues from.
    origin: dict[str, Any] | None


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
        task=lineage.task_of(lin.spec),
        created_at=lin.created_at,
        versions=len(versions),
        latest_version=latest.id if latest else None,
        accuracy_matrix=latest.metrics["accuracy_matrix"] if latest else [],
        origin=(
            None
            if not lin.origin
            else {k: lin.origin[k] for k in ("lineage_id", "version_id", "number", "dataset_ids")}
        ),
    )


@router.post("/lineages", status_code=201, responses={**ERRORS, 400: {}})
def create_lineage(who: Owner, s: Session, svc: Svc, body: LineageIn) -> LineageOut:
    spec = body.model_dump()
    name = spec.pop("name")
    try:
        spec = lineage.validate_spec(spec)
        if spec["pretrained"]:  # the weights must be this owner's and fit the model
            w = get_owned(s, Weights, spec["pretrained"], who, "weights")
            lineage.check_pretrained(spec, weights_path(svc, w))
    except ValueError as err:
        raise HTTPException(400, str(err)) from None
    row = Lineage(owner=who, name=name, spec=spec)
    s.add(row)
    s.commit()
    return lineage_out(s, row)


class LineagePatch(Strict):
    name: str = Field(min_length=1, max_length=128)


@router.patch("/lineages/{lineage_id}", responses=ERRORS)
def rename_lineage(who: Owner, s: Session, lineage_id: Id, body: LineagePatch) -> LineageOut:
    lin = get_owned(s, Lineage, lineage_id, who, "lineage")
    lin.name = body.name
    s.commit()
    return lineage_out(s, lin)


@router.delete("/lineages/{lineage_id}", status_code=204, responses={**ERRORS, 409: {}})
def delete_lineage(who: Owner, s: Session, svc: Svc, lineage_id: Id) -> Response:
    """Deletes a lineage, its versions (state and weights) and its ended jobs; 409 while one of
    its jobs is queued or running. Its datasets stay."""
    get_owned(s, Lineage, lineage_id, who, "lineage")
    s.close()
    try:
        garbage.delete_lineage(svc.engine, svc.objects, lineage_id)
    except garbage.InUse as err:
        raise HTTPException(409, str(err)) from None
    return Response(status_code=204)


class ForkIn(Strict):
    name: str = Field(min_length=1, max_length=128)
    version: int = Field(ge=1)


@router.post("/lineages/{lineage_id}/fork", status_code=201, responses=ERRORS)
def fork_lineage(who: Owner, s: Session, lineage_id: Id, body: ForkIn) -> LineageOut:
    """A new lineage with the same spec that continues from ``version`` (a number of this
    lineage): its first job trains on top of that version's full CL state, after the same
    experiences. The parent is untouched."""
    lin = get_owned(s, Lineage, lineage_id, who, "lineage")
    versions = _versions(s, lineage_id).all()
    at = [v for v in versions if v.number == body.version]
    if not at:
        have = [v.number for v in versions]
        raise HTTPException(
            404, f"lineage {lineage_id} has no version {body.version}; it has {have}"
        )
    v = at[0]
    earlier = [*(lin.origin or {}).get("dataset_ids", ())]
    earlier += [u.dataset_id for u in versions if u.number <= v.number]
    origin = {
        "lineage_id": lin.id,
        "version_id": v.id,
        "number": v.number,
        "state": dict(v.state),
        "dataset_ids": earlier,
    }
    row = Lineage(owner=who, name=body.name, spec=dict(lin.spec), origin=origin)
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
