"""The service's API in embedded mode (SQLite, local folder, in-process worker), in-process.

``idle``: an app without a worker, for what must hold before anything trains (auth, ownership,
validation, upload limits, idempotency, cancelling queued jobs). ``live``: an app whose worker
trains, for the whole session of the README: upload, lineage, two jobs, metrics, weights,
predict, and a failing job that ends ``failed``.
"""

from __future__ import annotations

import io
import os
import time
import zipfile

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import orm

from clseg_jax import models, train
from clseg_jax.data import npz
from clseg_jax.models import weights as weights_lib
from clseg_jax.serve import api, db, example, lineage
from clseg_jax.serve.db import Job
from clseg_jax.serve.settings import Settings

SPEC = {"image_size": [32, 32], "model_widths": [4, 8], "epochs": 1, "checkpoint_every_steps": 1}


def _settings(home, **kw) -> Settings:
    return Settings(
        db_url=f"sqlite:///{home}/clseg.db",
        store_url=str(home / "objects"),
        queue="inprocess",
        scratch=str(home / "scratch"),
        **kw,
    )


@pytest.fixture(scope="module")
def experiences():
    return example.experiences(2, size=32, n_train=16, n_test=8)


def _client(home, start_worker: bool, **kw):
    settings = _settings(home, **kw)
    app = api.create_app(settings, start_worker=start_worker)
    engine = db.make_engine(settings.db_url)
    tokens = {who: api.create_token(engine, who) for who in ("alice", "bob")}
    return app, {who: {"Authorization": f"Bearer {t}"} for who, t in tokens.items()}


@pytest.fixture(scope="module")
def idle(tmp_path_factory):
    app, auth = _client(tmp_path_factory.mktemp("idle"), False, max_upload_bytes=2**20)
    with TestClient(app) as client:
        yield client, auth


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    home = tmp_path_factory.mktemp("live")
    app, auth = _client(home, True, lease_s=6, max_attempts=2)
    with TestClient(app) as client:
        yield client, auth, home


def _upload(client, auth, arrays, name="exp.zip", num_classes=2):
    return client.post(
        f"/datasets?num_classes={num_classes}",
        files={"file": (name, example.zip_bytes(arrays))},
        headers=auth,
    )


