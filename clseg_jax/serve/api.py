"""The REST API (FastAPI): datasets, lineages, jobs, versions, metrics, weights and predict.

Every route but ``/health`` and the web page needs ``Authorization: Bearer <token>``; a token sees
only its owner's rows (another owner's id answers 404, as a missing one: existence does not leak).
Routes that parse data, read objects or run the model are plain ``def``: FastAPI runs them in its
thread pool, so the event loop keeps answering status requests while they work. Request bodies
are strict pydantic models: numbers must be JSON numbers, unknown fields are errors.
"""

import contextlib
import hashlib
import os
import secrets
import threading
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import Depends, FastAPI, File, Header, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import orm

from clseg_jax.serve import db, lineage, store, uploads
from clseg_jax.serve.db import Dataset, Job, Lineage, Token, Version
from clseg_jax.serve.settings import Settings

Id = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or unknown token"},
    404: {"description": "no such object for this token"},
}


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(engine: sa.Engine, owner: str) -> str:
    """A new random token for ``owner``; only its hash is stored, so print it once."""
    token = secrets.token_urlsafe(32)
    with orm.Session(engine) as s, s.begin():
        s.add(Token(owner=owner, token_hash=hash_token(token)))
    return token


# -- request and response bodies -----------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class LineageIn(_Strict):
    name: str = Field(min_length=1, max_length=128)
    num_classes: int = Field(2, ge=2, le=255)
    image_size: list[Annotated[int, Field(ge=1, le=1024)]] = Field(
        [64, 64], min_length=2, max_length=2
    )
    kind: Literal["domain", "class"] = "domain"
    strategy: str = Field("naive", min_length=1, max_length=128)
    strategy_params: dict[str, float | int | bool | str] = Field({}, max_length=64)
    model_widths: list[Annotated[int, Field(ge=1, le=512)]] = Field(
        [8, 16, 32], min_length=2, max_length=5
    )
    max_experiences: int = Field(16, ge=1, le=256)
    epochs: int = Field(2, ge=1, le=1000)
    batch_size: int = Field(8, ge=1, le=1024)
    lr: float = Field(0.01, gt=0, le=10)
    checkpoint_every_steps: int = Field(20, ge=0, le=10**6)
    seed: int = Field(0, ge=0, le=2**31 - 1)


class LineageOut(BaseModel):
    id: str
    name: str
    spec: dict[str, Any]
    created_at: float
    versions: int
    latest_version: str | None
    accuracy_matrix: list[list[float | None]]


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # built from the ORM row

    id: str
    filename: str
    sha256: str
    size: int
    num_classes: int
    summary: dict[str, Any]
    created_at: float


class JobIn(_Strict):
    lineage_id: Id
    dataset_id: Id


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    lineage_id: str
    dataset_id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    cancel_requested: bool
    attempts: int
    progress: dict[str, Any]
    error: str | None
    version_id: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None


class VersionOut(BaseModel):
    id: str
    lineage_id: str
    number: int
    job_id: str
    dataset_id: str
    created_at: float
    avg_miou: float | None
    forgetting: float | None
    bwt: float | None


def _job_out(j: Job) -> JobOut:
    return JobOut.model_validate(j)


def _version_out(v: Version) -> VersionOut:
    m = v.metrics
    return VersionOut(
        id=v.id,
        lineage_id=v.lineage_id,
        number=v.number,
        job_id=v.job_id,
        dataset_id=v.dataset_id,
        created_at=v.created_at,
        avg_miou=m.get("avg_miou"),
        forgetting=m.get("forgetting"),
        bwt=m.get("bwt"),
    )


def _dataset_out(d: Dataset) -> DatasetOut:
    return DatasetOut.model_validate(d)


