"""The production path against real servers on loopback: PostgreSQL, Redis (Celery's broker),
SeaweedFS S3, the API and Celery workers as separate processes (``python -m clseg_jax.serve``).

* concurrent submissions with one idempotency key make one job;
* the API killed (SIGKILL) in the middle of uploads leaves no dataset row without its object;
* a worker killed (SIGKILL) mid-job: the job is reclaimed after its lease, resumes from its last
  checkpoint on another worker and finishes once, with the results of an uninterrupted run;
* while that job trains, a bounded load of status and predict requests meets no error (the
  throughput and p99 latency are printed; ``experiments/serve_load.py`` measures them properly);
* a job whose data vanished ends ``failed`` with its error, never stuck;
* a worker stopped with SIGTERM hands its running job back to the queue (checkpointed); the next
  worker finishes it.
"""

# ruff: noqa: F811  (fixture arguments shadow the fixtures imported from tests.serve_servers)

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image
from sqlalchemy import orm

from clseg_jax import train
from clseg_jax.data import npz
from clseg_jax.serve import api, db, example, lineage, store
from tests.serve_servers import free_ports, postgres_url, redis_url, s3_store_env  # noqa: F401

SPEC = {
    "image_size": [32, 32],
    "model_widths": [4, 8],
    "epochs": 3,
    "batch_size": 4,
    "checkpoint_every_steps": 2,
}
LEASE_S = 4


class Service:
    """The API and workers as subprocesses sharing one environment."""

    def __init__(self, tmp, pg, redis, s3):
        self.tmp = tmp
        self.env = {
            **os.environ,
            "CLSEG_DB": pg,
            "CLSEG_STORE": f"s3://{s3['bucket']}?endpoint={s3['endpoint_url']}",
            "AWS_ACCESS_KEY_ID": s3["access_key"],
            "AWS_SECRET_ACCESS_KEY": s3["secret_key"],
            "CLSEG_QUEUE": redis,
            "CLSEG_LEASE_S": str(LEASE_S),
            "CLSEG_MAX_ATTEMPTS": "3",
            "JAX_PLATFORMS": "cpu",
        }
        self.engine = db.make_engine(pg)
        self.objects = store.S3Store(**s3)
        self.api: subprocess.Popen | None = None
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.logs = 0

    def _spawn(self, *args: str, scratch: str) -> tuple[subprocess.Popen, str]:
        self.logs += 1
        log = str(self.tmp / f"{args[0]}-{self.logs}.log")
        env = {**self.env, "CLSEG_SCRATCH": str(self.tmp / scratch)}
        with open(log, "wb") as f:
            p = subprocess.Popen(
                [sys.executable, "-m", "clseg_jax.serve", *args],
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # SIGKILL of the group takes its children too
            )
        return p, log

    def start_api(self) -> None:
        self.api, self.api_log = self._spawn("serve", "--port", str(self.port), scratch="api")
        t0 = time.time()
        while time.time() - t0 < 60:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError(f"API did not start: {open(self.api_log).read()[-2000:]}")

    def start_worker(self, name: str) -> tuple[subprocess.Popen, str]:
        return self._spawn("worker", scratch=f"scratch-{name}")

    @staticmethod
    def kill(p: subprocess.Popen) -> None:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)

    def job(self, job_id: str) -> db.Job:
        with orm.Session(self.engine) as s:
            return s.get(db.Job, job_id)


@pytest.fixture(scope="module")
def service(tmp_path_factory, postgres_url, redis_url, s3_store_env):
    svc = Service(tmp_path_factory.mktemp("prod"), postgres_url, redis_url, s3_store_env)
    svc.start_api()
    token = api.create_token(svc.engine, "alice")
    svc.client = httpx.Client(
        base_url=svc.url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    )
    yield svc
    svc.client.close()
    if svc.api is not None:
        svc.kill(svc.api)


@pytest.fixture(scope="module")
def experiences():
    return example.experiences(2, size=32, n_train=24, n_test=8)


def _upload(client, arrays, name="exp.zip"):
    r = client.post("/datasets?num_classes=2", files={"file": (name, example.zip_bytes(arrays))})
    assert r.status_code == 201, r.text
    return r.json()


