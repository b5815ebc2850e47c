"""Renaming and deleting lineages and datasets, and garbage collection of the object store
(``serve/garbage.py``): what may be deleted when, and that no referenced object is ever
deleted, whatever point a writer crashed at.

Rows that training would make (versions, ended jobs, checkpoints) are written directly, as the
worker writes them (object first, then the row), so no test here trains.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import orm

from clseg_jax.serve import api, db, example, garbage, store
from clseg_jax.serve.db import Dataset, Job, Lineage, Version
from clseg_jax.serve.settings import Settings

SPEC = {"image_size": [32, 32], "model_widths": [4, 8], "epochs": 1}
HOUR = 3600.0


@pytest.fixture()
def app(tmp_path):
    settings = Settings(
        db_url=f"sqlite:///{tmp_path}/clseg.db",
        store_url=str(tmp_path / "objects"),
        queue="inprocess",
        scratch=str(tmp_path / "scratch"),
    )
    application = api.create_app(settings, start_worker=False)
    engine = db.make_engine(settings.db_url)
    auth = {
        who: {"Authorization": f"Bearer {api.create_token(engine, who)}"}
        for who in ("alice", "bob")
    }
    with TestClient(application) as client:
        yield client, auth, engine, store.LocalStore(tmp_path / "objects")


@pytest.fixture(scope="module")
def arrays():
    return example.experiences(1, size=32, n_train=8, n_test=4)[0]


def _upload(client, auth, arrays) -> dict:
    r = client.post(
        "/datasets?num_classes=2",
        files={"file": ("exp.zip", example.zip_bytes(arrays))},
        headers=auth,
    )
    assert r.status_code == 201, r.text
    return r.json()


def _lineage(client, auth) -> str:
    r = client.post("/lineages", json={"name": "l", **SPEC}, headers=auth)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _version(engine, objects, lineage_id, dataset_id, number=1) -> tuple[str, list[str]]:
    """A succeeded job and its version, objects first, as ``worker.execute`` writes them."""
    with orm.Session(engine) as s, s.begin():
        owner = s.get(Lineage, lineage_id).owner
        job = Job(owner=owner, lineage_id=lineage_id, dataset_id=dataset_id, state="succeeded")
        s.add(job)
        s.flush()
        prefix = f"lineages/{lineage_id}/versions/{number}-{job.id}"
        state = objects.put_bytes(f"{prefix}/state.tar", b"state")
        weights = objects.put_bytes(f"{prefix}/weights.npz", b"weights")
        s.add(
            Version(
                lineage_id=lineage_id,
                number=number,
                job_id=job.id,
                dataset_id=dataset_id,
                state=_obj(state),
                weights=_obj(weights),
                metrics={},
            )
        )
        job_id = job.id
    return job_id, [state.key, weights.key]


def _obj(o: store.StoredObject) -> dict:
    return {"key": o.key, "size": o.size, "sha256": o.sha256}


def _job(engine, objects, lineage_id, dataset_id, state, checkpoint=True) -> tuple[str, str]:
    """A job in ``state`` with a mid-job checkpoint object (referenced while it runs)."""
    with orm.Session(engine) as s, s.begin():
        owner = s.get(Lineage, lineage_id).owner
        job = Job(owner=owner, lineage_id=lineage_id, dataset_id=dataset_id, state=state)
        s.add(job)
        s.flush()
        ckpt = objects.put_bytes(f"jobs/{job.id}/checkpoint-1.tar", b"ckpt")
        if checkpoint:
            job.checkpoint = _obj(ckpt)
        return job.id, ckpt.key


def _age(objects: store.LocalStore, key: str, seconds: float) -> None:
    path = os.path.join(objects.root, key)
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_renames_keep_ids_and_owners(app, arrays):
    client, auth, _, _ = app
    a, b = auth["alice"], auth["bob"]
    lid = _lineage(client, a)
    ds = _upload(client, a, arrays)["id"]
    r = client.patch(f"/lineages/{lid}", json={"name": "renamed"}, headers=a)
    assert r.status_code == 200 and r.json()["name"] == "renamed" and r.json()["id"] == lid
    r = client.patch(f"/datasets/{ds}", json={"filename": "day-2.zip"}, headers=a)
    assert r.status_code == 200 and r.json()["filename"] == "day-2.zip"
    assert client.patch(f"/lineages/{lid}", json={"name": "x"}, headers=b).status_code == 404
    assert client.delete(f"/datasets/{ds}", headers=b).status_code == 404
    assert client.patch(f"/lineages/{lid}", json={"name": ""}, headers=a).status_code == 422


def test_a_dataset_in_use_is_refused_deletion_and_shared_content_survives(app, arrays):
    client, auth, engine, objects = app
    a, b = auth["alice"], auth["bob"]
    lid = _lineage(client, a)
    used = _upload(client, a, arrays)
    _version(engine, objects, lid, used["id"])
    r = client.delete(f"/datasets/{used['id']}", headers=a)
    assert r.status_code == 409 and f"experience 1 of lineage {lid}" in r.json()["detail"]

    other = {**arrays, "x_train": arrays["x_train"][::-1].copy()}
    queued = _upload(client, a, other)
    r = client.post("/jobs", json={"lineage_id": lid, "dataset_id": queued["id"]}, headers=a)
    job_id = r.json()["id"]
    r = client.delete(f"/datasets/{queued['id']}", headers=a)
    assert r.status_code == 409 and f"job {job_id} (queued)" in r.json()["detail"]
    assert client.post(f"/jobs/{job_id}/cancel", headers=a).status_code == 202

    # Bob holds the same content: Alice's delete takes her row and the cancelled job, not the
    # object Bob's row needs.
    bobs = _upload(client, b, other)
    assert bobs["sha256"] == queued["sha256"]
    assert client.delete(f"/datasets/{queued['id']}", headers=a).status_code == 204
    assert client.get(f"/datasets/{queued['id']}", headers=a).status_code == 404
    assert client.get(f"/jobs/{job_id}", headers=a).status_code == 404
    key = f"datasets/{queued['sha256']}.npz"
    assert objects.stat(key) is not None
    assert client.delete(f"/datasets/{bobs['id']}", headers=b).status_code == 204
    assert objects.stat(key) is None  # the last row that needed it is gone


def test_a_lineage_is_deleted_with_its_versions_and_jobs_once_none_runs(app, arrays):
    client, auth, engine, objects = app
    a = auth["alice"]
    lid = _lineage(client, a)
    ds = _upload(client, a, arrays)
    _, version_keys = _version(engine, objects, lid, ds["id"])
    running, ckpt = _job(engine, objects, lid, ds["id"], "running")
    r = client.delete(f"/lineages/{lid}", headers=a)
    assert r.status_code == 409 and f"job {running} of lineage {lid} is running" in r.text
    with orm.Session(engine) as s, s.begin():
        s.get(Job, running).state = "failed"
    assert client.delete(f"/lineages/{lid}", headers=a).status_code == 204
    assert client.get(f"/lineages/{lid}", headers=a).status_code == 404
    for key in [*version_keys, ckpt]:
        assert objects.stat(key) is None, key
    # Its dataset stays, and can now go too: nothing uses it any more.
    assert client.get(f"/datasets/{ds['id']}", headers=a).status_code == 200
    assert client.delete(f"/datasets/{ds['id']}", headers=a).status_code == 204


def test_gc_never_deletes_what_a_row_references_whatever_the_crash_point(app, arrays):
    """Each writer stores its object, then commits the row: a crash between leaves an
    unreferenced object, young (kept, it may be a write in flight) or old (garbage). A crash
    after a job ended, or after a lineage's rows were deleted, leaves garbage that gc takes."""
    client, auth, engine, objects = app
    a = auth["alice"]
    lid = _lineage(client, a)
    ds = _upload(client, a, arrays)
    _, version_keys = _version(engine, objects, lid, ds["id"])
    running, running_ckpt = _job(engine, objects, lid, ds["id"], "running")
    queued, queued_ckpt = _job(engine, objects, lid, ds["id"], "queued")  # requeued, resumes
    _, ended_ckpt = _job(engine, objects, lid, ds["id"], "cancelled")  # crashed before
    # Crashes between an object and its row: an upload, a checkpoint, a version.
    in_flight = [
        objects.put_bytes("datasets/" + "0" * 64 + ".npz", b"upload").key,
        objects.put_bytes(f"jobs/{running}/checkpoint-2.tar", b"next checkpoint").key,
        objects.put_bytes(f"lineages/{lid}/versions/2-{running}/state.tar", b"v2").key,
    ]
    referenced = [f"datasets/{ds['sha256']}.npz", *version_keys, running_ckpt, queued_ckpt]
    for key in [*referenced, ended_ckpt]:
        _age(objects, key, 10 * HOUR)

    assert garbage.job_checkpoints(engine, objects, running) == 0  # not ended: kept
    assert sorted(garbage.orphans(engine, objects, grace_s=HOUR)) == [ended_ckpt]
    for key in [*referenced, *in_flight]:
        assert objects.stat(key) is not None, key

    # An hour later the writes in flight never got their rows: garbage now.
    later = time.time() + 2 * HOUR
    assert sorted(garbage.orphans(engine, objects, grace_s=HOUR, now=later)) == sorted(in_flight)
    for key in referenced:
        assert objects.stat(key) is not None, key

    # The job ends; its worker collects its checkpoints (the one a retry would resume from too).
    with orm.Session(engine) as s, s.begin():
        s.get(Job, running).state = "succeeded"
    assert garbage.job_checkpoints(engine, objects, running) == 1
    assert objects.stat(running_ckpt) is None and objects.stat(queued_ckpt) is not None

    # A lineage deletion that crashed after its commit, before deleting objects.
    with orm.Session(engine) as s, s.begin():
        s.get(Job, queued).state = "cancelled"
        s.query(Version).filter(Version.lineage_id == lid).delete()
        s.query(Job).filter(Job.lineage_id == lid).delete()
        s.query(Lineage).filter(Lineage.id == lid).delete()
    gone = garbage.orphans(engine, objects, grace_s=HOUR, now=later)
    assert sorted(gone) == sorted([*version_keys, queued_ckpt])
    assert objects.stat(f"datasets/{ds['sha256']}.npz") is not None  # its dataset row stays
    with orm.Session(engine) as s:
        assert s.get(Dataset, ds["id"]) is not None


