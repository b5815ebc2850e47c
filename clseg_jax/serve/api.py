"""The REST API (FastAPI): datasets, lineages, jobs, versions, metrics, weights and predict.

Every route but ``/health`` and the web page needs ``Authorization: Bearer <token>``; a token sees
only its owner's rows (another owner's id answers 404, as a missing one: existence does not leak).
Routes that parse data, read objects or run the model are plain ``def``: FastAPI runs them in its
thread pool, so the event loop keeps answering status requests while they work. Request bodies
are strict pydantic models: numbers must be JSON numbers, unknown fields are errors.

The routes live in ``routes/``, one router per resource, sharing ``routes/deps.py``; every change
of a job's state is a function of ``jobs.py``. ``create_app`` assembles them.
"""

import contextlib
import secrets

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import orm

from clseg_jax.serve import db, store
from clseg_jax.serve.db import Token
from clseg_jax.serve.routes import (
    admin,
    datasets,
    deps,
    jobs,
    lineages,
    metrics,
    strategies,
    versions,
    web,
    weights,
)
from clseg_jax.serve.routes.deps import hash_token
from clseg_jax.serve.settings import Settings

__all__ = ["create_app", "create_token", "hash_token"]
ROUTERS = (
    web.router,
    datasets.router,
    lineages.router,
    jobs.router,
    versions.router,
    admin.router,
    metrics.router,
    strategies.router,
    weights.router,
)


def create_token(
    engine: sa.Engine, owner: str, admin: bool = False, expires_in_s: float | None = None
) -> str:
    """A new random token for ``owner``; only its hash is stored, so print it once. ``admin``:
    it may list and revoke every token; ``expires_in_s``: it stops working after that long."""
    token = secrets.token_urlsafe(32)
    expires = None if expires_in_s is None else db.now() + expires_in_s
    with orm.Session(engine) as s, s.begin():
        s.add(Token(owner=owner, token_hash=hash_token(token), admin=admin, expires_at=expires))
    return token


class _BodyLimit:
    """ASGI middleware: 413 once a request body passes ``limit`` bytes, before it is buffered
    (a declared Content-Length over the limit is refused without reading).

    A chunked body has no length: it is counted as it arrives, and the handler reading it (the
    form parser, which turns any error of the stream into its own 400) is cut short; its
    response is dropped and the 413 sent instead.
    """

    def __init__(self, app, limit: int, message: str):
        self.app, self.limit, self.message = app, limit, message

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_large(self.message)(scope, receive, send)
        seen, over = 0, False

        async def limited():
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise _TooLarge
            return message

        async def sending(message):
            if not over:  # the handler's reply to a stream cut short is not the client's
                await send(message)

        try:
            await self.app(scope, limited, sending)
        except Exception:
            if not over:
                raise
        if over:
            await too_large(self.message)(scope, receive, send)


class _TooLarge(Exception):
    pass


def too_large(message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, 413)


def _store_error(request: Request, err: store.StoreError) -> JSONResponse:
    del request
    return JSONResponse({"detail": f"object store unavailable: {err}"}, 503)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI, start_worker: bool):
    """Starts the queue's side of this process (an in-process worker, or the Celery reaper) and
    stops it, and the database's connections, on the way out."""
    svc: deps.Services = app.state.services
    if svc.settings.queue == "inprocess":
        if start_worker:
            from clseg_jax.serve.worker import InProcessWorker

            svc.worker = InProcessWorker(svc.settings, svc.engine, svc.objects)
            svc.worker.start()
    else:
        from clseg_jax.serve import tasks

        svc.celery = tasks.make_celery(svc.settings.queue)
        svc.reaper = tasks.Reaper(svc.settings, svc.engine, svc.celery)
        svc.reaper.start()
    yield
    for part in (svc.worker, svc.reaper):
        if part is not None:
            part.stop()
    svc.engine.dispose()


# -- the application -------------------------------------------------------------------------


def create_app(settings: Settings | None = None, start_worker: bool = True) -> FastAPI:
    """The API over ``settings`` (default: from the environment). With ``queue="inprocess"`` and
    ``start_worker`` a worker thread trains jobs inside this process (the embedded mode)."""
    settings = settings or Settings.from_env()
    settings.prepare()
    db.migrate(settings.db_url)
    svc = deps.Services(
        settings, db.make_engine(settings.db_url), store.make_store(settings.store_url)
    )
    app = FastAPI(
        title="clseg_jax service",
        version="1",
        description="Continual learning as a service: lineages learn uploaded experiences.",
        lifespan=lambda app: _lifespan(app, start_worker),
    )
    app.state.services = svc
    app.state.settings, app.state.engine, app.state.objects = settings, svc.engine, svc.objects
    for router in ROUTERS:
        app.include_router(router)
    app.add_exception_handler(store.StoreError, _store_error)
    # The body is the upload plus its form's boundaries and headers: 1 MiB of slack here, the
    # upload's own size checked exactly where it is read (deps.read_upload).
    app.add_middleware(
        _BodyLimit, limit=settings.max_upload_bytes + 2**20, message=settings.upload_limit_message()
    )
    # Outermost, so that requests the body limit refuses are counted too.
    app.state.requests = metrics.Requests()
    app.add_middleware(metrics.CountRequests, counter=app.state.requests)
    return app
