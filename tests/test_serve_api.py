"""The service's API in embedded mode (SQLite, local folder, in-process worker), in-process.

``idle``: an app without a worker, for what must hold before anything trains (auth, ownership,
validation, upload limits, idempotency, cancelling queued jobs). ``live``: an app whose worker
trains, for the whole session of the README: upload, lineage, two jobs, metrics, weights,
predict, and a failing job that ends ``failed``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import orm

from clseg_jax import models, train
from clseg_jax.data import npz
from clseg_jax.models import weights as weights_lib
from clseg_jax.serve import api, db, example, lineage, store
from clseg_jax.serve.db import Job
from clseg_jax.serve.settings import Settings

SPEC = {
    "image_size": [32, 32],
    "model_widths": [4, 8],
    "epochs": 1,
    "batch_size": 8,
    "checkpoint_every_steps": 1,
}


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


def test_trivial_score_is_the_majority_class_predicted_everywhere():
    """By hand: training masks hold 5 pixels of class 0 and 3 of class 1, so 0 is predicted
    everywhere; on a test mask with 2, 1 and 1 pixels of classes 0, 1, 2 (and one 255, left
    out), IoU is 2/4 for class 0 and 0 for 1 and 2: mIoU 1/6. Class 3 is absent: not counted."""
    y_train = np.array([[[0, 0], [1, 1]], [[0, 0], [0, 1]]], np.uint8)
    y_test = np.array([[[0, 0, 255], [1, 2, 255]]], np.uint8)
    got = lineage.trivial_score({"y_train": y_train, "y_test": y_test}, num_classes=4)
    assert got == pytest.approx(0.5 / 3)


def test_trivial_score_of_class_ids_is_the_majority_class_accuracy():
    """By hand: class 1 is the most frequent training label (255 left out), so every test image
    is called 1: right on 2 of the 4 labelled test images (the 255 one is not counted)."""
    arrays = {
        "y_train": np.array([0, 1, 1, 2, 255, 255, 255], np.uint8),
        "y_test": np.array([1, 0, 1, 2, 255], np.uint8),
    }
    assert lineage.trivial_score(arrays, num_classes=3) == pytest.approx(0.5)


def test_a_resnet_lineage_classifies():
    """A ResNet model makes a classification lineage: its widths are the 4 stages', any image
    size from 8 px takes it (the CIFAR stem under 64 px a side), class names have no
    background, and the strategies that segment are refused in one line."""
    spec = lineage.validate_spec({"model": "resnet18", "image_size": [28, 28], "num_classes": 3})
    assert lineage.task_of(spec) == "classification" and lineage.task_of({}) == "segmentation"
    model = lineage.train_config(spec, "").model
    assert model.name == "resnet18" and model.kwargs.small_input
    assert tuple(model.kwargs.widths) == tuple(lineage.SPEC_DEFAULTS["model_widths"])
    big = lineage.validate_spec({"model": "resnet34", "image_size": [64, 96]})
    assert not lineage.train_config(big, "").model.kwargs.small_input
    with pytest.raises(ValueError, match=r"its 4 stages' widths, got \[4, 8\]"):
        lineage.validate_spec({"model": "resnet18", "model_widths": [4, 8]})
    with pytest.raises(ValueError, match=r"must name all 3 classes or be empty"):
        lineage.validate_spec({"model": "resnet18", "num_classes": 3, "class_names": ["a"]})
    with pytest.raises(ValueError, match=r"8\.\.1024 a side"):
        lineage.validate_spec({"model": "resnet18", "image_size": [4, 32]})
    for name in ("mib", "plop"):
        with pytest.raises(ValueError, match=rf"'{name}' cannot train.*segmentation only"):
            lineage.validate_spec({"model": "resnet18", "strategy": name})
    lineage.validate_spec({"model": "resnet18", "strategy": "icarl"})  # it classifies
    # The page's model picker offers exactly the lineage's models, each under its task.
    page = (Path(api.__file__).parent / "web" / "index.html").read_text()
    for task, names in (
        ("segmentation", lineage.SEG_MODELS),
        ("classification", lineage.CLS_MODELS),
    ):
        group = re.search(rf'<optgroup label="{task}.*?</optgroup>', page, re.S).group(0)
        assert sorted(re.findall(r'<option value="(\w+)"', group)) == sorted(names), task
    with pytest.raises(ValueError, match=r"unknown model 'vgg'; valid: .*'resnet18'"):
        lineage.validate_spec({"model": "vgg"})
    with pytest.raises(ValueError, match=r"model 'deeplabv3_r101'.*'resnet18'.*\(classification\)"):
        lineage.validate_spec({"model": "deeplabv3_r101"})


def test_a_lineage_picks_its_precision():
    """``auto`` by default (bf16 convolutions on an accelerator worker, float32 on this CPU),
    any of the library's policies by hand, a one-line error otherwise."""
    spec = lineage.validate_spec({})
    assert spec["precision"] == "auto" and lineage.train_config(spec, "").precision == "auto"
    spec = lineage.validate_spec({"precision": "bfloat16"})
    assert lineage.train_config(spec, "").precision == "bfloat16"
    with pytest.raises(ValueError, match=r"unknown precision 'fp8'; valid: \['float32'"):
        lineage.validate_spec({"precision": "fp8"})
    old = {k: v for k, v in lineage.validate_spec({}).items() if k != "precision"}
    assert lineage.train_config(old, "").precision == "float32"  # a lineage from before


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
    assert r.status_code == 400 and "multiples of 8" in r.json()["detail"]
    # Values are checked by building the strategy, at creation rather than in the first job.
    body = {"name": "x", "strategy": "replay", "strategy_params": {"replay_policy": "bogus"}}
    r = client.post("/lineages", json=body, headers=auth["alice"])
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "unknown memory selection policy 'bogus'" in detail and "'reservoir'" in detail
    r = client.post("/lineages", json={"name": "x", "strategy": "icarl"}, headers=auth["alice"])
    assert r.status_code == 400 and "classification" in r.json()["detail"]
    assert client.get("/lineages", headers=auth["alice"]).json()[-1]["spec"]["strategy"] == "ewc"


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
    # Content addressing: the same arrays again are the same dataset; with another class count
    # they are a conflict, not the old row.
    a = _upload(client, auth["alice"], experiences[1]).json()
    b = _upload(client, auth["alice"], experiences[1], name="again.zip").json()
    assert a["id"] == b["id"] and a["sha256"] == b["sha256"]
    r = _upload(client, auth["alice"], experiences[1], num_classes=3)
    assert r.status_code == 409 and f"dataset {a['id']} with num_classes=2" in r.json()["detail"]


