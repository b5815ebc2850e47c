"""``/datasets``: uploads of one experience's data, checked, normalised and content-addressed."""

from __future__ import annotations

from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, File, HTTPException, Query, Response, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from clseg_jax.serve import garbage, uploads
from clseg_jax.serve.db import Dataset
from clseg_jax.serve.routes.deps import (
    ERRORS,
    Id,
    Owner,
    Session,
    Strict,
    Svc,
    get_owned,
    read_upload,
)

router = APIRouter()


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # built from the ORM row

    id: str
    filename: str
    sha256: str
    size: int
    num_classes: int
    summary: dict[str, Any]
    created_at: float


def dataset_out(d: Dataset) -> DatasetOut:
    return DatasetOut.model_validate(d)


@router.post("/datasets", status_code=201, responses={**ERRORS, 413: {}, 400: {}, 409: {}})
def upload_dataset(
    who: Owner,
    s: Session,
    svc: Svc,
    file: Annotated[UploadFile, File(description="a .zip (docs/service.md layout) or .npz")],
    num_classes: Annotated[int, Query(ge=2, le=255)],
) -> DatasetOut:
    """Uploads one experience's data; masks are checked against ``num_classes`` classes.

    Stored content-addressed (normalised ``.npz``): re-uploading the same arrays returns
    the existing dataset, or 409 if it was uploaded with another ``num_classes``."""
    data = read_upload(file, svc)
    try:
        arrays = uploads.parse_upload(data, file.filename or "", num_classes, svc.limits)
    except uploads.UploadError as err:
        raise HTTPException(400, str(err)) from None
    row, created = svc.store_unique(
        s,
        Dataset,
        who,
        "datasets",
        uploads.to_npz_bytes(arrays),
        filename=(file.filename or "")[:255],
        num_classes=num_classes,
        summary=uploads.summary(arrays),
    )
    return dataset_out(row) if created else _same_upload(row, num_classes)


def _same_upload(existing: Dataset, num_classes: int) -> DatasetOut:
    """The dataset these bytes already are; 409 if it was uploaded with another class count
    (its masks were checked against that count, and lineages read it with it)."""
    if existing.num_classes != num_classes:
        raise HTTPException(
            409,
            f"this content was already uploaded as dataset {existing.id} with "
            f"num_classes={existing.num_classes}, not {num_classes}; upload it with "
            f"num_classes={existing.num_classes}",
        )
    return dataset_out(existing)


class DatasetPatch(Strict):
    filename: str = Field(min_length=1, max_length=255)


@router.patch("/datasets/{dataset_id}", responses=ERRORS)
def rename_dataset(who: Owner, s: Session, dataset_id: Id, body: DatasetPatch) -> DatasetOut:
    """Renames a dataset (its ``filename``); its content and id stay."""
    d = get_owned(s, Dataset, dataset_id, who, "dataset")
    d.filename = body.filename
    s.commit()
    return dataset_out(d)


@router.delete("/datasets/{dataset_id}", status_code=204, responses={**ERRORS, 409: {}})
def delete_dataset(who: Owner, s: Session, svc: Svc, dataset_id: Id) -> Response:
    """Deletes a dataset; 409 while a version or a queued/running job uses it
    (``garbage.delete_dataset``)."""
    get_owned(s, Dataset, dataset_id, who, "dataset")
    s.close()
    try:
        garbage.delete_dataset(svc.engine, svc.objects, dataset_id)
    except garbage.InUse as err:
        raise HTTPException(409, str(err)) from None
    return Response(status_code=204)


@router.get("/datasets", responses=ERRORS)
def list_datasets(who: Owner, s: Session) -> list[DatasetOut]:
    rows = s.scalars(sa.select(Dataset).where(Dataset.owner == who).order_by(Dataset.created_at))
    return [dataset_out(d) for d in rows]


@router.get("/datasets/{dataset_id}", responses=ERRORS)
def get_dataset(who: Owner, s: Session, dataset_id: Id) -> DatasetOut:
    return dataset_out(get_owned(s, Dataset, dataset_id, who, "dataset"))
