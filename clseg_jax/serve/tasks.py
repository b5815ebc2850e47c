"""The production queue: Celery over Redis, with the database as the source of truth.

A message carries only a job id. The task claims the job with a lease (``jobs.claim``); a message
for a job that is done, cancelled or held by a live worker is dropped, and one for a job queued
behind an earlier job of its lineage is dropped too: that job is published again when the earlier
one ends. Workers run one job at a time (``--pool=solo --concurrency=1``, prefetch 1) and
acknowledge late, so a worker killed mid-job leaves its message to be redelivered (or dropped, if
the job is done by then); the ``Reaper`` meanwhile requeues the job when its lease expires and
publishes a new message, and whoever claims it resumes from the job's last checkpoint. Celery's
own time limits need a forking pool; the job's own limit (``CLSEG_JOB_TIME_LIMIT_S``) is enforced
inside the training loop instead. Transient I/O errors requeue a job up to ``max_attempts``
(``worker.execute``); Celery's own retries are not used.
"""

from __future__ import annotations

import threading

import sqlalchemy as sa
from absl import logging
from celery import Celery
from sqlalchemy import orm

from clseg_jax.serve import db, jobs, store
from clseg_jax.serve.settings import Settings

TASK = "clseg.run_job"


def make_celery(broker: str) -> Celery:
    app = Celery("clseg", broker=broker)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        # Redeliver an unacknowledged message after an hour; the reaper acts much sooner.
        broker_transport_options={"visibility_timeout": 3600},
    )
    return app


def register(app: Celery, settings: Settings) -> None:
    """Adds the job task to ``app``; its worker process opens the database and the store."""
    from celery import signals

    from clseg_jax.serve import worker

    state: dict = {}
    # A warm shutdown (SIGTERM) would wait for the running job to end; instead the job saves a
    # checkpoint at its next step and goes back to the queue (worker.execute's ``shutdown``).
    leaving = threading.Event()
    signals.worker_shutting_down.connect(lambda **_: leaving.set(), weak=False)

    def context():
        if not state:
            state["engine"] = db.make_engine(settings.db_url)
            state["objects"] = store.make_store(settings.store_url)
            state["id"] = worker.worker_id()
        return state["engine"], state["objects"], state["id"]

    @app.task(name=TASK)
    def run_job(job_id: str) -> str:
        engine, objects, me = context()
        # Not claimable: done, held by a live worker, or behind an earlier job of its lineage
        # (published again when that one ends, below).
        if jobs.claim(engine, me, settings.lease_s, job_id=job_id) is None:
            return "skipped"
        outcome = worker.execute(settings, engine, objects, job_id, me, leaving)
        with orm.Session(engine) as s:
            job = s.get(db.Job, job_id)
            after = s.scalar(
                sa.select(db.Job.id)
                .where(db.Job.lineage_id == job.lineage_id, db.Job.state == "queued")
                .order_by(db.Job.created_at)
                .limit(1)
            )
        if outcome == "queued":  # requeued by a shutdown: another worker takes it
            app.send_task(TASK, args=[job_id])
        elif after is not None:
            app.send_task(TASK, args=[after])
        return outcome


class Reaper:
    """A thread that requeues jobs whose lease expired and republishes queued jobs that a worker
    could take but none has for a lease's time (their message may be lost)."""

    def __init__(self, settings: Settings, engine: sa.Engine, app: Celery, period_s: float = 0):
        self.settings, self.engine, self.app = settings, engine, app
        self.period = period_s or max(settings.lease_s / 3, 0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="clseg-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def once(self) -> list[str]:
        ids = set(jobs.reap(self.engine, self.settings.max_attempts))
        # Jobs behind an earlier one of their lineage are published when that one ends.
        ids |= set(jobs.ready_queued(self.engine, db.now() - self.settings.lease_s))
        for job_id in sorted(ids):
            self.app.send_task(TASK, args=[job_id])
        return sorted(ids)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.once()
            except Exception as err:  # the broker or database is down: try again next period
                logging.warning("reaper: %s", jobs.one_line_error(err))