def _form(name: str, payload: bytes) -> tuple[bytes, str]:
    """A multipart body with one file field, and its content type."""
    boundary = "clsegboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return (
        head + payload + f"\r\n--{boundary}--\r\n".encode(),
        f"multipart/form-data; boundary={boundary}",
    )


def test_upload_limits_are_exact_and_413_chunked_or_not(idle):
    """The fixture's limit is 1 MiB: a file of exactly that passes the size check (and fails
    as data), one byte more is 413 naming the limit in MiB, as is a body over the limit sent
    with or without a length."""
    client, auth = idle
    limit = 2**20
    message = "upload over the limit of 1 MiB (CLSEG_MAX_UPLOAD_MB=1)"
    url = "/datasets?num_classes=2"
    r = client.post(url, files={"file": ("x.npz", b"\0" * limit)}, headers=auth["alice"])
    assert r.status_code == 400, r.text
    r = client.post(url, files={"file": ("x.npz", b"\0" * (limit + 1))}, headers=auth["alice"])
    assert r.status_code == 413 and r.json()["detail"] == message
    body, kind = _form("x.npz", b"\0" * (3 * limit))
    headers = {**auth["alice"], "Content-Type": kind}
    r = client.post(url, content=body, headers=headers)  # with Content-Length
    assert r.status_code == 413 and r.json()["detail"] == message

    def chunks():  # no length: Transfer-Encoding: chunked
        for i in range(0, len(body), 64 * 1024):
            yield body[i : i + 64 * 1024]

    r = client.post(url, content=chunks(), headers=headers)
    assert r.status_code == 413 and r.json()["detail"] == message
    small, _ = _form("x.npz", b"\0" * 100)
    r = client.post(url, content=iter([small]), headers=headers)  # chunked, under the limit
    assert r.status_code == 400, r.text


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
    # The key stays bound to its job whatever its end (docs/service.md): after the cancel the
    # same key and body return the cancelled job, and a new submission needs a new key.
    again = client.post("/jobs", json={"lineage_id": lid, "dataset_id": d0}, headers=headers)
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    assert again.json()["state"] == "cancelled"
    headers["Idempotency-Key"] = "upload-42-retry"
    retry = client.post("/jobs", json={"lineage_id": lid, "dataset_id": d0}, headers=headers)
    assert retry.status_code == 202 and retry.json()["state"] == "queued"
    assert retry.json()["id"] != first.json()["id"]


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
    # A class beyond the lineage's in the test split only is refused too.
    arrays = {k: v.copy() for k, v in experiences[0].items()}
    arrays["y_test"][0, 0, 0] = 2
    wide = _upload(client, auth["alice"], arrays, num_classes=3).json()["id"]
    lin2 = _lineage(client, auth["alice"])
    r = client.post("/jobs", json={"lineage_id": lin2, "dataset_id": wide}, headers=auth["alice"])
    assert r.status_code == 400 and "labels class 2" in r.json()["detail"], r.text
    # Class ids do not train a segmentation lineage, nor masks a classification one.
    seg = _lineage(client, auth["alice"])
    cls = _lineage(client, auth["alice"], model="resnet18", model_widths=[4, 4, 8, 8])
    one = example.class_experiences(1, n_train=4, n_test=2)[0]
    ids = _upload(client, auth["alice"], one, num_classes=4)
    assert ids.status_code == 201 and ids.json()["summary"]["labels"] == "classes"
    for lin, dataset, holds in (
        (seg, ids.json()["id"], "[N] class ids"),
        (cls, ds, "[N,H,W] masks"),
    ):
        r = client.post(
            "/jobs", json={"lineage_id": lin, "dataset_id": dataset}, headers=auth["alice"]
        )
        assert r.status_code == 400 and f"holds {holds}" in r.json()["detail"], r.text


