"""The service's database layer on SQLite and on a real PostgreSQL server: migrations agree with
the models, and the job bookkeeping keeps its promises (one claimant per job, leases, ordering per
lineage, no writes after a lost lease, reaping dead workers' jobs)."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import orm

from clseg_jax.serve import db, jobs
from clseg_jax.serve.db import Dataset, Job, Lineage, Version
from tests.serve_servers import postgres_url  # noqa: F401


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/t.db"
    else:
        base = request.getfixturevalue("postgres_url")
        name = f"t{tmp_path.name[-12:].lower().replace('-', '_')}"
        admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        url = base.rsplit("/", 1)[0] + f"/{name}"
    db.migrate(url)
    e = db.make_engine(url)
    yield e
    e.dispose()


def test_migrations_match_the_models(engine):
    with engine.connect() as c:
        assert compare_metadata(MigrationContext.configure(c), db.Base.metadata) == []
    db.migrate(str(engine.url.render_as_string(hide_password=False)))  # idempotent


def _setup(engine, n_jobs: int, lineages: int = 1) -> list[str]:
    with orm.Session(engine) as s, s.begin():
        ds = Dataset(
            owner="o", filename="f", key="k", sha256="0" * 64, size=1, num_classes=2, summary={}
        )
        s.add(ds)
        lins = [Lineage(owner="o", name=f"l{i}", spec={}) for i in range(lineages)]
        s.add_all(lins)
        s.flush()
        rows = [
            Job(
                owner="o",
                lineage_id=lins[i % lineages].id,
                dataset_id=ds.id,
                progress={},
                created_at=float(i),
            )
            for i in range(n_jobs)
        ]
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def test_each_job_has_one_claimant_under_contention(engine):
    ids = _setup(engine, 6, lineages=6)
    claimed, barrier = [], threading.Barrier(8)

    def worker(k):
        barrier.wait()
        while (job := jobs.claim(engine, f"w{k}", 30)) is not None:
            claimed.append(job)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)  # every job once, none twice


def test_a_lineage_runs_its_jobs_in_order(engine):
    first, second = _setup(engine, 2)
    assert jobs.claim(engine, "w", 30, job_id=second) is None  # behind the first
    assert jobs.claim(engine, "w", 30) == first
    assert jobs.claim(engine, "w2", 30) is None  # the first still runs
    assert jobs.end(engine, first, "w", "failed", "x")
    assert jobs.claim(engine, "w2", 30) == second


def test_a_lost_lease_blocks_every_write_and_is_reaped(engine):
    (job,) = _setup(engine, 1)
    assert jobs.claim(engine, "dead", -1) == job  # a lease that has already expired
    assert jobs.claim(engine, "alive", 30) == job  # reclaimed: attempts 2
    assert jobs.heartbeat(engine, job, "dead", 30) == (False, False)
    with pytest.raises(jobs.LeaseLost):
        jobs.set_progress(engine, job, "dead", {"step": 1})
    with orm.Session(engine) as s:
        lineage_id, dataset_id = s.get(Job, job).lineage_id, s.get(Job, job).dataset_id
    version = {
        "lineage_id": lineage_id,
        "number": 1,
        "dataset_id": dataset_id,
        "state": {},
        "weights": {},
        "metrics": {},
    }
    with pytest.raises(jobs.LeaseLost):
        jobs.finish(engine, job, "dead", version)
    with orm.Session(engine) as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Version)) == 0
    jobs.finish(engine, job, "alive", version)
    with orm.Session(engine) as s:
        row = s.get(Job, job)
        assert (row.state, row.attempts, row.lease_owner) == ("succeeded", 2, None)


def test_reaper_requeues_expired_leases_then_gives_up(engine):
    (job,) = _setup(engine, 1)
    for attempt in (1, 2):
        assert jobs.claim(engine, f"w{attempt}", -1) == job
        assert jobs.reap(engine, max_attempts=3) == [job]
        with orm.Session(engine) as s:
            assert s.get(Job, job).state == "queued"
    assert jobs.claim(engine, "w3", -1) == job
    assert jobs.reap(engine, max_attempts=3) == []
    with orm.Session(engine) as s:
        row = s.get(Job, job)
        assert row.state == "failed" and "lease expired" in row.error


def test_errors_are_one_line_without_credentials():
    err = RuntimeError("connect to postgresql://alice:s3cret@db:5432/x failed\nmore")
    msg = jobs.one_line_error(err)
    assert msg == "RuntimeError: connect to postgresql://alice:***@db:5432/x failed"


def test_only_jobs_a_worker_could_take_count_as_ready(engine):
    first, second = _setup(engine, 2)  # one lineage: the second waits for the first
    assert jobs.ready_queued(engine, older_than=db.now() + 1) == [first]
    assert jobs.ready_queued(engine, older_than=0.5) == [first]  # created at 0.0 and 1.0
    assert jobs.ready_queued(engine, older_than=-1) == []
    assert jobs.claim(engine, "w", 30) == first
    assert jobs.ready_queued(engine, older_than=db.now() + 1) == []  # second still waits
    assert jobs.end(engine, first, "w", "succeeded")
    assert jobs.ready_queued(engine, older_than=db.now() + 1) == [second]
