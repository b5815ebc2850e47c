"""``/versions``: a lineage's immutable results: summary, metrics, weights and predict."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, HTTPException, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel

from clseg_jax.serve import lineage, store
from clseg_jax.serve.db import Lineage, Version
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


class VersionOut(BaseModel):
    id: str
    lineage_id: str
    number: int
    job_id: str
    dataset_id: str
    created_at: float
    avg_miou: float | None
    forgetting: float | None
    bwt: float | None
    # What R holds: "miou" (segmentation lineages) or "accuracy" (classification); avg_miou is
    # its average under either (the name it had before lineages classified).
    metric: str
    # Whether the version learnt its new experience: its score against the trivial predictor's
    # (the majority class everywhere); None for versions made before the verdict existed.
    did_not_learn: bool | None
    new_score: float | None
    trivial_score: float | None


def version_out(v: Version) -> VersionOut:
    m = v.metrics
    learning = m.get("learning") or {}
    return VersionOut(
        id=v.id,
        lineage_id=v.lineage_id,
        number=v.number,
        job_id=v.job_id,
        dataset_id=v.dataset_id,
        created_at=v.created_at,
        metric=m.get("metric", "miou"),
        avg_miou=m.get("avg_miou"),
        forgetting=m.get("forgetting"),
        bwt=m.get("bwt"),
        did_not_learn=learning.get("did_not_learn"),
        new_score=learning.get("new_score"),
        trivial_score=learning.get("trivial_score"),
    )


def weights_file(svc: Services, v: Version) -> str:
    """The version's weights in the local cache (fetched and verified on first use)."""
    return svc.cached(store.StoredObject(**v.weights))


@router.get("/versions/{version_id}", responses=ERRORS)
def get_version(who: Owner, s: Session, version_id: Id) -> VersionOut:
    return version_out(get_owned(s, Version, version_id, who, "version"))


@router.get("/versions/{version_id}/metrics", responses=ERRORS)
def version_metrics(who: Owner, s: Session, version_id: Id) -> dict[str, Any]:
    """R (rows: versions 1..n; columns: experiences), summary, per-class IoU."""
    return get_owned(s, Version, version_id, who, "version").metrics


@router.get(
    "/versions/{version_id}/weights",
    responses={**ERRORS, 200: {"content": {"application/octet-stream": {}}}},
    response_class=Response,
)
def download_weights(who: Owner, s: Session, svc: Svc, version_id: Id) -> FileResponse:
    """The version's params and BatchNorm statistics as ``.npz`` (``models.weights``)."""
    v = get_owned(s, Version, version_id, who, "version")
    return FileResponse(
        weights_file(svc, v),
        media_type="application/octet-stream",
        filename=f"weights-{v.lineage_id}-v{v.number}.npz",
    )


_PREDICTED = {
    "content": {
        "image/png": {},
        "application/json": {
            "example": {
                "class": 1,
                "name": "circle",
                "probabilities": [0.1, 0.9],
                "class_names": ["square", "circle"],
            }
        },
    }
}


@router.post(
    "/versions/{version_id}/predict",
    responses={**ERRORS, 400: {}, 413: {}, 200: _PREDICTED},
    response_class=Response,
)
def predict(
    who: Owner,
    s: Session,
    svc: Svc,
    version_id: Id,
    image: Annotated[UploadFile, File(description="PNG or JPEG")],
) -> Response:
    """A segmentation lineage's version segments the image: a PNG mask (mode L, class ids) at
    the image's size. A classification lineage's classifies it: JSON with the class id, its
    name and every class's probability."""
    v = get_owned(s, Version, version_id, who, "version")
    spec = s.get(Lineage, v.lineage_id).spec
    data = read_upload(image, svc)
    run = svc.predictors.get(v.id, lambda: lineage.Predictor(spec, weights_file(svc, v)))
    try:
        if run.task == "classification":
            return JSONResponse(run.classify(data, svc.settings.max_image_pixels))
        return Response(run.segment(data, svc.settings.max_image_pixels), media_type="image/png")
    except ValueError as err:
        raise HTTPException(400, str(err)) from None