def test_strategies_say_which_tasks_they_train(idle):
    client, auth = idle
    r = client.get("/strategies", headers=auth["alice"])
    by_name = {st["name"]: st["unavailable"] for st in r.json()}
    assert by_name["naive"] == {"segmentation": None, "classification": None}
    assert by_name["icarl"]["classification"] is None and by_name["icarl"]["segmentation"]
    for name in ("mib", "plop"):
        assert by_name[name]["segmentation"] is None
        assert "segmentation only" in by_name[name]["classification"]


# -- training ---------------------------------------------------------------------------------


def test_two_jobs_grow_a_lineage_as_one_run_would(live, experiences, tmp_path):
    client, auth, home = live
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
    # Their mid-job checkpoints (one per step here) are collected once each job has ended,
    # right after its state changes (serve/garbage.py).
    objects = store.LocalStore(home / "objects")
    deadline = time.monotonic() + 10
    while list(objects.list("jobs/")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(objects.list("jobs/")) == []

    # Independent reference: train.run over both experiences at once, in one process.
    npz.write(tmp_path / "data", experiences)
    spec = lineage.validate_spec({**SPEC, "strategy": "ewc"})
    ref = train.run(lineage.train_config(spec, str(tmp_path / "data")), str(tmp_path / "ref"))
    np.testing.assert_allclose(np.array(R[1], float), ref["accuracy_matrix"][1], rtol=1e-6)
    np.testing.assert_allclose(R[0][0], ref["accuracy_matrix"][0][0], rtol=1e-6)
    assert m["forgetting"] == pytest.approx(ref["forgetting"], abs=1e-6)

    # A fork of version 1 trained on the second dataset is the parent's version 2 again: the
    # same CL state, experiences and seed.
    r = client.post(f"/lineages/{lid}/fork", json={"name": "f", "version": 1}, headers=a)
    assert r.status_code == 201, r.text
    fork = r.json()
    assert fork["versions"] == 0 and fork["origin"]["number"] == 1
    assert fork["origin"]["dataset_ids"] == ids[:1] and fork["spec"]["strategy"] == "ewc"
    job = client.post("/jobs", json={"lineage_id": fork["id"], "dataset_id": ids[1]}, headers=a)
    assert _wait(client, a, job.json()["id"])["state"] == "succeeded"
    (fv,) = client.get(f"/lineages/{fork['id']}/versions", headers=a).json()
    assert fv["number"] == 2
    fm = client.get(f"/versions/{fv['id']}/metrics", headers=a).json()
    np.testing.assert_allclose(np.array(fm["accuracy_matrix"], float), np.array(R, float))
    r = client.post(f"/lineages/{lid}/fork", json={"name": "f", "version": 3}, headers=a)
    assert r.status_code == 404 and "has no version 3; it has [1, 2]" in r.json()["detail"]

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
        mask, np.asarray(Image.open(io.BytesIO(want.segment(buf.getvalue(), 10**6))))
    )
    r = client.post(
        f"/versions/{versions[1]['id']}/predict",
        files={"image": ("x.png", b"not an image")},
        headers=a,
    )
    assert r.status_code == 400 and "not a PNG or JPEG" in r.json()["detail"]
    assert "object at 0x" not in r.json()["detail"]

    # Each version says whether it learnt its experience, against the trivial predictor.
    for v, arrays in zip(versions, experiences, strict=True):
        assert isinstance(v["did_not_learn"], bool)
        assert v["trivial_score"] == pytest.approx(lineage.trivial_score(arrays, 2))
        k = v["number"] - 1
        got = client.get(f"/versions/{v['id']}/metrics", headers=a).json()["accuracy_matrix"]
        assert v["new_score"] == pytest.approx(got[k][k])
        assert v["did_not_learn"] == (v["new_score"] < v["trivial_score"] + lineage.LEARN_MARGIN)


