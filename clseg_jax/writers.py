"""Metric writer without TensorFlow: JSON lines always, TensorBoard and wandb optionally.

``<workdir>/metrics.jsonl`` is the source of truth (one ``{"step", "time", **scalars}`` object per
line, appended so a resumed run continues the same file). TensorBoard event files come from
``tensorboardX`` when it is installed; wandb is opt-in and defaults to offline mode so runs work
without network access (sync later with ``wandb sync <workdir>/wandb/offline-run-*``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from absl import logging

from clseg_jax import paths

_RESERVED = ("step", "time")


def _json_value(value: float) -> float | None:
    return value if math.isfinite(value) else None


class MetricWriter:
    """Writes scalar metrics to ``metrics.jsonl`` and, optionally, TensorBoard and wandb.

    Usage::

        with MetricWriter(workdir, wandb=True, config=cfg.to_dict()) as writer:
            writer.write_scalars(step, {"train/loss": loss})

    Args:
      workdir: run directory (created if missing).
      tensorboard: also write event files to ``<workdir>/tb`` if ``tensorboardX`` is importable;
        otherwise a warning is logged once and only JSON lines are written.
      wandb: also log to Weights & Biases (``pip install -e .[logging]``).
      wandb_project: wandb project name.
      wandb_mode: ``"offline"`` (default, no network), ``"online"`` or ``"disabled"``.
      run_name: wandb run name.
      config: hyper-parameters recorded with the wandb run.
      enabled: False makes every call a no-op that writes nothing (the processes other than 0
        of a multi-process run).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "clseg_jax",
        wandb_mode: str = "offline",
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        enabled: bool = True,
    ):
        self.workdir = paths.resolve(workdir)
        self.jsonl_path = str(self.workdir / "metrics.jsonl")
        self._closed = False
        self._tb: Any = None
        self._wandb_run: Any = None
        self._jsonl: Any = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Append: a resumed run keeps its earlier history in the same file. An object store
        # cannot append, so there the whole object is rewritten at each flush.
        path = self.workdir / "metrics.jsonl"
        self._jsonl = _Rewritten(path) if paths.is_url(path) else path.open("a", encoding="utf-8")
        try:
            if tensorboard:
                self._tb = self._open_tensorboard()
            if wandb:
                self._wandb_run = self._open_wandb(wandb_project, wandb_mode, run_name, config)
        except BaseException:
            self.close()
            raise

    def _open_tensorboard(self) -> Any:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            logging.warning(
                "tensorboard=True but tensorboardX is not installed; writing only %s "
                "(pip install -e .[logging] for TensorBoard event files).",
                self.jsonl_path,
            )
            return None
        return SummaryWriter(logdir=str(self.workdir / "tb"))

    def _open_wandb(
        self,
        project: str,
        mode: str,
        run_name: str | None,
        config: Mapping[str, Any] | None,
    ) -> Any:
        try:
            import wandb
        except ImportError as e:
            raise ImportError(
                "wandb=True needs the wandb package: pip install -e .[logging]"
            ) from e
        if config is not None and hasattr(config, "to_dict"):  # ml_collections.ConfigDict
            config = config.to_dict()
        # Settings (not os.environ) keep wandb quiet and light: no console capture, no system
        # stats sampling, no git probing; "create_new" lets several writers coexist in one process.
        settings = wandb.Settings(
            silent=True,
            console="off",
            disable_git=True,
            save_code=False,
            x_disable_stats=True,
            x_disable_machine_info=True,
        )
        return wandb.init(
            project=project,
            dir=str(self.workdir),
            mode=mode,
            config=dict(config) if config is not None else None,
            name=run_name,
            reinit="create_new",
            settings=settings,
        )

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Records ``scalars`` (name -> number, incl. numpy/jax scalars) at ``step``.

        Non-finite values are written as ``null`` in JSON (strict JSON has no NaN) and passed
        through unchanged to TensorBoard and wandb.
        """
        if self._closed:
            raise RuntimeError("MetricWriter is closed")
        clash = [k for k in _RESERVED if k in scalars]
        if clash:
            raise ValueError(f"scalar names {clash} are reserved in metrics.jsonl")
        if self._jsonl is None:  # disabled
            return
        step = int(step)
        # float() accepts Python numbers, numpy scalars and 0-d jax/numpy arrays alike.
        values = {str(k): float(v) for k, v in scalars.items()}
        record = {"step": step, "time": time.time()}
        record.update({k: _json_value(v) for k, v in values.items()})
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        # Metrics are written rarely; flushing each line keeps the file complete if the job dies.
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, global_step=step)
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def flush(self) -> None:
        """Pushes buffered data to disk (JSON lines and TensorBoard)."""
        if self._closed or self._jsonl is None:
            return
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes every sink and finishes the wandb run. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._jsonl is not None:
                self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
        finally:
            self._tb = None
            if self._wandb_run is not None:
                run, self._wandb_run = self._wandb_run, None
                run.finish()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Rewritten:
    """A text file on an object store (``gs://``) that is appended to by rewriting it whole: the
    earlier lines (a resumed run's) are read once, each ``flush`` writes everything."""

    def __init__(self, path):
        self._path = path
        self._text = path.read_text() if path.exists() else ""

    def write(self, text: str) -> None:
        self._text += text

    def flush(self) -> None:
        self._path.write_text(self._text)

    def close(self) -> None:
        self.flush()