def _lineage(client, **kw):
    r = client.post("/lineages", json={"name": "prod", **SPEC, **kw})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _wait(svc, job_id, until, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        job = svc.job(job_id)
        if until(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id}: condition not met in {timeout} s (state {job.state})")


def test_concurrent_submissions_with_one_key_make_one_job(service, experiences):
    client = service.client
    lid = _lineage(client)
    ds = _upload(client, experiences[0])["id"]
    body = {"lineage_id": lid, "dataset_id": ds}
    barrier = threading.Barrier(8)

    def submit(_):
        barrier.wait()
        return client.post("/jobs", json=body, headers={"Idempotency-Key": "same-key"})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(submit, range(8)))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    with orm.Session(service.engine) as s:
        n = s.scalar(sa.select(sa.func.count()).select_from(db.Job).where(db.Job.lineage_id == lid))
    assert n == 1
    # No worker runs yet: cancel it so the later tests' workers skip it.
    assert client.post(f"/jobs/{responses[0].json()['id']}/cancel").json()["state"] == "cancelled"


def test_api_killed_mid_upload_leaves_no_row_without_object(service):
    arrays = example.experiences(6, size=32, n_train=48, n_test=8, seed=7)
    payloads = [example.zip_bytes(a) for a in arrays]

    def upload(data):
        try:
            return service.client.post(
                "/datasets?num_classes=2", files={"file": ("x.zip", data)}
            ).status_code
        except httpx.HTTPError as err:
            return type(err).__name__

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(upload, p) for p in payloads]
        while not any(f.done() for f in futures):  # the first upload landed: others in flight
            time.sleep(0.01)
        service.kill(service.api)
        outcomes = [f.result() for f in futures]
    assert 201 in outcomes and any(o != 201 for o in outcomes), outcomes
    service.start_api()
    with orm.Session(service.engine) as s:
        rows = s.scalars(sa.select(db.Dataset)).all()
    for row in rows:  # every row's object exists and is what the row says
        service.objects.get_bytes(row.key, expect=store.StoredObject(row.key, row.size, row.sha256))
    assert service.client.get("/health").status_code == 200


def test_killed_worker_resumes_and_finishes_once(service, experiences, tmp_path):
    client = service.client
    lid = _lineage(client, strategy="ewc")
    ids = [_upload(client, e, name=f"e{i}.zip")["id"] for i, e in enumerate(experiences)]
    first, _ = service.start_worker("a")
    try:
        j1 = client.post("/jobs", json={"lineage_id": lid, "dataset_id": ids[0]}).json()
        j2 = client.post("/jobs", json={"lineage_id": lid, "dataset_id": ids[1]}).json()
        _wait(service, j1["id"], lambda j: j.state == "succeeded")
        # Job 2 has saved a checkpoint a few steps in: kill its worker outright.
        job = _wait(service, j2["id"], lambda j: (j.progress or {}).get("step_in_phase", 0) >= 5)
        assert job.checkpoint is not None and job.state == "running"
    finally:
        service.kill(first)
    killed_at = service.job(j2["id"]).progress["step_in_phase"]
    second, log_b = service.start_worker("b")
    try:
        # Load while the job trains on the second worker: status and predict on version 1.
        v1 = client.get(f"/lineages/{lid}/versions").json()[0]["id"]
        png = io.BytesIO()
        Image.fromarray(experiences[0]["x_test"][0]).save(png, "PNG")
        latencies, errors = [], []

        def hit(i):
            t0 = time.perf_counter()
            if i % 2:
                r = client.get(f"/jobs/{j2['id']}")
            else:
                r = client.post(
                    f"/versions/{v1}/predict", files={"image": ("x.png", png.getvalue())}
                )
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                errors.append(r.status_code)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(hit, range(120)))
        wall = time.perf_counter() - t0
        assert errors == []
        print(
            f"load: {len(latencies) / wall:.1f} req/s, "
            f"p99 {np.percentile(latencies, 99) * 1e3:.0f} ms over {len(latencies)} requests"
        )

        done = _wait(service, j2["id"], lambda j: j.state in db.TERMINAL)
        assert done.state == "succeeded", done.error
        assert done.attempts == 2
        resumed = [line for line in open(log_b) if "resumed from checkpoint" in line]
        assert resumed, open(log_b).read()[-3000:]
        step = int(resumed[0].rsplit("step", 1)[1].split()[0])
        assert 0 < step <= killed_at + 1  # from its own checkpoint, not from the start

        # A job whose dataset vanished from the store ends failed, not stuck.
        flipped = {**experiences[0], "x_train": experiences[0]["x_train"][::-1].copy()}
        lost = _upload(client, flipped)
        service.objects.delete(f"datasets/{lost['sha256']}.npz")
        j3 = client.post(
            "/jobs", json={"lineage_id": _lineage(client), "dataset_id": lost["id"]}
        ).json()
        failed = _wait(service, j3["id"], lambda j: j.state in db.TERMINAL)
        assert failed.state == "failed" and failed.error.startswith("StoreError")
    finally:
        service.kill(second)

    versions = client.get(f"/lineages/{lid}/versions").json()
    assert [v["number"] for v in versions] == [1, 2]  # once: no duplicate version
    R = client.get(f"/versions/{versions[1]['id']}/metrics").json()["accuracy_matrix"]

    # The uninterrupted reference: both experiences in one train.run.
    npz.write(tmp_path / "data", experiences)
    spec = lineage.validate_spec({**SPEC, "strategy": "ewc"})
    ref = train.run(lineage.train_config(spec, str(tmp_path / "data")), str(tmp_path / "ref"))
    np.testing.assert_allclose(np.array(R[1], float), ref["accuracy_matrix"][1], rtol=1e-6)


