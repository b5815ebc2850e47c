"""``/metrics``: the service's state in Prometheus' text format.

Jobs by state and the queue depth come from the database (every API process reports the same
numbers); job seconds are summed over ended jobs (``started_at`` to ``finished_at``); request
counts are this API process's own (``CountRequests``), by method, route template and status.
A token is needed unless ``CLSEG_METRICS_PUBLIC=1``.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials

from clseg_jax.serve import db
from clseg_jax.serve.db import Job
from clseg_jax.serve.routes import deps
from clseg_jax.serve.routes.deps import ERRORS, Session, Svc

router = APIRouter()


class Requests:
    """Answered requests by (method, route template, status), counted by ``CountRequests``."""

    def __init__(self):
        self._counts: Counter[tuple[str, str, int]] = Counter()
        self._lock = threading.Lock()

    def add(self, method: str, route: str, status: int) -> None:
        with self._lock:
            self._counts[(method, route, status)] += 1

    def snapshot(self) -> dict[tuple[str, str, int], int]:
        with self._lock:
            return dict(self._counts)


class CountRequests:
    """ASGI middleware: each answered HTTP request into ``counter``."""

    def __init__(self, app, counter: Requests):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.counter.add(scope["method"], path, status[0])


def _allowed(
    s: Session,
    svc: Svc,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(deps.bearer)],
) -> None:
    if not svc.settings.metrics_public:
        deps.token(creds, s)  # 401 without a known, unexpired token


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={**ERRORS, 200: {"content": {"text/plain": {}}}},
    dependencies=[Depends(_allowed)],
)
def metrics(request: Request, s: Session) -> PlainTextResponse:
    by_state = dict(s.execute(sa.select(Job.state, sa.func.count()).group_by(Job.state)).all())
    seconds = s.execute(
        sa.select(Job.state, sa.func.sum(Job.finished_at - Job.started_at), sa.func.count())
        .where(Job.state.in_(db.TERMINAL), Job.started_at.is_not(None))
        .group_by(Job.state)
    ).all()
    out = [
        "# HELP clseg_jobs Jobs by state.",
        "# TYPE clseg_jobs gauge",
        *(f'clseg_jobs{{state="{st}"}} {by_state.get(st, 0)}' for st in db.STATES),
        "# HELP clseg_queue_depth Jobs waiting for a worker.",
        "# TYPE clseg_queue_depth gauge",
        f"clseg_queue_depth {by_state.get('queued', 0)}",
        "# HELP clseg_job_seconds Seconds ended jobs ran, from start to end, by final state.",
        "# TYPE clseg_job_seconds summary",
    ]
    for st, total, n in seconds:
        out += [
            f'clseg_job_seconds_sum{{state="{st}"}} {float(total or 0.0):.3f}',
            f'clseg_job_seconds_count{{state="{st}"}} {n}',
        ]
    out += [
        "# HELP clseg_http_requests_total Requests this API process answered.",
        "# TYPE clseg_http_requests_total counter",
    ]
    counter: Requests = request.app.state.requests
    for (method, route, status), n in sorted(counter.snapshot().items()):
        labels = f'method="{method}",route="{_label(route)}",status="{status}"'
        out.append(f"clseg_http_requests_total{{{labels}}} {n}")
    return PlainTextResponse("\n".join(out) + "\n", media_type="text/plain; version=0.0.4")
