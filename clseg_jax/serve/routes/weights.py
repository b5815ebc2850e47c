"""``/weights``: pretrained weights uploaded once (a ``models.weights`` ``.npz``, e.g. converted
from torchvision by ``experiments/baselines/convert_torchvision.py``), which lineages of
DeepLab-v3 or BiSeNet (or a UNet) start from (``"pretrained": <id>``)."""

from __future__ import annotations

import io
from typing import Annotated, Any

import numpy as np
import sqlalchemy as sa
from fastapi import APIRouter, File, HTTPException, Response, UploadFile
from pydantic import BaseModel, ConfigDict

from clseg_jax.serve import garbage, store
from clseg_jax.serve.db import Weights
from clseg_jax.serve.routes.deps import (
    ERRORS,
    Id,
    Owner,
    Services,
    Session,
    Svc,
    get_owned,
    read_upload,
)

router = APIRouter()


class WeightsOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    filename: str
    sha256: str
    size: int
    summary: dict[str, Any]
    created_at: float


def summarize(data: bytes) -> dict[str, Any]:
    """Arrays and parameter count of a weights file; a one-line ``ValueError`` unless it is an
    ``.npz`` of numeric arrays keyed ``params/...`` or ``batch_stats/...`` (no pickles)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            shapes = {k: z[k].shape for k in z.files}
            kinds = {z[k].dtype.kind for k in z.files}
    except Exception as err:  # whatever numpy raises on something that is not an npz
        raise ValueError(f"weights must be a .npz of arrays ({type(err).__name__})") from None
    bad = [k for k in shapes if not k.startswith(("params/", "batch_stats/"))]
    if not shapes or bad:
        first = bad[0] if bad else "(no arrays)"
        raise ValueError(
            f"weights keys must start with params/ or batch_stats/ (models.weights), got {first!r}"
        )
    if not kinds <= {"f", "i", "u"}:
        raise ValueError(f"weights must be numeric arrays, got dtype kinds {sorted(kinds)}")
    params = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("params/"))
    return {"arrays": len(shapes), "parameters": params}


def weights_path(svc: Services, w: Weights) -> str:
    """The weights in the local cache (fetched and verified on first use)."""
    return svc.cached(store.StoredObject(w.key, w.size, w.sha256))


@router.post("/weights", status_code=201, responses={**ERRORS, 400: {}, 413: {}})
def upload_weights(
    who: Owner,
    s: Session,
    svc: Svc,
    file: Annotated[UploadFile, File(description="a models.weights .npz")],
) -> WeightsOut:
    """Uploads pretrained weights; the same bytes again return the existing row."""
    data = read_upload(file, svc)
    try:
        summary = summarize(data)
    except ValueError as err:
        raise HTTPException(400, str(err)) from None
    row, _ = svc.store_unique(
        s, Weights, who, "weights", data, filename=(file.filename or "")[:255], summary=summary
    )
    return WeightsOut.model_validate(row)


@router.get("/weights", responses=ERRORS)
def list_weights(who: Owner, s: Session) -> list[WeightsOut]:
    rows = s.scalars(sa.select(Weights).where(Weights.owner == who).order_by(Weights.created_at))
    return [WeightsOut.model_validate(w) for w in rows]


@router.delete("/weights/{weights_id}", status_code=204, responses={**ERRORS, 409: {}})
def delete_weights(who: Owner, s: Session, svc: Svc, weights_id: Id) -> Response:
    """Deletes uploaded weights; 409 while a lineage starts from them."""
    get_owned(s, Weights, weights_id, who, "weights")
    s.close()
    try:
        garbage.delete_weights(svc.engine, svc.objects, weights_id)
    except garbage.InUse as err:
        raise HTTPException(409, str(err)) from None
    return Response(status_code=204)
