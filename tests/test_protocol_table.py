"""experiments/protocol_table.py end to end on the generated tiny VOC-layout dataset."""

from __future__ import annotations

import json
import os

from experiments import protocol_table


def test_protocol_table_runs_and_resumes(tmp_path):
    out = tmp_path / "table.md"
    argv = [
        "--config",
        os.path.join(os.path.dirname(__file__), "..", "configs", "voc_ci.py"),
        "--tasks",
        "2-2",
        "--settings",
        "overlapped,disjoint",
        "--methods",
        "finetune,mib",
        "--arg",
        "tiny",
        "--set",
        "epochs=1",
        "--set",
        "progress=false",
        "--set",
        "log.tensorboard=false",
        "--workdir",
        str(tmp_path / "runs"),
        "--out",
        str(out),
    ]
    text = protocol_table.main(argv)
    assert out.read_text() == text
    for section in ("### 2-2 overlapped", "### 2-2 disjoint"):
        assert section in text
    rows = [line for line in text.splitlines() if line.startswith(("| finetune", "| mib"))]
    assert len(rows) == 4
    runs = json.loads((tmp_path / "table.json").read_text())["runs"]
    assert {(r["setting"], r["method"]) for r in runs} == {
        (s, m) for s in ("overlapped", "disjoint") for m in ("finetune", "mib")
    }
    for r in runs:
        assert r["evaluated_on"] == "full test set"
        assert 0.0 <= r["last"]["all"] <= 1.0
        # The table's "all" cell is the run's own figure, in percent.
        assert f"{r['last']['all'] * 100:.1f}" in text
    # Finished runs are read back, not retrained: the same table, no new checkpoint.
    before = sorted(os.listdir(tmp_path / "runs"))
    assert protocol_table.main(argv) == text
    assert sorted(os.listdir(tmp_path / "runs")) == before
