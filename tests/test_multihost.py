"""Several processes, one run: ``jax.distributed`` over gloo on loopback, each process with its
own CPU devices, launched through the command line as a user launches a TPU VM's workers.

A 2-process run (2 devices each) equals the 1-process run on the same 4 devices, for a
segmentation stream with ``ewc+replay`` (herding) and for a multi-label stream; when one process
dies mid-experience the other exits with one line instead of hanging, and the same launch again
resumes and ends where the uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from clseg_jax import checkpoint
from tests import tiny

DEVICES = 4  # global device count of every run here
COMMON = [
    "--config.progress=False",
    "--config.log.tensorboard=False",
    "--config.log_every_steps=2",
    "--config.checkpoint_every_steps=2",
    "--config.epochs=1",
    "--config.batch_size=8",
]
SEGMENTATION = [
    "--config=configs/shapes_di.py",
    *COMMON,
    "--config.data.image_size=32",
    "--config.data.train_per_exp=64",
    "--config.data.test_per_exp=16",
    "--config.data.num_experiences=2",
    "--config.model.kwargs.widths=(8,16)",
    "--config.eval_batch_size=16",
    "--config.strategy.name=ewc+replay",
    "--config.strategy.replay_batch=4",
    # Herding: memory selection from features that each process computes for its rows only.
    "--config.strategy.replay_policy=herding",
]
MULTILABEL = [
    "--config=configs/multilabel_digits.py",
    *COMMON,
    "--config.data.classes_per_step=(5,5)",
    "--config.data.train_per_exp=64",
    "--config.data.test_per_exp=32",
    "--config.model.kwargs.widths=(4,8,8,8)",
    "--config.eval_batch_size=16",
    # The gradient all-reduce sums in another order over gloo (per process, then across) than
    # within one process, a rounding difference (6e-8 in the parameters here). Adam at this
    # config's 1e-3, or SGD at 0.05 with momentum, amplifies it in this tiny ResNet's
    # batch-8 BatchNorm to 1e-3..1e-2 within 16 steps (measured; docs/scale.md): SGD at 0.01
    # keeps the comparison at rounding.
    "--config.optimizer.name=sgd",
    "--config.optimizer.lr=0.01",
    "--config.optimizer.momentum=0.0",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(flags, workdir, n: int, extra=None) -> list[subprocess.Popen]:
    """``n`` processes of ``python -m clseg_jax.main`` with ``DEVICES // n`` CPU devices each;
    ``extra[i]``: more flags for process ``i``."""
    port, procs = _free_port(), []
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES // n}"}
    for i in range(n):
        dist = []
        if n > 1:
            dist = [
                f"--config.distributed.coordinator=127.0.0.1:{port}",
                f"--config.distributed.num_processes={n}",
                f"--config.distributed.process_id={i}",
            ]
        args = [*flags, *dist, *(extra or {}).get(i, []), f"--workdir={workdir}"]
        procs.append(tiny.cli(args, env))
    return procs


def _wait(procs, ok: bool = True, timeout: float = 240) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err))
        if ok:
            assert p.returncode == 0, err[-3000:]
    return out


def _final(workdir) -> tuple[np.ndarray, list]:
    with open(os.path.join(workdir, "results.json")) as f:
        r = np.asarray(json.load(f)["accuracy_matrix"], float)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        arrays, _ = ckpt.read()
    finally:
        ckpt.close()
    return r, [np.asarray(x) for x in jax.tree.leaves(arrays["state"]["params"])]


def _assert_same_run(a, b) -> None:
    (ra, pa), (rb, pb) = _final(a), _final(b)
    np.testing.assert_allclose(ra, rb, atol=1e-5)
    assert len(pa) == len(pb) > 0
    for x, y in zip(pa, pb, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.fixture(scope="module")
def segmentation_runs(tmp_path_factory):
    """The 1-process run, and the 2-process run started alongside it (both at once: 2 cores)."""
    root = tmp_path_factory.mktemp("multihost")
    one = _launch(SEGMENTATION, root / "one", 1)
    two = _launch(SEGMENTATION, root / "two", 2)
    _wait(one + two)
    return root


def test_two_processes_train_as_one_ewc_replay(segmentation_runs):
    root = segmentation_runs
    _assert_same_run(root / "one", root / "two")
    # Only process 0 writes the run's files; each process's rows went into every batch.
    assert (root / "two" / "results.json").exists() and (root / "two" / "metrics.jsonl").exists()


def test_a_dead_peer_ends_the_run_in_one_line_and_the_rerun_resumes(segmentation_runs, tmp_path):
    """Process 1 SIGKILLed at global step 11 (the second experience's third step, after the
    checkpoint of its second): process 0 exits within 30 s with one line instead of hanging;
    the same launch again resumes from that checkpoint and ends where the uninterrupted run
    did (both processes gone mid-experience, neither having saved anything partial)."""
    # A 5 s heartbeat (10 by default) for this launch only: the wait for the watchdog is the
    # test's longest idle stretch, and its processes are otherwise busy on both cores.
    beat = ["--config.distributed.heartbeat_s=5"]
    procs = _launch(
        SEGMENTATION, tmp_path, 2, {0: beat, 1: [*beat, "--config.debug.kill_at_step=11"]}
    )
    procs[1].wait(timeout=240)
    died = time.monotonic()
    rc, err = _wait(procs[:1], ok=False, timeout=60)[0]
    assert time.monotonic() - died <= 30
    assert rc != 0 and procs[1].returncode == -9
    last = err.strip().splitlines()[-1]
    # A failed collective or the watchdog's silent peer, whichever comes first.
    assert last.startswith("error: process 0 of 2: "), err[-3000:]
    assert "most likely another process died" in last, err[-3000:]
    assert not (tmp_path / "results.json").exists()
    _wait(_launch(SEGMENTATION, tmp_path, 2))
    _assert_same_run(segmentation_runs / "two", tmp_path)


def test_two_processes_train_as_one_multilabel(tmp_path):
    """Multi-label scoring (average precision from scores kept on device) across processes."""
    _wait(_launch(MULTILABEL, tmp_path / "one", 1) + _launch(MULTILABEL, tmp_path / "two", 2))
    _assert_same_run(tmp_path / "one", tmp_path / "two")


def test_launch_mistakes_are_one_line_before_any_work():
    from clseg_jax import config as config_lib
    from clseg_jax import distributed

    def check(**fields):
        c = config_lib.base_config()
        c.distributed.update(fields)
        distributed.check(c)

    check(coordinator="10.0.0.2:1234", num_processes=2, process_id=1)
    with pytest.raises(ValueError, match=r"num_processes=2 needs config\.distributed\.coordinator"):
        check(num_processes=2, process_id=1)
    with pytest.raises(ValueError, match=r"process_id must be in \[0, num_processes=2\), got 2"):
        check(coordinator="h:1", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="coordinator must be host:port, got 'h'"):
        check(coordinator="h", num_processes=2)
    with pytest.raises(ValueError, match="auto detects the cluster itself"):
        check(auto=True, num_processes=2)
    with pytest.raises(ValueError, match="batch_size=32 is not divisible by the 3 processes"):
        check(coordinator="h:1", num_processes=3)
