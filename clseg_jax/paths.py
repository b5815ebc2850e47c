"""A run's folder as an ``etils.epath`` path: local, or a URL such as ``gs://bucket/run``.

Orbax writes checkpoints through ``epath``, so a workdir on Google Cloud Storage (what a TPU VM's
workers all see) needs every other file of a run (results.json, plots, metrics.jsonl) to go
through it too rather than through ``os.path`` and ``open``. A local path is made absolute (a
resumed run finds its checkpoints from any current directory); a URL is taken as it is.

Only local paths are tested here: this machine reaches no object store. On one, writes are
whole objects: results.json needs no temporary file there, and ``metrics.jsonl``, which cannot be
appended to, is rewritten whole at each flush (``writers``).
"""

from __future__ import annotations

import os

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: absolute if local."""
    text = os.fspath(path)
    return epath.Path(text if is_url(text) else os.path.abspath(os.path.expanduser(text)))