def test_sigterm_hands_the_running_job_back_to_the_queue(service, experiences):
    client = service.client
    lid = _lineage(client, epochs=30)
    ds = _upload(client, experiences[1], name="again.zip")["id"]
    leaving, _ = service.start_worker("c")
    try:
        job = client.post("/jobs", json={"lineage_id": lid, "dataset_id": ds}).json()
        _wait(service, job["id"], lambda j: (j.progress or {}).get("step_in_phase", 0) >= 3)
        leaving.send_signal(signal.SIGTERM)  # Celery's warm shutdown
        assert leaving.wait(timeout=60) == 0
    finally:
        service.kill(leaving)
    row = service.job(job["id"])
    assert row.state == "queued" and row.checkpoint is not None, (row.state, row.error)
    taker, _ = service.start_worker("d")
    try:
        done = _wait(service, job["id"], lambda j: j.state in db.TERMINAL)
    finally:
        service.kill(taker)
    assert done.state == "succeeded" and done.attempts == 2, done.error


def test_a_celery_worker_stops_a_cancelled_job_within_a_step(service, experiences):
    """Cancel through the API while a Celery worker trains: the job ends ``cancelled`` within
    about one step (the worker polls the flag every 0.2 s; a step here takes milliseconds), with
    no version, and its mid-job checkpoints are deleted from the S3 store (listed there)."""
    client = service.client
    lid = _lineage(client, epochs=400)
    ds = _upload(client, experiences[0], name="cancel.zip")["id"]
    worker, log = service.start_worker("e")
    try:
        job = client.post("/jobs", json={"lineage_id": lid, "dataset_id": ds}).json()
        running = _wait(service, job["id"], lambda j: j.checkpoint is not None)
        assert running.checkpoint["key"] in dict(service.objects.list(f"jobs/{job['id']}/"))
        assert client.post(f"/jobs/{job['id']}/cancel").status_code == 202
        asked = time.monotonic()
        done = _wait(service, job["id"], lambda j: j.state in db.TERMINAL, timeout=60)
        assert time.monotonic() - asked < 1.5, open(log).read()[-2000:]
        assert done.state == "cancelled" and done.version_id is None
        deadline = time.monotonic() + 10
        while list(service.objects.list(f"jobs/{job['id']}/")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(service.objects.list(f"jobs/{job['id']}/")) == []
    finally:
        service.kill(worker)
    assert client.get(f"/lineages/{lid}/versions").json() == []


def test_two_workers_with_their_own_folders_share_the_queue(service, experiences):
    """The multi-machine deployment (docs/service.md): two Celery workers that share only
    PostgreSQL, Redis and S3, each with its own scratch folder, take one job each of two
    lineages at once and both finish; each job's worker is recorded in its events."""
    client = service.client
    ds = _upload(client, experiences[0], name="two.zip")["id"]
    lineages = [_lineage(client, epochs=20) for _ in range(2)]
    workers = [service.start_worker(name) for name in ("m1", "m2")]
    try:
        job_ids = [
            client.post("/jobs", json={"lineage_id": lid, "dataset_id": ds}).json()["id"]
            for lid in lineages
        ]
        done = [_wait(service, j, lambda job: job.state in db.TERMINAL) for j in job_ids]
    finally:
        for w, _ in workers:
            service.kill(w)
    assert [d.state for d in done] == ["succeeded", "succeeded"], [d.error for d in done]
    started = {}
    for _, log in workers:
        for line in open(log):
            if "job_event " in line and '"started"' in line:
                event = json.loads(line.split("job_event ", 1)[1])
                started[event["job_id"]] = event["worker"]
    assert set(started) >= set(job_ids), started
    assert started[job_ids[0]] != started[job_ids[1]]  # one each, not one after the other
    assert (service.tmp / "scratch-m1").is_dir() and (service.tmp / "scratch-m2").is_dir()