def _lineage(client, auth, **kw):
    r = client.post("/lineages", json={"name": "t", **SPEC, **kw}, headers=auth)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _wait(client, auth, job_id, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        job = client.get(f"/jobs/{job_id}", headers=auth).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s")


def _wait_for_progress(client, auth, job_id, timeout=120):
    t0 = time.time()
    while not client.get(f"/jobs/{job_id}", headers=auth).json()["progress"]:
        assert time.time() - t0 < timeout, f"job {job_id} never reported progress"
        time.sleep(0.2)


# -- before anything trains -------------------------------------------------------------------


def test_every_route_but_health_needs_a_token(idle):
    client, _ = idle
    assert client.get("/health").status_code == 200
    for path in ("/lineages", "/datasets", "/jobs"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
    schema = client.get("/openapi.json").json()
    assert "/versions/{version_id}/predict" in schema["paths"]


def test_owners_see_only_their_own_rows(idle, experiences):
    client, auth = idle
    lid = _lineage(client, auth["alice"])
    ds = _upload(client, auth["alice"], experiences[0]).json()["id"]
    assert client.get(f"/lineages/{lid}", headers=auth["bob"]).status_code == 404
    assert client.get(f"/datasets/{ds}", headers=auth["bob"]).status_code == 404
    assert lid not in [x["id"] for x in client.get("/lineages", headers=auth["bob"]).json()]
    r = client.post("/jobs", json={"lineage_id": lid, "dataset_id": ds}, headers=auth["bob"])
    assert r.status_code == 404


def test_bodies_are_typed_and_closed(idle):
    client, auth = idle
    bad = [
        {"name": "x", "num_classes": "3"},  # numbers are numbers
        {"name": "x", "epochs": 1.5},
        {"name": "x", "colour": "red"},  # unknown fields are errors
        {"name": "", "num_classes": 3},
        {"name": "x", "image_size": [32]},
    ]
    for body in bad:
        assert client.post("/lineages", json=body, headers=auth["alice"]).status_code == 422
    r = client.post("/lineages", json={"name": "x", "strategy": "nope"}, headers=auth["alice"])
    assert r.status_code == 400 and "unknown strategy 'nope'" in r.json()["detail"]
    body = {"name": "x", "strategy": "ewc", "strategy_params": {"ewc_lambda": "big"}}
    r = client.post("/lineages", json=body, headers=auth["alice"])
    assert r.status_code == 400 and "'ewc_lambda' must be float" in r.json()["detail"]
    body["strategy_params"] = {"ewc_lambda": 5}  # an int where a float goes is fine
    assert client.post("/lineages", json=body, headers=auth["alice"]).status_code == 201
    r = client.post("/lineages", json={"name": "x", "image_size": [30, 30]}, headers=auth["alice"])
    assert r.status_code == 400 and "multiples of 4" in r.json()["detail"]


def test_uploads_are_checked_with_one_line_errors(idle, experiences):
    client, auth = idle
    bad_labels = {**experiences[0], "y_train": np.full_like(experiences[0]["y_train"], 3)}
    r = _upload(client, auth["alice"], bad_labels)
    assert r.status_code == 400 and "label 3" in r.json()["detail"]
    assert "\n" not in r.json()["detail"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("../evil.png", b"x")
    r = client.post(
        "/datasets?num_classes=2", files={"file": ("x.zip", buf.getvalue())}, headers=auth["alice"]
    )
    assert r.status_code == 400 and ".." in r.json()["detail"]
    big = os.urandom(3 * 2**20)  # over the fixture's 1 MiB limit (+1 MiB of form overhead)
    r = client.post(
        "/datasets?num_classes=2", files={"file": ("x.npz", big)}, headers=auth["alice"]
    )
    assert r.status_code == 413
    # Content addressing: the same arrays again are the same dataset.
    a = _upload(client, auth["alice"], experiences[1]).json()
    b = _upload(client, auth["alice"], experiences[1], name="again.zip").json()
    assert a["id"] == b["id"] and a["sha256"] == b["sha256"]


def test_idempotency_key_returns_the_first_job(idle, experiences):
    client, auth = idle
    lid = _lineage(client, auth["alice"])
    d0 = _upload(client, auth["alice"], experiences[0]).json()["id"]
    d1 = _upload(client, auth["alice"], experiences[1]).json()["id"]
    headers = {**auth["alice"], "Idempotency-Key": "upload-42"}
    first = client.post("/jobs", json={"lineage_id": lid, "dataset_id": d0}, headers=headers)
    again = client.post("/jobs", json={"lineage_id": lid, "dataset_id": d0}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    other = client.post("/jobs", json={"lineage_id": lid, "dataset_id": d1}, headers=headers)
    assert other.status_code == 409
    jobs = client.get(f"/jobs?lineage_id={lid}", headers=auth["alice"]).json()
    assert [j["id"] for j in jobs] == [first.json()["id"]]
    # Without a worker the job stays queued; cancelling it ends it at once.
    r = client.post(f"/jobs/{first.json()['id']}/cancel", headers=auth["alice"])
    assert r.status_code == 202 and r.json()["state"] == "cancelled"
    assert (
        client.post(f"/jobs/{first.json()['id']}/cancel", headers=auth["alice"]).status_code == 409
    )


def test_job_checks_dataset_against_lineage(idle, experiences):
    client, auth = idle
    lid = _lineage(client, auth["alice"], image_size=[16, 16])
    ds = _upload(client, auth["alice"], experiences[0]).json()["id"]
    r = client.post("/jobs", json={"lineage_id": lid, "dataset_id": ds}, headers=auth["alice"])
    assert r.status_code == 400 and "32x32" in r.json()["detail"]
    r = client.post(
        "/jobs", json={"lineage_id": lid, "dataset_id": "0" * 31}, headers=auth["alice"]
    )
    assert r.status_code == 422


# -- training ---------------------------------------------------------------------------------


def test_two_jobs_grow_a_lineage_as_one_run_would(live, experiences, tmp_path):
    client, auth, _ = live
    a = auth["alice"]
    lid = _lineage(client, a, strategy="ewc")
    ids = [
        _upload(client, a, e, name=f"exp{i}.zip").json()["id"] for i, e in enumerate(experiences)
    ]
    jobs = [
        client.post("/jobs", json={"lineage_id": lid, "dataset_id": d}, headers=a).json()
        for d in ids
    ]
    assert all(j["state"] == "queued" for j in jobs)
    done = [_wait(client, a, j["id"]) for j in jobs]
    assert [j["state"] for j in done] == ["succeeded", "succeeded"], done
    assert done[1]["progress"]["version"] == 2 and done[1]["progress"]["phase"] == 1
    versions = client.get(f"/lineages/{lid}/versions", headers=a).json()
    assert [v["number"] for v in versions] == [1, 2]
    m = client.get(f"/versions/{versions[1]['id']}/metrics", headers=a).json()
    R = m["accuracy_matrix"]
    assert R[0][1] is None and len(R) == 2 and all(x is not None for x in R[1])
    assert client.get(f"/lineages/{lid}", headers=a).json()["accuracy_matrix"] == R

    # Independent reference: train.run over both experiences at once, in one process.
    npz.write(tmp_path / "data", experiences)
    spec = lineage.validate_spec({**SPEC, "strategy": "ewc"})
    ref = train.run(lineage.train_config(spec, str(tmp_path / "data")), str(tmp_path / "ref"))
    np.testing.assert_allclose(np.array(R[1], float), ref["accuracy_matrix"][1], rtol=1e-6)
    np.testing.assert_allclose(R[0][0], ref["accuracy_matrix"][0][0], rtol=1e-6)
    assert m["forgetting"] == pytest.approx(ref["forgetting"], abs=1e-6)

    # Weights: an npz that models.weights.load accepts into a fresh model of the lineage.
    w = client.get(f"/versions/{versions[1]['id']}/weights", headers=a)
    assert w.status_code == 200
    (tmp_path / "w.npz").write_bytes(w.content)
    _, params, stats = models.init(
        lineage.train_config(spec, "").model, spec["num_classes"], seed=1
    )
    loaded, _ = weights_lib.load(str(tmp_path / "w.npz"), params, stats)
    assert any(
        not np.allclose(loaded[k]["kernel"], params[k]["kernel"])
        for k in params
        if isinstance(params[k], dict) and "kernel" in params[k]
    )

    # Predict: a mask PNG of the input's size, and the same mask as the model's own forward.
    image = experiences[0]["x_test"][0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    r = client.post(
        f"/versions/{versions[1]['id']}/predict",
        files={"image": ("x.png", buf.getvalue())},
        headers=a,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    mask = np.asarray(Image.open(io.BytesIO(r.content)))
    want = lineage.Predictor(spec, str(tmp_path / "w.npz"))
    assert mask.shape == (32, 32)
    np.testing.assert_array_equal(
        mask, np.asarray(Image.open(io.BytesIO(want(buf.getvalue(), 10**6))))
    )
    r = client.post(
        f"/versions/{versions[1]['id']}/predict",
        files={"image": ("x.png", b"not an image")},
        headers=a,
    )
    assert r.status_code == 400 and "cannot be decoded" in r.json()["detail"]


def test_a_failing_job_ends_failed_with_its_error(live, experiences):
    client, auth, home = live
    a = auth["alice"]
    lid = _lineage(client, a)
    arrays = {**experiences[0], "x_train": experiences[0]["x_train"][::-1].copy()}
    ds = _upload(client, a, arrays).json()
    # The store lost it: transient, so retried, then failed.
    os.remove(home / "objects" / "datasets" / f"{ds['sha256']}.npz")
    job = client.post("/jobs", json={"lineage_id": lid, "dataset_id": ds["id"]}, headers=a).json()
    job = _wait(client, a, job["id"])
    assert job["state"] == "failed" and job["attempts"] == 2
    assert job["error"].startswith("StoreError") and "\n" not in job["error"]
    assert client.get(f"/lineages/{lid}/versions", headers=a).json() == []


def test_cancelling_a_running_job_stops_it_without_a_version(live, experiences):
    client, auth, _ = live
    a = auth["alice"]
    lid = _lineage(client, a, epochs=50)
    ds = _upload(client, a, experiences[0]).json()["id"]
    job = client.post("/jobs", json={"lineage_id": lid, "dataset_id": ds}, headers=a).json()
    _wait_for_progress(client, a, job["id"])
    r = client.post(f"/jobs/{job['id']}/cancel", headers=a)
    assert r.status_code == 202 and r.json()["cancel_requested"]
    done = _wait(client, a, job["id"])
    assert done["state"] == "cancelled" and done["error"] == "cancelled by request"
    assert done["progress"]["step_in_phase"] < done["progress"]["steps_in_phase"]
    assert client.get(f"/lineages/{lid}/versions", headers=a).json() == []


def test_stopping_the_server_requeues_a_running_job_which_then_finishes(
    tmp_path_factory, experiences
):
    home = tmp_path_factory.mktemp("restart")
    app, auth = _client(home, True, lease_s=6)
    a = auth["alice"]
    with TestClient(app) as client:
        lid = _lineage(client, a, epochs=30)
        ds = _upload(client, a, experiences[0]).json()["id"]
        job = client.post("/jobs", json={"lineage_id": lid, "dataset_id": ds}, headers=a).json()
        _wait_for_progress(client, a, job["id"])
    # The server stopped mid-job: the job went back to the queue with its checkpoint.
    engine = db.make_engine(f"sqlite:///{home}/clseg.db")
    with orm.Session(engine) as s:
        row = s.get(Job, job["id"])
        assert row.state == "queued" and row.checkpoint is not None, (row.state, row.error)
        step = row.progress["step_in_phase"]
        assert 0 < step < row.progress["steps_in_phase"]
    app = api.create_app(_settings(home, lease_s=6))
    with TestClient(app) as client:
        done = _wait(client, a, job["id"])
    assert done["state"] == "succeeded" and done["attempts"] == 2


def test_a_job_over_its_time_limit_fails_and_says_so(tmp_path_factory, experiences):
    app, auth = _client(tmp_path_factory.mktemp("limit"), True, job_time_limit_s=4)
    a = auth["alice"]
    with TestClient(app) as client:
        lid = _lineage(client, a, epochs=200)
        ds = _upload(client, a, experiences[0]).json()["id"]
        job = client.post("/jobs", json={"lineage_id": lid, "dataset_id": ds}, headers=a).json()
        done = _wait(client, a, job["id"])
    assert done["state"] == "failed" and done["error"] == "time limit of 4 s reached"
