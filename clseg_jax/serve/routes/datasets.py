"""``/datasets``: uploads of one experience's data, checked, normalised and content-addressed."""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, File, HTTPException, Query, UploadFile
from pydantic import BaseModel, ConfigDict

from clseg_jax.serve import uploads
from clseg_jax.serve.db import Dataset
from clseg_jax.serve.routes.deps import ERRORS, Id, Owner, Session, Svc, get_owned

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


@router.post("/datasets", status_code=201, responses={**ERRORS, 413: {}, 400: {}})
def upload_dataset(
    who: Owner,
    s: Session,
    svc: Svc,
    file: Annotated[UploadFile, File(description="a .zip (docs/service.md layout) or .npz")],
    num_classes: Annotated[int, Query(ge=2, le=255)],
) -> DatasetOut:
    """Uploads one experience's data; masks are checked against ``num_classes`` classes.

    Stored content-addressed (normalised ``.npz``): re-uploading the same arrays returns
    the existing dataset."""
    data = file.file.read(svc.settings.max_upload_bytes + 1)
    try:
        arrays = uploads.parse_upload(data, file.filename or "", num_classes, svc.limits)
    except uploads.UploadError as err:
        raise HTTPException(400, str(err)) from None
    blob = uploads.to_npz_bytes(arrays)
    sha = hashlib.sha256(blob).hexdigest()
    same = sa.select(Dataset).where(Dataset.owner == who, Dataset.sha256 == sha)
    existing = s.scalar(same)
    if existing is not None:
        return dataset_out(existing)
    obj = svc.objects.put_bytes(f"datasets/{sha}.npz", blob)  # verified before the row exists
    row = Dataset(
        owner=who,
        filename=(file.filename or "")[:255],
        key=obj.key,
        sha256=obj.sha256,
        size=obj.size,
        num_classes=num_classes,
        summary=uploads.summary(arrays),
    )
    s.add(row)
    try:
        s.commit()
    except sa.exc.IntegrityError:  # the same content uploaded concurrently
        s.rollback()
        row = s.scalar(same)
    return dataset_out(row)


@router.get("/datasets", responses=ERRORS)
def list_datasets(who: Owner, s: Session) -> list[DatasetOut]:
    rows = s.scalars(sa.select(Dataset).where(Dataset.owner == who).order_by(Dataset.created_at))
    return [dataset_out(d) for d in rows]


@router.get("/datasets/{dataset_id}", responses=ERRORS)
def get_dataset(who: Owner, s: Session, dataset_id: Id) -> DatasetOut:
    return dataset_out(get_owned(s, Dataset, dataset_id, who, "dataset"))