def test_a_version_that_learnt_nothing_is_marked_and_its_job_succeeds(live, experiences, caplog):
    caplog.set_level(logging.INFO, logger="absl")
    client, auth, _ = live
    a = auth["alice"]
    lid = _lineage(client, a, lr=1e-9)  # a model that stays at its initialisation
    ds = _upload(client, a, experiences[0]).json()["id"]
    job = client.post("/jobs", json={"lineage_id": lid, "dataset_id": ds}, headers=a).json()
    assert _wait(client, a, job["id"])["state"] == "succeeded"
    (v,) = client.get(f"/lineages/{lid}/versions", headers=a).json()
    assert v["did_not_learn"] is True, v
    assert v["new_score"] < v["trivial_score"] + lineage.LEARN_MARGIN
    # The server log has one structured line per job event, with the ids and durations.
    events = [
        json.loads(r.getMessage().split(" ", 1)[1])
        for r in caplog.records
        if r.getMessage().startswith("job_event ")
    ]
    mine = [e for e in events if e["job_id"] == job["id"]]
    assert [e["event"] for e in mine][:2] == ["queued", "started"]
    assert [e["event"] for e in mine][-1] == "succeeded"
    done = mine[-1]
    assert done["lineage_id"] == lid and done["seconds"] > 0 and done["did_not_learn"] is True
    assert any(e["event"] == "checkpoint" for e in mine)


