"""Tests for clseg_jax.report and clseg_jax.writers."""

from __future__ import annotations

import glob
import json
import math
import os

import numpy as np
import pytest

from clseg_jax import paths, report, writers

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
R3 = [[0.8, 0.1, 0.0], [0.6, 0.7, 0.2], [0.5, 0.6, float("nan")]]


def _assert_png(path: str) -> None:
    assert os.path.getsize(path) > 1000
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_write_results_round_trip(tmp_path, store):
    results = {
        "avg_miou": np.float32(0.5),
        "forgetting": float("nan"),
        "bwt": np.float64(np.nan),
        "inf": float("inf"),
        "steps": np.int64(7),
        "flag": np.bool_(True),
        "R": np.array([[0.25, np.nan], [0.5, 0.75]]),
        "classes": (1, 2),
        "nested": {3: [np.int32(1), None]},
    }
    path = report.write_results(tmp_path / "run", results)
    assert path == os.path.join(tmp_path / "run", "results.json")
    with open(path) as f:
        text = f.read()
    assert "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text)
    assert loaded == {
        "avg_miou": 0.5,
        "forgetting": None,
        "bwt": None,
        "inf": None,
        "steps": 7,
        "flag": True,
        "R": [[0.25, None], [0.5, 0.75]],
        "classes": [1, 2],
        "nested": {"3": [1, None]},
    }
    # Overwrite in place, no temporary files left behind.
    report.write_results(tmp_path / "run", {"a": 1})
    assert sorted(os.listdir(tmp_path / "run")) == ["results.json"]
    with open(path) as f:
        assert json.load(f) == {"a": 1}


def test_write_results_rejects_unknown_types(tmp_path):
    with pytest.raises(TypeError):
        report.write_results(tmp_path, {"x": object()})
    assert not os.path.exists(tmp_path / "results.json")


def test_plots_write_png(tmp_path):
    _assert_png(report.plot_accuracy_matrix(R3, tmp_path / "m.png", labels=["a", "b", "c"]))
    _assert_png(report.plot_curves(R3, tmp_path / "sub" / "c.png"))
    # Joint training: a single row.
    _assert_png(report.plot_accuracy_matrix([[0.5, 0.7, 0.6]], tmp_path / "j.png"))
    _assert_png(report.plot_curves([[0.5, 0.7, 0.6]], tmp_path / "jc.png"))


def test_comparison_table():
    rows = {
        "finetune": {
            "avg_miou": 0.41234,
            "forgetting": 0.3,
            "bwt": -0.25,
            "fwt": None,
            "avg_diag": 0.7,
            "timing": {"train_s": 120.0, "train_steps": 600},
        },
        "joint": {"summary": {"avg_miou": 0.75, "forgetting": None}, "timing": {}},
        "ewc": {"avg_miou": float("nan")},
    }
    table = report.comparison_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].split()[:3] == ["strategy", "avg", "mIoU"]
    for name in rows:
        assert name in table
    fine = next(line for line in lines if line.startswith("finetune")).split()
    assert fine == ["finetune", "0.4123", "0.3000", "-0.2500", "-", "0.7000", "120.0", "5.00"]
    joint = next(line for line in lines if line.startswith("joint")).split()
    assert joint == ["joint", "0.7500", "-", "-", "-", "-", "-", "-"]
    ewc = next(line for line in lines if line.startswith("ewc")).split()
    assert ewc == ["ewc"] + ["-"] * 7
    # Fixed width: every data line lines up with the rule.
    assert len({len(line) for line in lines[:2]}) == 1


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(params=["file", "object store"])
def store(request, monkeypatch):
    """Local files, or the object-store branch (``gs://``: no append, whole-object writes)
    taken on a local folder: this machine reaches no bucket."""
    if request.param == "object store":
        monkeypatch.setattr(paths, "is_url", lambda path: True)
    return request.param


def test_metric_writer_jsonl_appends(tmp_path, store):
    with writers.MetricWriter(tmp_path, tensorboard=False) as w:
        w.write_scalars(1, {"loss": np.float32(0.5), "miou": 0.25})
        w.write_scalars(2, {"loss": float("nan")})
    path = tmp_path / "metrics.jsonl"
    lines = _read_jsonl(path)
    assert [r["step"] for r in lines] == [1, 2]
    assert lines[0]["loss"] == 0.5 and lines[0]["miou"] == 0.25
    assert lines[1]["loss"] is None
    assert all(isinstance(r["time"], float) for r in lines)

    # A resumed run continues the same file.
    w = writers.MetricWriter(tmp_path, tensorboard=False)
    w.write_scalars(3, {"loss": 0.1})
    w.flush()
    w.close()
    w.close()  # idempotent
    assert [r["step"] for r in _read_jsonl(path)] == [1, 2, 3]
    with pytest.raises(RuntimeError):
        w.write_scalars(4, {"loss": 0.0})


def test_metric_writer_rejects_reserved_names(tmp_path):
    with writers.MetricWriter(tmp_path, tensorboard=False) as w, pytest.raises(ValueError):
        w.write_scalars(0, {"step": 1.0})


def test_metric_writer_tensorboard(tmp_path):
    pytest.importorskip("tensorboardX")
    with writers.MetricWriter(tmp_path) as w:
        w.write_scalars(5, {"train/loss": 1.5})
    events = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert events and os.path.getsize(events[0]) > 0
    assert _read_jsonl(tmp_path / "metrics.jsonl")[0]["train/loss"] == 1.5


def test_metric_writer_wandb_offline(tmp_path):
    pytest.importorskip("wandb")
    env_before = dict(os.environ)
    with writers.MetricWriter(
        tmp_path, tensorboard=False, wandb=True, run_name="test", config={"lr": 0.1}
    ) as w:
        w.write_scalars(1, {"loss": 0.5})
        w.write_scalars(2, {"loss": math.inf})
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    assert glob.glob(os.path.join(runs[0], "*.wandb"))
    # Only wandb's own service handle may appear; we set nothing ourselves.
    added = set(os.environ) - set(env_before)
    assert added <= {"WANDB_SERVICE"}
