"""Garbage collection of the object store: objects that no row references any more.

Referenced objects, never deleted: every dataset and weights row's object (shared by content
hash across owners), every version's ``state.tar`` and ``weights.npz``, the ``state.tar`` a fork
starts from (``Lineage.origin``, kept when its lineage is deleted), and the checkpoint of every
job that has not ended (a retry resumes from it). Every writer stores its object *before*
committing the row that references it (uploads, mid-job checkpoints, versions), so an object
without a row is either garbage or a write in flight; the grace period tells them apart.

- ``job_checkpoints``: once a job has ended, its mid-job checkpoints (``jobs/<id>/...``) are
  garbage: a version has its own ``state.tar``. The worker calls it right after ending the job;
  a crash before that leaves them to ``orphans``.
- ``orphans``: every unreferenced object older than ``grace_s``. The store is listed *before*
  the rows are read, so an object written after the listing is not considered, and each
  candidate is checked against the rows once more right before it is deleted. The one write
  that reuses an object (an upload of content already stored, for another owner) rewrites it,
  and checks after committing its row that the object is still there (``routes/datasets.py``).

``python -m clseg_jax.serve gc [--grace-s S]`` runs ``orphans`` (cron it, or run it by hand).
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from absl import logging
from sqlalchemy import orm

from clseg_jax.serve import db, store
from clseg_jax.serve.db import Dataset, Job, Lineage, Version, Weights

# An hour: far longer than any gap between writing an object and committing its row.
GRACE_S = 3600.0


def referenced(s: orm.Session) -> set[str]:
    """Keys of every object some row needs."""
    keys = set(s.scalars(sa.select(Dataset.key))) | set(s.scalars(sa.select(Weights.key)))
    for state, weights in s.execute(sa.select(Version.state, Version.weights)):
        keys.update((state["key"], weights["key"]))
    live = sa.select(Job.checkpoint).where(
        Job.state.not_in(db.TERMINAL), Job.checkpoint.is_not(None)
    )
    keys.update(c["key"] for c in s.scalars(live) if c)
    keys.update(o["state"]["key"] for o in s.scalars(sa.select(Lineage.origin)) if o)
    return keys


def _still_unreferenced(engine: sa.Engine, key: str) -> bool:
    with orm.Session(engine) as s:
        return key not in referenced(s)


def job_checkpoints(engine: sa.Engine, objects: store.ObjectStore, job_id: str) -> int:
    """Deletes the mid-job checkpoints of ``job_id`` if it has ended; returns how many."""
    with orm.Session(engine) as s:
        job = s.get(Job, job_id)
        if job is None or job.state not in db.TERMINAL:
            return 0
    return _delete_prefix(engine, objects, f"jobs/{job_id}/")


def orphans(
    engine: sa.Engine,
    objects: store.ObjectStore,
    grace_s: float = GRACE_S,
    now: float | None = None,
) -> list[str]:
    """Deletes every object no row references that is older than ``grace_s``; returns their
    keys."""
    listed = list(objects.list())  # before the rows: see the module docstring
    now = time.time() if now is None else now
    with orm.Session(engine) as s:
        keep = referenced(s)
    gone = []
    for key, modified in listed:
        if key in keep or now - modified < grace_s:
            continue
        if _still_unreferenced(engine, key):
            objects.delete(key)
            gone.append(key)
    if gone:
        logging.info("gc: deleted %d unreferenced objects", len(gone))
    return gone


# -- deleting rows: what may go, and the objects that go with them ------------------------------


class InUse(Exception):
    """A row cannot be deleted while another needs it (HTTP 409); the message says which."""


def delete_dataset(engine: sa.Engine, objects: store.ObjectStore, dataset_id: str) -> None:
    """Deletes a dataset, refused while a version of any lineage or a queued/running job uses
    it (a job also reads the datasets of its lineage's earlier versions, which are versions'
    datasets). Ended jobs that tried it and made no version go with it. Its object is deleted
    when no other row, of any owner, holds the same content."""
    with orm.Session(engine) as s, s.begin():
        d = s.get(Dataset, dataset_id)
        v = s.scalar(sa.select(Version).where(Version.dataset_id == dataset_id).limit(1))
        if v is not None:
            raise InUse(
                f"dataset {dataset_id} is experience {v.number} of lineage {v.lineage_id}; "
                "delete that lineage first"
            )
        for lin in s.scalars(sa.select(Lineage).where(Lineage.owner == d.owner)):
            if dataset_id in (lin.origin or {}).get("dataset_ids", ()):
                raise InUse(
                    f"dataset {dataset_id} is an experience of lineage {lin.id}, a fork; "
                    "delete that lineage first"
                )
        job = s.scalar(
            sa.select(Job).where(Job.dataset_id == dataset_id, Job.state.not_in(db.TERMINAL))
        )
        if job is not None:
            raise InUse(f"job {job.id} ({job.state}) uses dataset {dataset_id}; cancel it first")
        ended = list(s.scalars(sa.select(Job.id).where(Job.dataset_id == dataset_id)))
        s.execute(sa.delete(Job).where(Job.dataset_id == dataset_id))
        key = d.key
        s.delete(d)
    for job_id in ended:
        _delete_prefix(engine, objects, f"jobs/{job_id}/")
    if _still_unreferenced(engine, key):
        objects.delete(key)


def delete_lineage(engine: sa.Engine, objects: store.ObjectStore, lineage_id: str) -> None:
    """Deletes a lineage with its versions (their state and weights), its ended jobs and, for a
    fork, the state it started from (when nothing else needs them); refused while one of its
    jobs is queued or running. Its datasets stay."""
    with orm.Session(engine) as s, s.begin():
        job = s.scalar(
            sa.select(Job).where(Job.lineage_id == lineage_id, Job.state.not_in(db.TERMINAL))
        )
        if job is not None:
            raise InUse(f"job {job.id} of lineage {lineage_id} is {job.state}; cancel it first")
        keys = [
            k
            for state, weights in s.execute(
                sa.select(Version.state, Version.weights).where(Version.lineage_id == lineage_id)
            )
            for k in (state["key"], weights["key"])
        ]
        origin = s.scalar(sa.select(Lineage.origin).where(Lineage.id == lineage_id))
        if origin:  # a fork's starting state goes too unless its parent or another fork has it
            keys.append(origin["state"]["key"])
        job_ids = list(s.scalars(sa.select(Job.id).where(Job.lineage_id == lineage_id)))
        s.execute(sa.delete(Version).where(Version.lineage_id == lineage_id))
        s.execute(sa.delete(Job).where(Job.lineage_id == lineage_id))
        s.execute(sa.delete(Lineage).where(Lineage.id == lineage_id))
    # After the commit: a crash from here on leaves unreferenced objects, which orphans takes.
    for key in keys:
        if _still_unreferenced(engine, key):
            objects.delete(key)
    for job_id in job_ids:
        _delete_prefix(engine, objects, f"jobs/{job_id}/")


def _delete_prefix(engine: sa.Engine, objects: store.ObjectStore, prefix: str) -> int:
    """Deletes the unreferenced objects under ``prefix``; returns how many."""
    n = 0
    for key, _ in list(objects.list(prefix)):
        if _still_unreferenced(engine, key):
            objects.delete(key)
            n += 1
    return n


def delete_weights(engine: sa.Engine, objects: store.ObjectStore, weights_id: str) -> None:
    """Deletes uploaded weights, refused while a lineage of their owner starts from them; the
    object goes when no other row holds the same content."""
    with orm.Session(engine) as s, s.begin():
        w = s.get(Weights, weights_id)
        for lin in s.scalars(sa.select(Lineage).where(Lineage.owner == w.owner)):
            if lin.spec.get("pretrained") == weights_id:
                raise InUse(f"lineage {lin.id} starts from weights {weights_id}; delete it first")
        key = w.key
        s.delete(w)
    if _still_unreferenced(engine, key):
        objects.delete(key)
