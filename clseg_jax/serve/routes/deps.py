"""What every router shares: the app's services, the request's database session, the token's
owner, ownership lookups, and the common pieces of request/response bodies.

``create_app`` puts one ``Services`` on ``app.state.services``; routes reach it (and what hangs
off it) through the FastAPI dependencies below.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, HTTPException, Request, UploadFile
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import orm

from clseg_jax.serve import db, lineage, store, uploads
from clseg_jax.serve.db import Lineage, Token, Version
from clseg_jax.serve.settings import Settings

Id = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or unknown token"},
    404: {"description": "no such object for this token"},
}


class Strict(BaseModel):
    """A request body: numbers must be JSON numbers, unknown fields are errors."""

    model_config = ConfigDict(strict=True, extra="forbid")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Predictors:
    """Compiled predictors of the most recently used versions (at most ``size``)."""

    def __init__(self, size: int = 8):
        self.size = size
        self._runs: dict[str, lineage.Predictor] = {}
        self._lock = threading.Lock()

    def get(self, version_id: str, make: Callable[[], lineage.Predictor]) -> lineage.Predictor:
        with self._lock:
            if version_id not in self._runs:
                if len(self._runs) >= self.size:
                    self._runs.pop(next(iter(self._runs)))
                self._runs[version_id] = make()
            return self._runs[version_id]


@dataclass
class Services:
    """One app's settings, database, object store, predictors and queue (set by its lifespan:
    an in-process ``worker``, or ``celery`` with its ``reaper``)."""

    settings: Settings
    engine: sa.Engine
    objects: store.ObjectStore
    predictors: Predictors = field(default_factory=Predictors)
    worker: Any = None
    celery: Any = None
    reaper: Any = None

    @property
    def limits(self) -> uploads.Limits:
        s = self.settings
        return uploads.Limits(max_bytes=s.max_upload_bytes, max_image_pixels=s.max_image_pixels)

    def cached(self, obj: store.StoredObject) -> str:
        """A stored ``.npz`` in this process's local cache (fetched and verified on first use;
        content-addressed by its SHA-256, so a cached copy never goes stale)."""
        path = os.path.join(self.settings.scratch, "cache", f"{obj.sha256}.npz")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.objects.get_file(obj.key, path, expect=obj)
        return path

    def store_unique(self, s: orm.Session, model, owner: str, prefix: str, blob: bytes, **fields):
        """``(row, created)``: ``owner``'s ``model`` row (a ``db.StoredUpload``) for these bytes,
        made if new: the object ``<prefix>/<sha256>.npz`` is written before the row (garbage.py),
        and checked again after the commit, since another owner's row of the same content may
        have been deleted, and the object with it, in between. A concurrent upload of the same
        bytes by the same owner yields its row."""
        sha = hashlib.sha256(blob).hexdigest()
        same = sa.select(model).where(model.owner == owner, model.sha256 == sha)
        existing = s.scalar(same)
        if existing is not None:
            return existing, False
        obj = self.objects.put_bytes(f"{prefix}/{sha}.npz", blob)
        row = model(owner=owner, key=obj.key, sha256=obj.sha256, size=obj.size, **fields)
        s.add(row)
        try:
            s.commit()
        except sa.exc.IntegrityError:
            s.rollback()
            return s.scalar(same), False
        if self.objects.stat(obj.key) is None:
            self.objects.put_bytes(obj.key, blob)
        return row, True

    def enqueue(self, job_id: str) -> None:
        """Tells the queue that ``job_id`` waits (best effort: the database is the truth)."""
        if self.worker is not None:
            self.worker.notify()
        elif self.celery is not None:
            # A lost message is not a lost job: the reaper republishes stale queued jobs.
            with contextlib.suppress(Exception):
                self.celery.send_task("clseg.run_job", args=[job_id])


def read_upload(file: UploadFile, svc: Services) -> bytes:
    """An uploaded file's bytes; 413 if it is over ``max_upload_bytes`` (exactly that many
    pass)."""
    limit = svc.settings.max_upload_bytes
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, svc.settings.upload_limit_message())
    return data


def services(request: Request) -> Services:
    return request.app.state.services


Svc = Annotated[Services, Depends(services)]


def session(svc: Svc) -> Iterator[orm.Session]:
    with orm.Session(svc.engine) as s:
        yield s


Session = Annotated[orm.Session, Depends(session)]
bearer = HTTPBearer(auto_error=False)


def token(
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)], s: Session
) -> Token:
    """The request's bearer token row; 401 without a known, unexpired one."""
    if creds is None or creds.scheme.lower() != "bearer":
        raise HTTPException(
            401,
            "missing token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    row = s.scalar(sa.select(Token).where(Token.token_hash == hash_token(creds.credentials)))
    if row is None:
        raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
    if row.expires_at is not None and row.expires_at <= db.now():
        raise HTTPException(401, "token expired", headers={"WWW-Authenticate": "Bearer"})
    return row


def owner(row: Annotated[Token, Depends(token)]) -> str:
    """The owner of the request's bearer token."""
    return row.owner


def admin(row: Annotated[Token, Depends(token)]) -> str:
    """The owner of an admin token; 403 for any other token."""
    if not row.admin:
        raise HTTPException(403, "this route needs an admin token (serve token --admin)")
    return row.owner


Owner = Annotated[str, Depends(owner)]
Admin = Annotated[str, Depends(admin)]


def get_owned(s: orm.Session, model, id_: str, who: str, what: str):
    """The ``model`` row ``id_`` if ``who`` owns it (a version: through its lineage); 404 if it
    is missing or another owner's, alike, so that existence does not leak."""
    row = s.get(model, id_)
    row_owner = row.owner if row is not None and hasattr(row, "owner") else None
    if row is not None and model is Version:
        row_owner = s.get(Lineage, row.lineage_id).owner
    if row is None or row_owner != who:
        raise HTTPException(404, f"no {what} {id_}")
    return row
