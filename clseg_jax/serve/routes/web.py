"""``/health`` and ``/``, the web page (outside the schema): the routes without a token."""

from __future__ import annotations

import os

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

router = APIRouter()
PAGE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "web", "index.html")


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(PAGE)