def test_a_deeplab_lineage_starts_from_uploaded_weights(live, experiences, tmp_path):
    """Converted weights uploaded once (``models.weights`` npz, here a DeepLab-v3 small with
    another class count) start a DeepLab lineage: every leaf but the head's is the file's
    (at lr 1e-9 training leaves them in place). Weights that do not fit the model, a file that
    is not a weights npz, and deleting weights a lineage uses are refused with one line."""
    client, auth, _ = live
    a = auth["alice"]
    base = {"model": "deeplabv3_small", "image_size": [32, 32], "num_classes": 3}
    model_cfg = lineage.train_config(lineage.validate_spec(base), "").model
    _, params, stats = models.init(model_cfg, 3, seed=5)
    path = tmp_path / "converted.npz"
    weights_lib.save(str(path), params, stats)

    def upload(name, data):
        return client.post("/weights", files={"file": (name, data)}, headers=a)

    r = upload("converted.npz", path.read_bytes())
    assert r.status_code == 201, r.text
    wid = r.json()["id"]
    assert r.json()["summary"]["parameters"] > 0
    r = upload("x.npz", b"not an npz")
    assert r.status_code == 400 and "must be a .npz" in r.json()["detail"]

    unet_path = tmp_path / "unet.npz"
    unet_cfg = lineage.train_config(lineage.validate_spec({"model_widths": [4, 8]}), "").model
    weights_lib.save(str(unet_path), *models.init(unet_cfg, 2, seed=0)[1:])
    unet_id = upload("unet.npz", unet_path.read_bytes()).json()["id"]
    body = {"name": "d", **SPEC, "model": "deeplabv3_small", "pretrained": unet_id, "lr": 1e-9}
    r = client.post("/lineages", json=body, headers=a)
    assert r.status_code == 400 and "do not fit model 'deeplabv3_small'" in r.json()["detail"]

    lid = _lineage(client, a, model="deeplabv3_small", pretrained=wid, lr=1e-9)
    r = client.delete(f"/weights/{wid}", headers=a)
    assert r.status_code == 409 and f"lineage {lid} starts from weights" in r.json()["detail"]
    ds = _upload(client, a, experiences[0]).json()["id"]
    job = client.post("/jobs", json={"lineage_id": lid, "dataset_id": ds}, headers=a).json()
    done = _wait(client, a, job["id"])
    assert done["state"] == "succeeded", done["error"]
    (v,) = client.get(f"/lineages/{lid}/versions", headers=a).json()
    (tmp_path / "v1.npz").write_bytes(client.get(f"/versions/{v['id']}/weights", headers=a).content)
    with np.load(path) as given, np.load(tmp_path / "v1.npz") as got:
        # Parameters (BatchNorm statistics move with training whatever the rate).
        backbone = [k for k in given.files if k.startswith("params/") and "/head/" not in k]
        assert len(backbone) > 10
        for k in backbone:
            np.testing.assert_allclose(got[k], given[k], atol=1e-5, err_msg=k)
        heads = [k for k in got.files if k.startswith("params/head/")]
        assert heads and all(got[k].shape != given[k].shape for k in heads if k.endswith("kernel"))


