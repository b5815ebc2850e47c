"""Fuzzing the API from its own OpenAPI schema (schemathesis): whatever a client sends, the API
answers with a documented status code and a body that matches the schema, never a 500.

The app runs without a worker (nothing trains), with a token and a few real rows so that
generated ids sometimes hit something; bad tokens and missing headers are generated too.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from clseg_jax.serve import api, db, example
from clseg_jax.serve.settings import Settings


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from fastapi.testclient import TestClient

    home = tmp_path_factory.mktemp("fuzz")
    s = Settings(
        db_url=f"sqlite:///{home}/clseg.db",
        store_url=str(home / "objects"),
        queue="inprocess",
        scratch=str(home / "scratch"),
        max_upload_bytes=2**20,
    )
    app = api.create_app(s, start_worker=False)
    token = api.create_token(db.make_engine(s.db_url), "fuzzer")
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(app) as client:
        arrays = example.experiences(1, size=32, n_train=2, n_test=2)[0]
        client.post(
            "/datasets?num_classes=2",
            files={"file": ("a.zip", example.zip_bytes(arrays))},
            headers=auth,
        )
        client.post("/lineages", json={"name": "f", "image_size": [32, 32]}, headers=auth)
        yield app, auth


def test_api_conforms_to_its_schema(served):
    # Driven by hand rather than through schemathesis' pytest plugin, which does not load
    # under pytest 9 ("'Function' object has no attribute '_nodeid'").
    app, auth = served
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,  # the same cases every run: a failure reproduces
            database=None,
        )
        def fuzz(case):
            case.call_and_validate(
                headers=auth,
                checks=[
                    checks.not_a_server_error,
                    checks.status_code_conformance,
                    checks.content_type_conformance,
                    checks.response_schema_conformance,
                ],
            )

        fuzz()
