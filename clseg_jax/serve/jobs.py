"""Job bookkeeping in the database: every change of a job's state is a function here.

The API submits (``submit``, with the Idempotency-Key rule) and cancels (``cancel``) jobs in the
request's session; workers claim them with leases, beat, report progress and checkpoints, and
publish (``finish``) or end them (``end``, ``retry_or_fail``); the reaper requeues the jobs of dead
workers (``reap``).

Every write that only the lease holder may make is a compare-and-set on ``lease_owner`` (and the
state), so a worker that lost its lease (it stalled past the lease, another worker reclaimed the
job) can neither overwrite progress nor publish a second version. Jobs of one lineage run in
submission order: a job is claimable only when no earlier job of its lineage is queued or running.
"""

from __future__ import annotations

import json
import re
from typing import Any

import sqlalchemy as sa
from absl import logging
from sqlalchemy import orm

from clseg_jax.serve import db
from clseg_jax.serve.db import Dataset, Job, Lineage, Version


class LeaseLost(RuntimeError):
    """This worker no longer holds the job's lease; it must stop without writing results."""


class Refused(ValueError):
    """A request the job rules refuse, with its HTTP ``status``: 400 (the dataset cannot be
    trained into the lineage) or 409 (it conflicts with the lineage's or the job's state)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# -- the API's side: submit and cancel, in the request's session ------------------------------


def resubmitted(
    s: orm.Session, owner: str, idempotency_key: str | None, lineage_id: str, dataset_id: str
) -> Job | None:
    """The job ``owner`` first submitted under ``idempotency_key`` (None: no such job, or no
    key); ``Refused`` (409) if that job trains another lineage or dataset."""
    if idempotency_key is None:
        return None
    prior = s.scalar(
        sa.select(Job).where(Job.owner == owner, Job.idempotency_key == idempotency_key)
    )
    if prior is not None and (prior.lineage_id, prior.dataset_id) != (lineage_id, dataset_id):
        raise Refused(409, "Idempotency-Key already used for a different job")
    return prior


def event(kind: str, job_id: str, **fields: Any) -> None:
    """One structured line in the server log per job event (``queued``, ``started``,
    ``checkpoint``, ``succeeded``, ``failed``, ``cancelled``, ``requeued``):
    ``job_event {"event": ..., "job_id": ..., ...}`` with the lineage id and durations."""
    line = json.dumps({"event": kind, "job_id": job_id, **fields}, sort_keys=True, default=str)
    logging.info("job_event %s", line)


def submit(
    s: orm.Session, owner: str, lin: Lineage, ds: Dataset, idempotency_key: str | None = None
) -> tuple[Job, bool]:
    """Queues training ``ds`` as ``lin``'s next experience: ``(job, True)``, or ``(the first
    job, False)`` when a concurrent submission under the same ``idempotency_key`` won.

    Call ``resubmitted`` first: a key already used answers with its job before these checks,
    and ``lineage.check_dataset`` (whether ``ds`` fits ``lin``). ``Refused`` (409) if ``lin``
    already has ``max_experiences`` jobs queued, running or succeeded.
    """
    spec = lin.spec
    used = s.scalar(
        sa.select(sa.func.count())
        .select_from(Job)
        .where(Job.lineage_id == lin.id, Job.state.in_(("queued", "running", "succeeded")))
    )
    used += (lin.origin or {}).get("number", 0)  # a fork's experiences before it
    if used >= spec["max_experiences"]:
        raise Refused(409, f"lineage {lin.id} is full: max_experiences={spec['max_experiences']}")
    job = Job(
        owner=owner,
        lineage_id=lin.id,
        dataset_id=ds.id,
        idempotency_key=idempotency_key,
        progress={},
    )
    s.add(job)
    try:
        s.commit()
    except sa.exc.IntegrityError:  # a concurrent submission with the same key won
        s.rollback()
        prior = resubmitted(s, owner, idempotency_key, lin.id, ds.id)
        if prior is None:
            raise
        return prior, False
    return job, True


def cancel(s: orm.Session, job: Job) -> None:
    """Cancels a queued ``job`` at once; a running one stops within about a training step (its
    worker polls ``cancel_requested`` every ``worker.CANCEL_POLL_S``) and writes no version.
    ``Refused`` (409) if it already ended. Refreshes ``job``."""
    if job.state in db.TERMINAL:
        raise Refused(409, f"job {job.id} already ended ({job.state})")
    s.execute(
        sa.update(Job)
        .where(Job.id == job.id, Job.state == "queued")
        .values(state="cancelled", error="cancelled by request", finished_at=db.now())
    )
    s.execute(sa.update(Job).where(Job.id == job.id).values(cancel_requested=True))
    s.commit()
    s.refresh(job)


# -- the workers' side: claims, leases, results ------------------------------------------------


def _claimable(t: float):
    return (Job.state == "queued") | ((Job.state == "running") & (Job.lease_expires_at < t))


def _ready(t: float) -> sa.Select:
    """Ids of the jobs a worker may claim at time ``t`` (see ``claim``)."""
    earlier = orm.aliased(Job)
    blocked = (
        sa.select(earlier.id)
        .where(
            earlier.lineage_id == Job.lineage_id,
            earlier.created_at < Job.created_at,
            earlier.state.in_(("queued", "running")),
        )
        .exists()
    )
    return sa.select(Job.id).where(_claimable(t), ~Job.cancel_requested, ~blocked)


def ready_queued(engine: sa.Engine, older_than: float) -> list[str]:
    """Queued jobs created before ``older_than`` that a worker could take now (not behind an
    earlier job of their lineage): those whose queue message may have been lost."""
    query = _ready(db.now()).where(Job.state == "queued", Job.created_at < older_than)
    with orm.Session(engine) as s:
        return list(s.scalars(query))


def claim(engine: sa.Engine, worker: str, lease_s: float, job_id: str | None = None) -> str | None:
    """Takes the oldest claimable job (or ``job_id`` if claimable) for ``worker``; its id or None.

    Claimable: queued, or running with an expired lease (its worker died), not cancelled, and no
    earlier job of its lineage still queued or running.
    """
    t = db.now()
    query = _ready(t)
    if job_id is not None:
        query = query.where(Job.id == job_id)
    with orm.Session(engine) as s:
        candidates = s.scalars(query.order_by(Job.created_at).limit(8)).all()
        for cid in candidates:
            # Compare-and-set: of two workers racing for one row, the second matches nothing.
            res = s.execute(
                sa.update(Job)
                .where(Job.id == cid, _claimable(t), ~Job.cancel_requested)
                .values(
                    state="running",
                    lease_owner=worker,
                    lease_expires_at=t + lease_s,
                    attempts=Job.attempts + 1,
                    started_at=sa.func.coalesce(Job.started_at, t),
                    error=None,
                )
            )
            s.commit()
            if res.rowcount == 1:
                return cid
    return None


def _owned(job_id: str, worker: str):
    return (Job.id == job_id) & (Job.lease_owner == worker) & (Job.state == "running")


def heartbeat(engine: sa.Engine, job_id: str, worker: str, lease_s: float) -> tuple[bool, bool]:
    """Extends the lease; ``(still_held, cancel_requested)``."""
    with orm.Session(engine) as s:
        res = s.execute(
            sa.update(Job).where(_owned(job_id, worker)).values(lease_expires_at=db.now() + lease_s)
        )
        cancel = s.scalar(sa.select(Job.cancel_requested).where(Job.id == job_id))
        s.commit()
    return res.rowcount == 1, bool(cancel)


def cancel_requested(engine: sa.Engine, job_id: str) -> bool:
    """Whether a cancel of ``job_id`` was requested (what a running job polls)."""
    with orm.Session(engine) as s:
        return bool(s.scalar(sa.select(Job.cancel_requested).where(Job.id == job_id)))


def _owned_update(engine: sa.Engine, job_id: str, worker: str, **values: Any) -> None:
    with orm.Session(engine) as s:
        res = s.execute(sa.update(Job).where(_owned(job_id, worker)).values(**values))
        s.commit()
    if res.rowcount != 1:
        raise LeaseLost(f"job {job_id}: lease lost by {worker}")


def set_progress(engine: sa.Engine, job_id: str, worker: str, progress: dict) -> None:
    _owned_update(engine, job_id, worker, progress=progress)


def set_checkpoint(engine: sa.Engine, job_id: str, worker: str, obj: dict) -> None:
    """Points the job at a verified checkpoint object, from which a retry resumes."""
    _owned_update(engine, job_id, worker, checkpoint=obj)


def finish(engine: sa.Engine, job_id: str, worker: str, version: dict) -> str:
    """Inserts the version and marks the job succeeded in one transaction; the version's id.

    Raises ``LeaseLost`` (writing nothing) if the lease moved on: the job's other holder
    publishes instead, so a job yields one version however often it was delivered.
    """
    with orm.Session(engine) as s, s.begin():
        row = Version(job_id=job_id, **version)
        s.add(row)
        s.flush()
        res = s.execute(
            sa.update(Job)
            .where(_owned(job_id, worker))
            .values(
                state="succeeded",
                version_id=row.id,
                lease_owner=None,
                lease_expires_at=None,
                finished_at=db.now(),
            )
        )
        if res.rowcount != 1:
            s.rollback()
            raise LeaseLost(f"job {job_id}: lease lost by {worker} before publishing")
        return row.id


def end(engine: sa.Engine, job_id: str, worker: str, state: str, error: str | None = None) -> bool:
    """Ends or requeues (``state="queued"``) a job this worker holds; False if it did not."""
    values: dict[str, Any] = {"state": state, "lease_owner": None, "lease_expires_at": None}
    if state in db.TERMINAL:
        values["finished_at"] = db.now()
    if error is not None:
        values["error"] = error
    with orm.Session(engine) as s:
        res = s.execute(sa.update(Job).where(_owned(job_id, worker)).values(**values))
        s.commit()
    return res.rowcount == 1


def retry_or_fail(
    engine: sa.Engine, job_id: str, worker: str, max_attempts: int, error: str
) -> str:
    """Ends a job this worker holds after a transient error: requeued while it has used fewer
    than ``max_attempts`` attempts, failed after. Returns the state chosen."""
    with orm.Session(engine) as s:
        attempts = s.scalar(sa.select(Job.attempts).where(Job.id == job_id)) or 0
    state = "queued" if attempts < max_attempts else "failed"
    end(engine, job_id, worker, state, error)
    return state


def reap(engine: sa.Engine, max_attempts: int) -> list[str]:
    """Requeues running jobs whose lease expired (their worker died); fails those that used up
    ``max_attempts``. Returns the requeued ids (for a queue that needs a new message)."""
    t = db.now()
    expired = (Job.state == "running") & (Job.lease_expires_at < t)
    with orm.Session(engine) as s:
        s.execute(
            sa.update(Job)
            .where(expired, Job.attempts >= max_attempts)
            .values(
                state="failed",
                error=f"worker lost {max_attempts} times (lease expired); not retried",
                lease_owner=None,
                lease_expires_at=None,
                finished_at=t,
            )
        )
        ids = s.scalars(sa.select(Job.id).where(expired)).all()
        if ids:
            s.execute(
                sa.update(Job)
                .where(expired, Job.id.in_(ids))
                .values(state="queued", lease_owner=None, lease_expires_at=None)
            )
        s.commit()
    return list(ids)


_SECRET = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")
# Python object reprs (``<_io.BytesIO object at 0x7f...>``) mean nothing to an API user.
_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def one_line_error(err: BaseException) -> str:
    """``Type: first line`` of an exception, at most 500 characters, credentials in URLs masked
    and object reprs left out."""
    text = str(err).strip().splitlines()
    msg = f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
    return plain(_SECRET.sub(r"\1***@", msg))[:500]


def plain(message: str) -> str:
    """``message`` without Python object reprs (``<_io.BytesIO object at 0x...>`` -> ``it``)."""
    return _REPR.sub("it", message)
