"""``/jobs``: submitting, watching and cancelling training jobs (state changes: ``serve.jobs``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Header, HTTPException, Query
from pydantic import BaseModel, ConfigDict

from clseg_jax.serve import jobs, lineage
from clseg_jax.serve.db import Dataset, Job, Lineage
from clseg_jax.serve.routes.deps import ERRORS, Id, Owner, Session, Strict, Svc, get_owned

router = APIRouter()


class JobIn(Strict):
    lineage_id: Id
    dataset_id: Id


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    lineage_id: str
    dataset_id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    cancel_requested: bool
    attempts: int
    progress: dict[str, Any]
    error: str | None
    version_id: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None


def job_out(j: Job) -> JobOut:
    return JobOut.model_validate(j)


def _refused(err: jobs.Refused) -> HTTPException:
    return HTTPException(err.status, str(err))


@router.post("/jobs", status_code=202, responses={**ERRORS, 400: {}, 409: {}})
def submit_job(
    who: Owner,
    s: Session,
    svc: Svc,
    body: JobIn,
    idempotency_key: Annotated[
        str | None, Header(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")
    ] = None,
) -> JobOut:
    """Queues training ``dataset_id`` as the lineage's next experience (202 + the job).

    With an ``Idempotency-Key`` header, a resubmission returns the first job."""
    try:
        prior = jobs.resubmitted(s, who, idempotency_key, body.lineage_id, body.dataset_id)
        if prior is not None:
            return job_out(prior)
        lin = get_owned(s, Lineage, body.lineage_id, who, "lineage")
        ds = get_owned(s, Dataset, body.dataset_id, who, "dataset")
        lineage.check_dataset(lin.spec, lin.id, ds.summary)
        job, created = jobs.submit(s, who, lin, ds, idempotency_key)
    except jobs.Refused as err:
        raise _refused(err) from None
    except ValueError as err:  # the dataset does not fit the lineage
        raise HTTPException(400, str(err)) from None
    if created:
        jobs.event("queued", job.id, lineage_id=lin.id, dataset_id=ds.id)
        svc.enqueue(job.id)
    return job_out(job)


@router.get("/jobs", responses=ERRORS)
def list_jobs(
    who: Owner, s: Session, lineage_id: Annotated[Id | None, Query()] = None
) -> list[JobOut]:
    q = sa.select(Job).where(Job.owner == who)
    if lineage_id is not None:
        q = q.where(Job.lineage_id == lineage_id)
    return [job_out(j) for j in s.scalars(q.order_by(Job.created_at))]


@router.get("/jobs/{job_id}", responses=ERRORS)
def get_job(who: Owner, s: Session, job_id: Id) -> JobOut:
    return job_out(get_owned(s, Job, job_id, who, "job"))


@router.post("/jobs/{job_id}/cancel", status_code=202, responses={**ERRORS, 409: {}})
def cancel_job(who: Owner, s: Session, job_id: Id) -> JobOut:
    """Cancels a queued job at once; a running one stops at its next step (checkpointed)."""
    job = get_owned(s, Job, job_id, who, "job")
    try:
        jobs.cancel(s, job)
    except jobs.Refused as err:
        raise _refused(err) from None
    return job_out(job)