def test_admin_tokens_list_and_revoke_and_tokens_expire(app, tmp_path, monkeypatch, capsys):
    client, auth, engine, _ = app
    root = {"Authorization": f"Bearer {api.create_token(engine, 'root', admin=True)}"}
    assert client.get("/admin/tokens", headers=auth["alice"]).status_code == 403
    rows = client.get("/admin/tokens", headers=root).json()
    assert sorted(r["owner"] for r in rows) == ["alice", "bob", "root"]
    assert all(set(r) == {"id", "owner", "admin", "created_at", "expires_at"} for r in rows)
    bob = next(r["id"] for r in rows if r["owner"] == "bob")
    assert client.get("/lineages", headers=auth["bob"]).status_code == 200
    assert client.delete(f"/admin/tokens/{bob}", headers=root).status_code == 204
    r = client.get("/lineages", headers=auth["bob"])
    assert r.status_code == 401 and r.json()["detail"] == "unknown token"
    assert client.delete(f"/admin/tokens/{bob}", headers=root).status_code == 404

    brief = api.create_token(engine, "carol", expires_in_s=-1.0)  # already past its expiry
    r = client.get("/lineages", headers={"Authorization": f"Bearer {brief}"})
    assert r.status_code == 401 and r.json()["detail"] == "token expired"

    # The command line makes admin and expiring tokens (printed once, stored hashed).
    from clseg_jax.serve import __main__ as cli

    monkeypatch.setenv("CLSEG_HOME", str(tmp_path / "home"))
    cli.main(["token", "--owner", "ops", "--admin", "--expires-in-days", "2"])
    printed = capsys.readouterr().out.strip()
    home_engine = db.make_engine(f"sqlite:///{tmp_path}/home/clseg.db")
    with orm.Session(home_engine) as s:
        (row,) = s.query(db.Token).all()
    assert row.owner == "ops" and row.admin and printed not in row.token_hash
    assert abs(row.expires_at - (time.time() + 2 * 86400)) < 60


