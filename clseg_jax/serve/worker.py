"""Runs claimed jobs: stage the lineage's data and checkpoint, train, publish a version.

``execute`` is the whole job for one worker holding its lease; a heartbeat thread keeps the lease
and watches for cancellation. Each checkpoint ``train.run`` writes is uploaded and verified, then
the job row points at it, so a job whose worker died resumes from there on any machine (the
``InProcessWorker`` and the Celery task share this code). Errors end the job ``failed`` with a
one-line message; transient I/O errors (store, database connection) requeue it until
``max_attempts``.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
import uuid

import sqlalchemy as sa
from absl import logging
from sqlalchemy import orm

from clseg_jax import train
from clseg_jax.serve import garbage, jobs, lineage, store
from clseg_jax.serve.db import Dataset, Job, Lineage, Version, Weights
from clseg_jax.serve.settings import Settings

TRANSIENT = (store.StoreError, sa.exc.OperationalError, ConnectionError, TimeoutError)
# How often a running job reads its cancel flag (seconds).
CANCEL_POLL_S = 0.2


def worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _obj(o: store.StoredObject) -> dict:
    return {"key": o.key, "size": o.size, "sha256": o.sha256}


def _expect(d: dict) -> store.StoredObject:
    return store.StoredObject(d["key"], d["size"], d["sha256"])


class _Plan:
    """What a job needs from the database, read once at its start."""

    def __init__(self, engine: sa.Engine, job_id: str):
        with orm.Session(engine) as s:
            job = s.get(Job, job_id)
            lin = s.get(Lineage, job.lineage_id)
            versions = s.scalars(
                sa.select(Version).where(Version.lineage_id == lin.id).order_by(Version.number)
            ).all()
            # A fork continues from its origin's version: that version's experiences first.
            origin = lin.origin or {}
            ids = [*origin.get("dataset_ids", ()), *(v.dataset_id for v in versions)]
            ids.append(job.dataset_id)
            rows = {d.id: d for d in s.scalars(sa.select(Dataset).where(Dataset.id.in_(ids)))}
            self.datasets = [
                {"key": rows[i].key, "size": rows[i].size, "sha256": rows[i].sha256} for i in ids
            ]
            self.spec = dict(lin.spec)
            self.lineage_id = lin.id
            self.number = len(ids)
            self.dataset_id = job.dataset_id
            w = s.get(Weights, lin.spec["pretrained"]) if lin.spec.get("pretrained") else None
            self.pretrained = (
                None if w is None else {"key": w.key, "size": w.size, "sha256": w.sha256}
            )
            self.resume = job.checkpoint or (
                versions[-1].state if versions else origin.get("state")
            )


def execute(
    settings: Settings,
    engine: sa.Engine,
    objects: store.ObjectStore,
    job_id: str,
    worker: str,
    shutdown: threading.Event | None = None,
) -> str:
    """Runs a job this worker has claimed to its end; returns the job's final state.

    ``shutdown`` (the process is stopping): the job saves a checkpoint at its next step and goes
    back to the queue, to resume there."""
    plan = _Plan(engine, job_id)
    workdir = os.path.join(settings.scratch, job_id)
    shutil.rmtree(workdir, ignore_errors=True)  # a stale folder of a dead worker: start clean
    os.makedirs(workdir)
    stop = threading.Event()
    why = {"cancel": False, "lost": False}
    deadline = time.time() + settings.job_time_limit_s

    def beat():
        # The cancel flag is read every CANCEL_POLL_S (one cheap SELECT), so that a cancel
        # stops training within about one step; the lease is renewed every lease_s / 3.
        renew_at = time.monotonic() + settings.lease_s / 3
        while not stop.wait(CANCEL_POLL_S):
            try:
                if time.monotonic() >= renew_at:
                    held, cancel = jobs.heartbeat(engine, job_id, worker, settings.lease_s)
                    renew_at = time.monotonic() + settings.lease_s / 3
                else:
                    held, cancel = True, jobs.cancel_requested(engine, job_id)
            except TRANSIENT as err:  # a database blip: the lease may still be ours
                logging.warning("heartbeat of %s failed: %s", job_id, jobs.one_line_error(err))
                continue
            why["lost"] |= not held
            why["cancel"] |= cancel
            if not held or cancel:
                stop.set()

    beater = threading.Thread(target=beat, name=f"heartbeat-{job_id}", daemon=True)
    beater.start()
    started = time.monotonic()

    def ended(state: str, **fields) -> str:
        """The job's end as one structured log line (``queued`` is logged as ``requeued``);
        returns ``state``."""
        seconds = round(time.monotonic() - started, 2)
        kind = "requeued" if state == "queued" else state
        jobs.event(kind, job_id, lineage_id=plan.lineage_id, seconds=seconds, **fields)
        return state

    jobs.event("started", job_id, lineage_id=plan.lineage_id, version=plan.number, worker=worker)
    try:
        files = []
        for d in plan.datasets:
            path = os.path.join(workdir, "files", f"{d['sha256']}.npz")
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                objects.get_file(d["key"], path, expect=_expect(d))
            files.append(path)
        data_dir = os.path.join(workdir, "data")
        lineage.stage_stream(data_dir, files)
        run_dir = os.path.join(workdir, "run")
        if plan.resume:
            tar = os.path.join(workdir, "resume.tar")
            objects.get_file(plan.resume["key"], tar, expect=_expect(plan.resume))
            lineage.unpack_checkpoint(tar, run_dir)
            os.remove(tar)

        def on_log(info: dict) -> None:
            jobs.set_progress(engine, job_id, worker, {**info, "version": plan.number})

        def on_checkpoint(directory: str, meta: dict) -> None:
            del meta
            with tempfile.NamedTemporaryFile(dir=workdir, suffix=".tar", delete=False) as f:
                tmp = f.name
            lineage.pack(directory, tmp)
            sha = store.sha256_file(tmp)
            key = f"jobs/{job_id}/checkpoint-{sha}.tar"
            obj = objects.put_file(key, tmp)
            os.remove(tmp)
            jobs.set_checkpoint(engine, job_id, worker, _obj(obj))
            jobs.event("checkpoint", job_id, lineage_id=plan.lineage_id, key=obj.key)

        def should_stop() -> bool:
            leaving = shutdown is not None and shutdown.is_set()
            return stop.is_set() or leaving or time.time() > deadline

        pretrained = ""
        if plan.pretrained and not plan.resume:  # later versions start from their checkpoint
            pretrained = os.path.join(workdir, "pretrained.npz")
            objects.get_file(plan.pretrained["key"], pretrained, expect=_expect(plan.pretrained))
        hooks = train.Hooks(
            on_log,
            on_checkpoint,
            should_stop,
            handle_sigterm=False,
            should_cancel=lambda: why["cancel"],
        )
        results = lineage.run_experience(plan.spec, data_dir, run_dir, hooks, pretrained)
        if why["cancel"] and not why["lost"]:  # even if the run got to its end: no version
            jobs.end(engine, job_id, worker, "cancelled", "cancelled by request")
            return ended("cancelled")
        if not results:  # stopped after saving a checkpoint
            if why["lost"]:
                return ended("lost")
            if time.time() > deadline:
                error = f"time limit of {settings.job_time_limit_s} s reached"
                jobs.end(engine, job_id, worker, "failed", error)
                return ended("failed", error=error)
            jobs.end(engine, job_id, worker, "queued")  # the process is shutting down
            return ended("queued")
        learning = lineage.learning_verdict(results, files[-1], plan.spec["num_classes"])
        if learning["did_not_learn"]:
            logging.warning(
                "job %s: version %d did not learn its experience (%.3f, trivial %.3f)",
                job_id,
                plan.number,
                learning["new_score"],
                learning["trivial_score"],
            )
        prefix = f"lineages/{plan.lineage_id}/versions/{plan.number}-{job_id}"
        ckpt_dir = os.path.join(run_dir, "checkpoints")
        latest = max(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
        state_tar = os.path.join(workdir, "state.tar")
        lineage.pack(os.path.join(ckpt_dir, str(latest)), state_tar)
        weights = os.path.join(workdir, "weights.npz")
        lineage.export_weights(run_dir, weights)
        state_obj = objects.put_file(f"{prefix}/state.tar", state_tar)
        weights_obj = objects.put_file(f"{prefix}/weights.npz", weights)
        jobs.finish(
            engine,
            job_id,
            worker,
            {
                "lineage_id": plan.lineage_id,
                "number": plan.number,
                "dataset_id": plan.dataset_id,
                "state": _obj(state_obj),
                "weights": _obj(weights_obj),
                "metrics": lineage.version_metrics(
                    results, learning, plan.spec.get("class_names", ())
                ),
            },
        )
        return ended("succeeded", version=plan.number, **learning)
    except jobs.LeaseLost:
        return ended("lost")
    except TRANSIENT as err:
        msg = jobs.one_line_error(err)
        logging.warning("job %s: transient error: %s", job_id, msg)
        state = jobs.retry_or_fail(engine, job_id, worker, settings.max_attempts, msg)
        return ended(state, error=msg)
    except Exception as err:  # the job's own failure (bad data, NaN loss): recorded, not raised
        msg = jobs.one_line_error(err)
        jobs.end(engine, job_id, worker, "failed", msg)
        return ended("failed", error=msg)
    finally:
        stop.set()
        beater.join()
        shutil.rmtree(workdir, ignore_errors=True)
        # A job that ended leaves no mid-job checkpoints behind (a crash before this line
        # leaves them to garbage.orphans); a requeued one keeps them to resume from.
        try:
            garbage.job_checkpoints(engine, objects, job_id)
        except TRANSIENT as err:
            logging.warning(
                "job %s: checkpoints not collected: %s", job_id, jobs.one_line_error(err)
            )


class InProcessWorker:
    """The embedded mode's worker: one thread that claims jobs as they come, plus the reaper."""

    def __init__(self, settings: Settings, engine: sa.Engine, objects: store.ObjectStore):
        self.settings, self.engine, self.objects = settings, engine, objects
        self.id = worker_id()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="clseg-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                jobs.reap(self.engine, self.settings.max_attempts)
                job_id = jobs.claim(self.engine, self.id, self.settings.lease_s)
            except TRANSIENT as err:
                logging.warning("worker: %s", jobs.one_line_error(err))
                job_id = None
            if job_id is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            execute(self.settings, self.engine, self.objects, job_id, self.id, self._stop)
