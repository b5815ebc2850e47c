"""Metadata: SQLAlchemy 2 tables for tokens, datasets, lineages, jobs and versions.

The database is the source of truth for the service (queue messages carry only a job id). Times
are UNIX seconds as floats, so that SQLite and PostgreSQL compare them alike. The schema is
created by Alembic (``migrations/``); ``tests/test_serve_db.py`` checks that the migrations and
these models agree.

Job states: ``queued`` -> ``running`` (a worker holds its lease) -> ``succeeded`` | ``failed`` |
``cancelled``; a lease that expires puts a running job back within reach of ``claim``.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy import orm

TERMINAL = ("succeeded", "failed", "cancelled")
STATES = ("queued", "running", *TERMINAL)


def new_id() -> str:
    return uuid.uuid4().hex


def now() -> float:
    return time.time()


class Base(orm.DeclarativeBase):
    type_annotation_map: ClassVar = {dict[str, Any]: sa.JSON, list[Any]: sa.JSON}


class Token(Base):
    """An API token, stored as the SHA-256 of its text (tokens are 256 random bits, so a fast
    hash is enough: there is nothing to brute-force)."""

    __tablename__ = "tokens"
    id: orm.Mapped[str] = orm.mapped_column(sa.String(32), primary_key=True, default=new_id)
    owner: orm.Mapped[str] = orm.mapped_column(sa.String(64), index=True)
    token_hash: orm.Mapped[str] = orm.mapped_column(sa.String(64), unique=True)
    created_at: orm.Mapped[float] = orm.mapped_column(sa.Float, default=now)
    # Admin tokens may list and revoke every token (``/admin/tokens``).
    admin: orm.Mapped[bool] = orm.mapped_column(
        sa.Boolean, default=False, server_default=sa.false()
    )
    expires_at: orm.Mapped[float | None] = orm.mapped_column(sa.Float)  # None: never


class StoredUpload:
    """The columns of an upload stored content-addressed (``<prefix>/<sha256>.npz``): one row per
    owner and content (``routes/deps.Services.store_unique``), one object per content."""

    id: orm.Mapped[str] = orm.mapped_column(sa.String(32), primary_key=True, default=new_id)
    owner: orm.Mapped[str] = orm.mapped_column(sa.String(64), index=True)
    filename: orm.Mapped[str] = orm.mapped_column(sa.String(255))
    key: orm.Mapped[str] = orm.mapped_column(sa.String(512))
    sha256: orm.Mapped[str] = orm.mapped_column(sa.String(64))
    size: orm.Mapped[int] = orm.mapped_column(sa.BigInteger)
    summary: orm.Mapped[dict[str, Any]] = orm.mapped_column(sa.JSON)
    created_at: orm.Mapped[float] = orm.mapped_column(sa.Float, default=now)


class Dataset(StoredUpload, Base):
    """One uploaded experience, normalised to ``.npz`` and stored under ``datasets/<sha256>.npz``
    (content-addressed: the same arrays uploaded twice are one object)."""

    __tablename__ = "datasets"
    __table_args__ = (sa.UniqueConstraint("owner", "sha256", name="uq_datasets_owner_sha"),)
    num_classes: orm.Mapped[int] = orm.mapped_column(sa.Integer)


class Weights(StoredUpload, Base):
    """Pretrained weights uploaded once (a ``models.weights`` ``.npz``, e.g. converted from
    torchvision), stored under ``weights/<sha256>.npz``; lineages start from them. ``summary``:
    their array and parameter counts."""

    __tablename__ = "weights"
    __table_args__ = (sa.UniqueConstraint("owner", "sha256", name="uq_weights_owner_sha"),)


class Lineage(Base):
    """One model learning a stream over time: its spec (model, strategy, hyperparameters)."""

    __tablename__ = "lineages"
    id: orm.Mapped[str] = orm.mapped_column(sa.String(32), primary_key=True, default=new_id)
    owner: orm.Mapped[str] = orm.mapped_column(sa.String(64), index=True)
    name: orm.Mapped[str] = orm.mapped_column(sa.String(128))
    spec: orm.Mapped[dict[str, Any]] = orm.mapped_column(sa.JSON)
    created_at: orm.Mapped[float] = orm.mapped_column(sa.Float, default=now)
    # A fork's starting point: ``{"lineage_id", "version_id", "number", "state": {key, size,
    # sha256}, "dataset_ids": [...]}``, the version it continues from (its full CL state) and
    # the datasets of that version's experiences; None for a lineage started from scratch.
    origin: orm.Mapped[dict[str, Any] | None] = orm.mapped_column(sa.JSON)


class Job(Base):
    """Training one experience into a lineage; see the module docstring for its states."""

    __tablename__ = "jobs"
    __table_args__ = (
        sa.UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency"),
        sa.Index("ix_jobs_state_created", "state", "created_at"),
    )
    id: orm.Mapped[str] = orm.mapped_column(sa.String(32), primary_key=True, default=new_id)
    owner: orm.Mapped[str] = orm.mapped_column(sa.String(64), index=True)
    lineage_id: orm.Mapped[str] = orm.mapped_column(sa.ForeignKey("lineages.id"), index=True)
    dataset_id: orm.Mapped[str] = orm.mapped_column(sa.ForeignKey("datasets.id"))
    idempotency_key: orm.Mapped[str | None] = orm.mapped_column(sa.String(128))
    state: orm.Mapped[str] = orm.mapped_column(sa.String(16), default="queued")
    cancel_requested: orm.Mapped[bool] = orm.mapped_column(sa.Boolean, default=False)
    attempts: orm.Mapped[int] = orm.mapped_column(sa.Integer, default=0)
    lease_owner: orm.Mapped[str | None] = orm.mapped_column(sa.String(64))
    lease_expires_at: orm.Mapped[float | None] = orm.mapped_column(sa.Float)
    progress: orm.Mapped[dict[str, Any]] = orm.mapped_column(sa.JSON, default=dict)
    error: orm.Mapped[str | None] = orm.mapped_column(sa.Text)
    checkpoint: orm.Mapped[dict[str, Any] | None] = orm.mapped_column(sa.JSON)
    version_id: orm.Mapped[str | None] = orm.mapped_column(sa.String(32))
    created_at: orm.Mapped[float] = orm.mapped_column(sa.Float, default=now)
    started_at: orm.Mapped[float | None] = orm.mapped_column(sa.Float)
    finished_at: orm.Mapped[float | None] = orm.mapped_column(sa.Float)


class Version(Base):
    """An immutable result of a job: the lineage's full CL state after ``number`` experiences
    (``state``: a tar of the orbax checkpoint), its weights (``.npz``) and its evaluation."""

    __tablename__ = "versions"
    __table_args__ = (sa.UniqueConstraint("lineage_id", "number", name="uq_versions_number"),)
    id: orm.Mapped[str] = orm.mapped_column(sa.String(32), primary_key=True, default=new_id)
    lineage_id: orm.Mapped[str] = orm.mapped_column(sa.ForeignKey("lineages.id"), index=True)
    number: orm.Mapped[int] = orm.mapped_column(sa.Integer)
    job_id: orm.Mapped[str] = orm.mapped_column(sa.ForeignKey("jobs.id"), unique=True)
    dataset_id: orm.Mapped[str] = orm.mapped_column(sa.ForeignKey("datasets.id"))
    state: orm.Mapped[dict[str, Any]] = orm.mapped_column(sa.JSON)  # {key, size, sha256}
    weights: orm.Mapped[dict[str, Any]] = orm.mapped_column(sa.JSON)  # {key, size, sha256}
    metrics: orm.Mapped[dict[str, Any]] = orm.mapped_column(sa.JSON)
    created_at: orm.Mapped[float] = orm.mapped_column(sa.Float, default=now)


def make_engine(url: str) -> sa.Engine:
    """An engine for ``url``; SQLite gets a busy timeout and WAL so that the API and workers
    (threads or processes) can write concurrently."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def migrate(url: str) -> None:
    """Brings the database at ``url`` to the latest schema (Alembic ``upgrade head``)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", os.path.join(os.path.dirname(__file__), "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, "head")