def test_a_fork_keeps_its_starting_state_and_datasets_when_its_parent_goes(app, arrays):
    client, auth, engine, objects = app
    a = auth["alice"]
    lid = _lineage(client, a)
    ds = _upload(client, a, arrays)
    _, (state_key, weights_key) = _version(engine, objects, lid, ds["id"])
    r = client.post(f"/lineages/{lid}/fork", json={"name": "fork", "version": 1}, headers=a)
    assert r.status_code == 201, r.text
    fork = r.json()["id"]
    assert client.delete(f"/lineages/{lid}", headers=a).status_code == 204
    assert objects.stat(weights_key) is None  # the parent's own
    assert objects.stat(state_key) is not None  # what the fork starts from
    _age(objects, state_key, 10 * HOUR)
    assert garbage.orphans(engine, objects, grace_s=HOUR) == []
    r = client.delete(f"/datasets/{ds['id']}", headers=a)
    assert r.status_code == 409 and f"lineage {fork}, a fork" in r.json()["detail"]
    assert client.delete(f"/lineages/{fork}", headers=a).status_code == 204
    assert objects.stat(state_key) is None  # nothing needs it any more
    assert client.delete(f"/datasets/{ds['id']}", headers=a).status_code == 204


def _samples(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value} (comments dropped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_metrics_count_jobs_and_requests_and_need_a_token(app, arrays, tmp_path):
    client, auth, engine, objects = app
    a = auth["alice"]
    assert client.get("/metrics").status_code == 401
    lid = _lineage(client, a)
    ds = _upload(client, a, arrays)
    client.post("/jobs", json={"lineage_id": lid, "dataset_id": ds["id"]}, headers=a)
    with orm.Session(engine) as s, s.begin():  # an ended job that ran 12.5 s
        s.add(
            Job(
                owner="alice",
                lineage_id=lid,
                dataset_id=ds["id"],
                state="failed",
                started_at=100.0,
                finished_at=112.5,
            )
        )
    assert client.get("/lineages/" + "0" * 32, headers=a).status_code == 404
    r = client.get("/metrics", headers=a)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = _samples(r.text)
    assert m['clseg_jobs{state="queued"}'] == 1 and m['clseg_jobs{state="failed"}'] == 1
    assert m["clseg_queue_depth"] == 1
    assert m['clseg_job_seconds_sum{state="failed"}'] == 12.5
    assert m['clseg_job_seconds_count{state="failed"}'] == 1
    route = 'clseg_http_requests_total{method="GET",route="/lineages/{lineage_id}",status="404"}'
    assert m[route] == 1
    assert m['clseg_http_requests_total{method="POST",route="/datasets",status="201"}'] == 1
    assert m['clseg_http_requests_total{method="GET",route="/metrics",status="401"}'] == 1

    public = Settings(
        db_url=str(engine.url),
        store_url=objects.root,
        queue="inprocess",
        scratch=str(tmp_path / "scratch2"),
        metrics_public=True,
    )
    with TestClient(api.create_app(public, start_worker=False)) as other:
        r = other.get("/metrics")
        assert r.status_code == 200 and "clseg_queue_depth 1" in r.text


def test_uploaded_weights_are_kept_while_a_row_needs_them(app, tmp_path):
    client, auth, engine, objects = app
    a = auth["alice"]
    path = tmp_path / "w.npz"
    np.savez(path, **{"params/stem/kernel": np.ones((3, 3, 3, 4), np.float32)})
    r = client.post("/weights", files={"file": ("w.npz", path.read_bytes())}, headers=a)
    assert r.status_code == 201, r.text
    key = f"weights/{r.json()['sha256']}.npz"
    _age(objects, key, 10 * HOUR)
    assert garbage.orphans(engine, objects, grace_s=HOUR) == []
    assert client.get("/weights", headers=a).json()[0]["summary"] == {
        "arrays": 1,
        "parameters": 108,
    }
    assert client.delete(f"/weights/{r.json()['id']}", headers=a).status_code == 204
    assert objects.stat(key) is None