class _BodyLimit:
    """ASGI middleware: 413 once a request body passes ``limit`` bytes, before it is buffered
    (a declared Content-Length over the limit is refused without reading)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _too_large(self.limit)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            return await self.app(scope, limited, send)
        except _TooLarge:
            return await _too_large(self.limit)(scope, receive, send)


class _TooLarge(Exception):
    pass


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse(
        {"detail": f"request body over the limit of {limit} bytes (CLSEG_MAX_UPLOAD_MB)"}, 413
    )


# -- the application -------------------------------------------------------------------------


def create_app(settings: Settings | None = None, start_worker: bool = True) -> FastAPI:
    """The API over ``settings`` (default: from the environment). With ``queue="inprocess"`` and
    ``start_worker`` a worker thread trains jobs inside this process (the embedded mode)."""
    settings = settings or Settings.from_env()
    settings.prepare()
    db.migrate(settings.db_url)
    engine = db.make_engine(settings.db_url)
    objects = store.make_store(settings.store_url)
    limits = uploads.Limits(
        max_bytes=settings.max_upload_bytes, max_image_pixels=settings.max_image_pixels
    )
    queue: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.queue == "inprocess":
            if start_worker:
                from clseg_jax.serve.worker import InProcessWorker

                queue["worker"] = InProcessWorker(settings, engine, objects)
                queue["worker"].start()
        else:
            from clseg_jax.serve import tasks

            queue["celery"] = tasks.make_celery(settings.queue)
            queue["reaper"] = tasks.Reaper(settings, engine, queue["celery"])
            queue["reaper"].start()
        yield
        for part in ("worker", "reaper"):
            if part in queue:
                queue[part].stop()
        engine.dispose()

    app = FastAPI(
        title="clseg_jax service",
        version="1",
        description="Continual learning as a service: lineages learn uploaded experiences.",
        lifespan=lifespan,
    )
    app.state.settings, app.state.engine, app.state.objects = settings, engine, objects
    predictors: dict[str, lineage.Predictor] = {}
    predictor_lock = threading.Lock()

    def session():
        with orm.Session(engine) as s:
            yield s

    bearer = HTTPBearer(auto_error=False)

    def owner(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        s: Annotated[orm.Session, Depends(session)],
    ) -> str:
        if creds is None or creds.scheme.lower() != "bearer":
            raise HTTPException(
                401,
                "missing token: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        row = s.scalar(sa.select(Token).where(Token.token_hash == hash_token(creds.credentials)))
        if row is None:
            raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
        return row.owner

    Owner = Annotated[str, Depends(owner)]
    Session = Annotated[orm.Session, Depends(session)]

    def get_owned(s: orm.Session, model, id_: str, who: str, what: str):
        row = s.get(model, id_)
        row_owner = row.owner if row is not None and hasattr(row, "owner") else None
        if row is not None and model is Version:
            row_owner = s.get(Lineage, row.lineage_id).owner
        if row is None or row_owner != who:
            raise HTTPException(404, f"no {what} {id_}")
        return row

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(os.path.join(os.path.dirname(__file__), "web", "index.html"))

    # -- datasets --

    @app.post("/datasets", status_code=201, responses={**_ERRORS, 413: {}, 400: {}})
    def upload_dataset(
        who: Owner,
        s: Session,
        file: Annotated[UploadFile, File(description="a .zip (docs/service.md layout) or .npz")],
        num_classes: Annotated[int, Query(ge=2, le=255)],
    ) -> DatasetOut:
        """Uploads one experience's data; masks are checked against ``num_classes`` classes.

        Stored content-addressed (normalised ``.npz``): re-uploading the same arrays returns
        the existing dataset."""
        data = file.file.read(settings.max_upload_bytes + 1)
        try:
            arrays = uploads.parse_upload(data, file.filename or "", num_classes, limits)
        except uploads.UploadError as err:
            raise HTTPException(400, str(err)) from None
        blob = uploads.to_npz_bytes(arrays)
        sha = hashlib.sha256(blob).hexdigest()
        existing = s.scalar(sa.select(Dataset).where(Dataset.owner == who, Dataset.sha256 == sha))
        if existing is not None:
            return _dataset_out(existing)
        obj = objects.put_bytes(f"datasets/{sha}.npz", blob)  # verified before the row exists
        row = Dataset(
            owner=who,
            filename=(file.filename or "")[:255],
            key=obj.key,
            sha256=obj.sha256,
            size=obj.size,
            num_classes=num_classes,
            summary=uploads.summary(arrays),
        )
        s.add(row)
        try:
            s.commit()
        except sa.exc.IntegrityError:  # the same content uploaded concurrently
            s.rollback()
            row = s.scalar(sa.select(Dataset).where(Dataset.owner == who, Dataset.sha256 == sha))
        return _dataset_out(row)

    @app.get("/datasets", responses=_ERRORS)
    def list_datasets(who: Owner, s: Session) -> list[DatasetOut]:
        rows = s.scalars(
            sa.select(Dataset).where(Dataset.owner == who).order_by(Dataset.created_at)
        )
        return [_dataset_out(d) for d in rows]

    @app.get("/datasets/{dataset_id}", responses=_ERRORS)
    def get_dataset(who: Owner, s: Session, dataset_id: Id) -> DatasetOut:
        return _dataset_out(get_owned(s, Dataset, dataset_id, who, "dataset"))

    # -- lineages --

    def lineage_out(s: orm.Session, lin: Lineage) -> LineageOut:
        versions = s.scalars(
            sa.select(Version).where(Version.lineage_id == lin.id).order_by(Version.number)
        ).all()
        latest = versions[-1] if versions else None
        return LineageOut(
            id=lin.id,
            name=lin.name,
            spec=lin.spec,
            created_at=lin.created_at,
            versions=len(versions),
            latest_version=latest.id if latest else None,
            accuracy_matrix=latest.metrics["accuracy_matrix"] if latest else [],
        )

    @app.post("/lineages", status_code=201, responses={**_ERRORS, 400: {}})
    def create_lineage(who: Owner, s: Session, body: LineageIn) -> LineageOut:
        spec = body.model_dump()
        name = spec.pop("name")
        try:
            spec = lineage.validate_spec(spec)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        row = Lineage(owner=who, name=name, spec=spec)
        s.add(row)
        s.commit()
        return lineage_out(s, row)

    @app.get("/lineages", responses=_ERRORS)
    def list_lineages(who: Owner, s: Session) -> list[LineageOut]:
        rows = s.scalars(
            sa.select(Lineage).where(Lineage.owner == who).order_by(Lineage.created_at)
        ).all()
        return [lineage_out(s, r) for r in rows]

    @app.get("/lineages/{lineage_id}", responses=_ERRORS)
    def get_lineage(who: Owner, s: Session, lineage_id: Id) -> LineageOut:
        return lineage_out(s, get_owned(s, Lineage, lineage_id, who, "lineage"))

    @app.get("/lineages/{lineage_id}/versions", responses=_ERRORS)
    def list_versions(who: Owner, s: Session, lineage_id: Id) -> list[VersionOut]:
        get_owned(s, Lineage, lineage_id, who, "lineage")
        rows = s.scalars(
            sa.select(Version).where(Version.lineage_id == lineage_id).order_by(Version.number)
        )
        return [_version_out(v) for v in rows]

    # -- jobs --

    @app.post("/jobs", status_code=202, responses={**_ERRORS, 400: {}, 409: {}})
    def submit_job(
        who: Owner,
        s: Session,
        body: JobIn,
        idempotency_key: Annotated[
            str | None, Header(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")
        ] = None,
    ) -> JobOut:
        """Queues training ``dataset_id`` as the lineage's next experience (202 + the job).

        With an ``Idempotency-Key`` header, a resubmission returns the first job."""
        if idempotency_key is not None:
            prior = s.scalar(
                sa.select(Job).where(Job.owner == who, Job.idempotency_key == idempotency_key)
            )
            if prior is not None:
                return same_job(prior, body)
        lin = get_owned(s, Lineage, body.lineage_id, who, "lineage")
        ds = get_owned(s, Dataset, body.dataset_id, who, "dataset")
        spec, summ = lin.spec, ds.summary
        if [summ["height"], summ["width"]] != list(spec["image_size"]):
            raise HTTPException(
                400,
                f"dataset images are {summ['height']}x{summ['width']} but lineage "
                f"{lin.id} takes {spec['image_size'][0]}x{spec['image_size'][1]}",
            )
        if summ["classes"] and max(summ["classes"]) >= spec["num_classes"]:
            raise HTTPException(
                400,
                f"dataset labels class {max(summ['classes'])} but lineage {lin.id} has "
                f"{spec['num_classes']} classes (0..{spec['num_classes'] - 1})",
            )
        used = s.scalar(
            sa.select(sa.func.count())
            .select_from(Job)
            .where(Job.lineage_id == lin.id, Job.state.in_(("queued", "running", "succeeded")))
        )
        if used >= spec["max_experiences"]:
            raise HTTPException(
                409, f"lineage {lin.id} is full: max_experiences={spec['max_experiences']}"
            )
        job = Job(
            owner=who,
            lineage_id=lin.id,
            dataset_id=ds.id,
            idempotency_key=idempotency_key,
            progress={},
        )
        s.add(job)
        try:
            s.commit()
        except sa.exc.IntegrityError:  # a concurrent submission with the same key won
            s.rollback()
            prior = s.scalar(
                sa.select(Job).where(Job.owner == who, Job.idempotency_key == idempotency_key)
            )
            if prior is None:
                raise
            return same_job(prior, body)
        enqueue(job.id)
        return _job_out(job)

    def same_job(prior: Job, body: JobIn) -> JobOut:
        if (prior.lineage_id, prior.dataset_id) != (body.lineage_id, body.dataset_id):
            raise HTTPException(409, "Idempotency-Key already used for a different job")
        return _job_out(prior)

    def enqueue(job_id: str) -> None:
        if "worker" in queue:
            queue["worker"].notify()
        elif "celery" in queue:
            # A lost message is not a lost job: the reaper republishes stale queued jobs.
            with contextlib.suppress(Exception):
                queue["celery"].send_task("clseg.run_job", args=[job_id])

    @app.get("/jobs", responses=_ERRORS)
    def list_jobs(
        who: Owner, s: Session, lineage_id: Annotated[Id | None, Query()] = None
    ) -> list[JobOut]:
        q = sa.select(Job).where(Job.owner == who)
        if lineage_id is not None:
            q = q.where(Job.lineage_id == lineage_id)
        return [_job_out(j) for j in s.scalars(q.order_by(Job.created_at))]

    @app.get("/jobs/{job_id}", responses=_ERRORS)
    def get_job(who: Owner, s: Session, job_id: Id) -> JobOut:
        return _job_out(get_owned(s, Job, job_id, who, "job"))

    @app.post("/jobs/{job_id}/cancel", status_code=202, responses={**_ERRORS, 409: {}})
    def cancel_job(who: Owner, s: Session, job_id: Id) -> JobOut:
        """Cancels a queued job at once; a running one stops at its next step (checkpointed)."""
        job = get_owned(s, Job, job_id, who, "job")
        if job.state in db.TERMINAL:
            raise HTTPException(409, f"job {job_id} already ended ({job.state})")
        s.execute(
            sa.update(Job)
            .where(Job.id == job_id, Job.state == "queued")
            .values(state="cancelled", error="cancelled by request", finished_at=db.now())
        )
        s.execute(sa.update(Job).where(Job.id == job_id).values(cancel_requested=True))
        s.commit()
        s.refresh(job)
        return _job_out(job)

    # -- versions --

    @app.get("/versions/{version_id}", responses=_ERRORS)
    def get_version(who: Owner, s: Session, version_id: Id) -> VersionOut:
        return _version_out(get_owned(s, Version, version_id, who, "version"))

    @app.get("/versions/{version_id}/metrics", responses=_ERRORS)
    def version_metrics(who: Owner, s: Session, version_id: Id) -> dict[str, Any]:
        """R (rows: versions 1..n; columns: experiences), summary, per-class IoU."""
        return get_owned(s, Version, version_id, who, "version").metrics

    def weights_file(v: Version) -> str:
        w = v.weights
        path = os.path.join(settings.scratch, "cache", f"{w['sha256']}.npz")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            objects.get_file(w["key"], path, expect=store.StoredObject(**w))
        return path

    @app.get(
        "/versions/{version_id}/weights",
        responses={**_ERRORS, 200: {"content": {"application/octet-stream": {}}}},
        response_class=Response,
    )
    def download_weights(who: Owner, s: Session, version_id: Id) -> FileResponse:
        """The version's params and BatchNorm statistics as ``.npz`` (``models.weights``)."""
        v = get_owned(s, Version, version_id, who, "version")
        return FileResponse(
            weights_file(v),
            media_type="application/octet-stream",
            filename=f"weights-{v.lineage_id}-v{v.number}.npz",
        )

    @app.post(
        "/versions/{version_id}/predict",
        responses={**_ERRORS, 400: {}, 413: {}, 200: {"content": {"image/png": {}}}},
        response_class=Response,
    )
    def predict(
        who: Owner,
        s: Session,
        version_id: Id,
        image: Annotated[UploadFile, File(description="PNG or JPEG")],
    ) -> Response:
        """Segments an image: a PNG mask (mode L, class ids) at the image's size."""
        v = get_owned(s, Version, version_id, who, "version")
        spec = s.get(Lineage, v.lineage_id).spec
        data = image.file.read(settings.max_upload_bytes + 1)
        with predictor_lock:
            if v.id not in predictors:
                if len(predictors) >= 8:
                    predictors.pop(next(iter(predictors)))
                predictors[v.id] = lineage.Predictor(spec, weights_file(v))
            run = predictors[v.id]
        try:
            png = run(data, settings.max_image_pixels)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        return Response(png, media_type="image/png")

    @app.exception_handler(store.StoreError)
    def store_error(request: Request, err: store.StoreError) -> JSONResponse:
        del request
        return JSONResponse({"detail": f"object store unavailable: {err}"}, 503)

    app.add_middleware(_BodyLimit, limit=settings.max_upload_bytes + 2**20)
    return app