def test_a_classification_lineage_grows_an_accuracy_matrix_and_names_classes(live, tmp_path):
    """A ResNet lineage trained on two uploads of [N] class ids (a class-folder zip, an .npz):
    R holds accuracies, the verdict compares with the majority class's accuracy, and predict
    answers JSON naming the class, the same as the version's weights through ``Predictor``."""
    client, auth, _ = live
    a = auth["alice"]
    exps = example.class_experiences(2, size=32, n_train=16, n_test=8, seed=4)
    names = list(example.CLASS_NAMES)
    body = {**SPEC, "model": "resnet18", "model_widths": [4, 4, 8, 8], "num_classes": 4}
    lid = _lineage(client, a, class_names=names, **body)
    assert client.get(f"/lineages/{lid}", headers=a).json()["task"] == "classification"
    zipped = _upload(client, a, exps[0], num_classes=4)
    assert zipped.status_code == 201, zipped.text
    arrays = {k: v.astype(np.int64) if k[0] == "y" else v for k, v in exps[1].items()}
    r = client.post(
        "/datasets?num_classes=4",
        files={"file": ("day2.npz", io.BytesIO(_npz_bytes(arrays)))},
        headers=a,
    )
    assert r.status_code == 201, r.text
    for ds in (zipped.json()["id"], r.json()["id"]):
        job = client.post("/jobs", json={"lineage_id": lid, "dataset_id": ds}, headers=a).json()
        done = _wait(client, a, job["id"])
        assert done["state"] == "succeeded", done["error"]
    versions = client.get(f"/lineages/{lid}/versions", headers=a).json()
    assert [v["metric"] for v in versions] == ["accuracy", "accuracy"]
    metrics = client.get(f"/versions/{versions[1]['id']}/metrics", headers=a).json()
    R = metrics["accuracy_matrix"]
    assert metrics["metric"] == "accuracy" and metrics["class_names"] == names
    assert len(R) == 2 and len(R[1]) == 2 and all(0 <= x <= 1 for x in R[1])
    # An accuracy on 8 test images is a multiple of 1/8.
    assert all(abs(x * 8 - round(x * 8)) < 1e-6 for x in R[1])
    for v, arrays in zip(versions, exps, strict=True):
        assert v["trivial_score"] == pytest.approx(lineage.trivial_score(arrays, 4))

    buf = io.BytesIO()
    Image.fromarray(exps[1]["x_test"][0]).save(buf, "PNG")
    r = client.post(
        f"/versions/{versions[1]['id']}/predict",
        files={"image": ("x.png", buf.getvalue())},
        headers=a,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    out = r.json()
    assert out["class_names"] == names and out["name"] == names[out["class"]]
    assert sum(out["probabilities"]) == pytest.approx(1, abs=1e-4)
    assert out["class"] == int(np.argmax(out["probabilities"]))
    weights = tmp_path / "w.npz"
    weights.write_bytes(client.get(f"/versions/{versions[1]['id']}/weights", headers=a).content)
    spec = client.get(f"/lineages/{lid}", headers=a).json()["spec"]
    want = lineage.Predictor(spec, str(weights)).classify(buf.getvalue(), 10**6)
    assert want["class"] == out["class"]
    np.testing.assert_allclose(out["probabilities"], want["probabilities"], atol=1e-5)


def _npz_bytes(arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


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


def test_cancelling_a_running_job_stops_it_without_a_version(tmp_path_factory, experiences):
    # A lease of 60 s renews every 20 s: a cancel seen only at a renewal (the old path) would
    # take seconds to tens of seconds, the 0.2 s poll well under one. No periodic checkpoints:
    # a stop waits for a save in flight (5 s here under load, with one every step).
    app, auth = _client(tmp_path_factory.mktemp("cancel"), True, lease_s=60)
    a = auth["alice"]
    with TestClient(app) as client:
        lid = _lineage(client, a, epochs=200, checkpoint_every_steps=0)
        ds = _upload(client, a, experiences[0]).json()["id"]
        job = client.post("/jobs", json={"lineage_id": lid, "dataset_id": ds}, headers=a).json()
        _wait_for_progress(client, a, job["id"])
        asked = time.time()
        r = client.post(f"/jobs/{job['id']}/cancel", headers=a)
        assert r.status_code == 202 and r.json()["cancel_requested"]
        done = _wait(client, a, job["id"])
        versions = client.get(f"/lineages/{lid}/versions", headers=a).json()
    # Measured on the server's clock (finished_at), so the test's own polling is not counted; the
    # bound leaves room for a loaded 2-core machine and is far below the renewal interval.
    assert done["finished_at"] - asked < 4.0, done["finished_at"] - asked
    assert done["state"] == "cancelled" and done["error"] == "cancelled by request"
    assert done["progress"]["step_in_phase"] < done["progress"]["steps_in_phase"]
    assert versions == []


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
