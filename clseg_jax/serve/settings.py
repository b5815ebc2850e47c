"""Service settings from ``CLSEG_*`` environment variables; defaults are the embedded mode.

=========================  ==============================  ======================================
variable                   default                         meaning
=========================  ==============================  ======================================
``CLSEG_HOME``             ``./serve_data``                home of the embedded defaults below
``CLSEG_DB``               ``sqlite:///$HOME/clseg.db``    SQLAlchemy URL (``postgresql+psycopg``)
``CLSEG_STORE``            ``$HOME/objects``               folder or ``s3://bucket?endpoint=URL``
``CLSEG_QUEUE``            ``inprocess``                   or a Redis URL (Celery workers)
``CLSEG_SCRATCH``          ``$HOME/scratch``               workers' local work folders
``CLSEG_LEASE_S``          ``30``                          job lease; heartbeat every third
``CLSEG_MAX_ATTEMPTS``     ``3``                           tries after transient I/O errors
``CLSEG_JOB_TIME_LIMIT_S`` ``86400``                       longer jobs fail (checkpoint kept)
``CLSEG_MAX_UPLOAD_MB``    ``512``                         per uploaded file (dataset, image)
``CLSEG_MAX_IMAGE_PIXELS`` ``16777216``                    per decoded image (upload, predict)
``CLSEG_METRICS_PUBLIC``   ``0``                           ``1``: ``/metrics`` needs no token
=========================  ==============================  ======================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


@dataclass(frozen=True)
class Settings:
    db_url: str
    store_url: str
    queue: str
    scratch: str
    lease_s: int = 30
    max_attempts: int = 3
    job_time_limit_s: int = 86400
    max_upload_bytes: int = 512 * 2**20
    max_image_pixels: int = 4096 * 4096
    metrics_public: bool = False

    @classmethod
    def from_env(cls) -> Settings:
        home = os.path.abspath(os.environ.get("CLSEG_HOME", "serve_data"))
        return cls(
            db_url=os.environ.get("CLSEG_DB", f"sqlite:///{home}/clseg.db"),
            store_url=os.environ.get("CLSEG_STORE", os.path.join(home, "objects")),
            queue=os.environ.get("CLSEG_QUEUE", "inprocess"),
            scratch=os.environ.get("CLSEG_SCRATCH", os.path.join(home, "scratch")),
            lease_s=_int("CLSEG_LEASE_S", 30),
            max_attempts=_int("CLSEG_MAX_ATTEMPTS", 3),
            job_time_limit_s=_int("CLSEG_JOB_TIME_LIMIT_S", 86400),
            max_upload_bytes=_int("CLSEG_MAX_UPLOAD_MB", 512) * 2**20,
            max_image_pixels=_int("CLSEG_MAX_IMAGE_PIXELS", 4096 * 4096),
            metrics_public=_int("CLSEG_METRICS_PUBLIC", 0) == 1,
        )

    def upload_limit_message(self) -> str:
        """What a 413 says: the limit in the unit its setting uses."""
        n = self.max_upload_bytes
        if n % 2**20 == 0:
            return f"upload over the limit of {n // 2**20} MiB (CLSEG_MAX_UPLOAD_MB={n // 2**20})"
        return f"upload over the limit of {n} bytes"

    def prepare(self) -> None:
        """Creates the local folders the embedded defaults need."""
        os.makedirs(self.scratch, exist_ok=True)
        if self.db_url.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(self.db_url[len("sqlite:///") :]) or ".", exist_ok=True)
