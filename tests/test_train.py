"""End to end through ``train.run`` and the CLI on tiny streams: results, resume, bad runs."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import time

import jax
import numpy as np
import pytest

from clseg_jax import checkpoint, train
from tests import tiny

TINY_FLAGS = [
    "--config.data.image_size=32",
    "--config.data.test_per_exp=16",
    "--config.model.kwargs.widths=(8,16)",
    "--config.batch_size=8",
    "--config.eval_batch_size=16",
    "--config.epochs=4",
    "--config.log_every_steps=1",
    "--config.progress=False",
    "--config.log.tensorboard=False",
]


_cli = tiny.cli


def _read(workdir, step=None):
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return ckpt.read(step)
    finally:
        ckpt.close()


HAVE_TB = importlib.util.find_spec("tensorboardX") is not None
HAVE_WANDB = importlib.util.find_spec("wandb") is not None


@pytest.fixture(scope="module")
def naive_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("naive"))
    # The optional writers are on where installed (CI installs them) so their paths run too.
    cfg = tiny.config(**{"log.tensorboard": HAVE_TB, "log.wandb": HAVE_WANDB})
    return workdir, train.run(cfg, workdir)


def test_results_json_has_every_field(naive_run):
    workdir, _ = naive_run
    on_disk = json.load(open(os.path.join(workdir, "results.json")))
    R = np.array(on_disk["accuracy_matrix"], float)
    assert R.shape == (4, 4)
    assert len(on_disk["initial_row"]) == 4
    np.testing.assert_allclose(on_disk["avg_miou"], R[-1].mean())
    forgetting = np.mean([R[:-1, j].max() - R[-1, j] for j in range(3)])
    np.testing.assert_allclose(on_disk["forgetting"], forgetting)
    np.testing.assert_allclose(on_disk["bwt"], np.mean([R[-1, j] - R[j, j] for j in range(3)]))
    fwt = np.mean([R[j - 1, j] - on_disk["initial_row"][j] for j in range(1, 4)])
    np.testing.assert_allclose(on_disk["fwt"], fwt)
    assert len(on_disk["per_class"]) == 4 and set(on_disk["per_class"][0]) <= set("01234")
    for key in ("train_s", "train_steps", "compile_s", "strategy_s", "eval_s", "compile_count"):
        assert key in on_disk["timing"], key
    assert on_disk["timing"]["train_steps"] == 4 * 32
    assert on_disk["config"]["strategy"]["name"] == "naive"
    for name in ("accuracy_matrix.png", "curves.png", "metrics.jsonl"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert sum("train/loss" in x for x in lines) == 4 * 32  # log_every_steps=1
    if HAVE_TB:
        events = os.listdir(os.path.join(workdir, "tb"))
        assert any(e.startswith("events.out.tfevents") for e in events)
    if HAVE_WANDB:
        assert os.path.isdir(os.path.join(workdir, "wandb"))
    # Learning happened: the diagonal beats the untrained model.
    assert np.mean(np.diag(R)) > np.mean(on_disk["initial_row"]) + 0.05


def test_nothing_compiles_after_the_first_experience(naive_run):
    _, results = naive_run
    per_phase = results["timing"]["compiles_per_phase"]
    assert len(per_phase) == 4 and per_phase[0] >= 0
    # Train step, eval step, hooks and host glue: all compiled before or in the first phase.
    assert per_phase[1:] == [0, 0, 0], per_phase
    assert results["timing"]["compile_count"] >= 2  # at least the train and eval steps


def test_joint_has_one_row(tmp_path):
    results = train.run(
        tiny.config(**{"strategy.name": "joint", "data.num_experiences": 2}), str(tmp_path)
    )
    assert np.array(results["accuracy_matrix"]).shape == (1, 2)
    assert results["forgetting"] is None and results["bwt"] is None
    assert results["timing"]["train_steps"] == 2 * 32


def test_rerun_on_finished_workdir_resumes_instead_of_retraining(naive_run):
    workdir, results = naive_run
    again = train.run(tiny.config(), workdir)
    assert again["accuracy_matrix"] == results["accuracy_matrix"]
    assert again["timing"]["train_steps"] == results["timing"]["train_steps"]


@pytest.mark.parametrize("save_delay_s", [0.0, 2.0])
def test_sigkill_then_resume_equals_uninterrupted_run(naive_run, tmp_path, save_delay_s):
    ref_dir, ref = naive_run
    workdir = str(tmp_path / "killed")
    # 32 steps per experience; periodic (asynchronous) checkpoints every 8 steps within an
    # experience. Killed at global step 43, 3 steps after the periodic save at step 40 began.
    # With a 2 s delay in the writer that save is still in flight: the rerun starts from the
    # previous complete one (the end of experience 0, a save that training waits for).
    args = [
        "--config=configs/shapes_di.py:train_per_exp=64",
        f"--workdir={workdir}",
        *TINY_FLAGS,
        "--config.checkpoint_every_steps=8",
        "--config.debug.kill_at_step=43",
        f"--config.debug.save_delay_s={save_delay_s}",
    ]
    proc = _cli(args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert max(x["step"] for x in lines) == 43
    _, latest = _read(workdir)
    if save_delay_s:
        assert (latest["phase"], latest["step_in_phase"]) == (1, 0)
        assert any(".orbax-checkpoint-tmp" in p for p in os.listdir(f"{workdir}/checkpoints"))
    else:  # a tiny model's save is written in milliseconds, but in the background
        assert latest["phase"] == 1 and latest["step_in_phase"] in (0, 8)

    resumed = train.run(tiny.config(), workdir)
    np.testing.assert_allclose(resumed["accuracy_matrix"], ref["accuracy_matrix"], atol=1e-6)
    a, b = _read(ref_dir)[0], _read(workdir)[0]
    for x, y in zip(jax.tree.leaves(a["state"]), jax.tree.leaves(b["state"]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_sigterm_saves_then_exits_cleanly(tmp_path):
    workdir = str(tmp_path)
    args = ["--config=configs/shapes_di.py:train_per_exp=256", f"--workdir={workdir}", *TINY_FLAGS]
    proc = _cli(args)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "rerun the same command to resume" in out
    _, meta = _read(workdir)
    assert meta["phase"] < 4 and not os.path.exists(os.path.join(workdir, "results.json"))
    # The stop's save is waited for, so this checkpoint is where the run stopped, mid-experience
    # on any machine (the SIGKILL test's periodic saves are asynchronous): the resume from it,
    # read-ahead iterator state included, ends where an uninterrupted run does.
    assert 0 < meta["step_in_phase"] < 128, meta["step_in_phase"]
    cfg = tiny.config(**{"data.train_per_exp": 256})
    resumed = train.run(cfg, workdir)
    ref = train.run(cfg, str(tmp_path / "ref"))
    np.testing.assert_allclose(resumed["accuracy_matrix"], ref["accuracy_matrix"], atol=1e-6)
    a, b = _read(str(tmp_path / "ref"))[0], _read(workdir)[0]
    for x, y in zip(jax.tree.leaves(a["state"]), jax.tree.leaves(b["state"]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_a_cancel_stops_after_the_step_in_flight_and_saves_nothing(tmp_path):
    """``Hooks.should_cancel`` (the service's cancel) is polled once per step: the run returns
    ``{}`` right after the step during which it said so, and writes nothing more (the periodic
    save of step 4 stays the latest; no results.json)."""
    polls = iter(range(1, 10**6))
    cancel_after = 5
    hooks = train.Hooks(should_cancel=lambda: next(polls) >= cancel_after)
    cfg = tiny.config(**{"checkpoint_every_steps": 4})
    assert train.run(cfg, str(tmp_path), hooks) == {}
    assert next(polls) == cancel_after + 1  # no step ran after the cancel was seen
    _, meta = _read(str(tmp_path))
    assert (meta["phase"], meta["step_in_phase"]) == (0, 4)
    assert not os.path.exists(tmp_path / "results.json")


def test_sigterm_during_a_synthesis_stops_within_seconds_and_resumes(tmp_path):
    """DeepInversion after phase 0 with 100,000 iterations (hours here): SIGTERM once the phase's
    two steps are logged must end the run within seconds, with a checkpoint at the end of the
    phase's steps that a rerun (with a synthesis short enough to finish) resumes from."""
    workdir = str(tmp_path)
    args = [
        "--config=configs/shapes_di.py:strategy=deepinversion,train_per_exp=16",
        f"--workdir={workdir}",
        *TINY_FLAGS,
        "--config.epochs=1",
    ]
    proc = _cli([*args, "--config.strategy.di_iterations=100000"])
    metrics = os.path.join(workdir, "metrics.jsonl")

    def steps_logged() -> int:
        if not os.path.exists(metrics):
            return 0
        with open(metrics) as f:
            return max((json.loads(line)["step"] for line in f if line.strip()), default=0)

    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and steps_logged() < 2:
        time.sleep(0.2)
    time.sleep(1.0)  # into the synthesis (its compile, or its iterations)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    waited = time.time() - sent
    assert proc.returncode == 0 and "rerun the same command to resume" in out, err[-2000:]
    assert waited < 30, waited  # one iteration (or its first compile) and a checkpoint
    assert "synthesis stopped at iteration" in err, err[-2000:]
    _, meta = _read(workdir)
    assert (meta["phase"], meta["step_in_phase"]) == (0, 2), meta

    resumed = _cli([*args, "--config.strategy.di_iterations=2"])
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-2000:]
    with open(os.path.join(workdir, "results.json")) as f:
        assert len(json.load(f)["accuracy_matrix"]) == 4


def test_non_finite_loss_stops_and_keeps_only_finite_checkpoints(tmp_path):
    cfg = tiny.config(**{"optimizer.lr": 1e30, "checkpoint_every_steps": 1})
    with pytest.raises(train.NonFiniteLossError, match=r"step \d+ \(phase 0, experience"):
        train.run(cfg, str(tmp_path))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    steps = ckpt.steps()
    ckpt.close()
    assert steps, "the steps before the overflow were checkpointed"
    for step in steps:
        arrays, _ = _read(str(tmp_path), step)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(arrays))


@pytest.mark.parametrize(
    "config, flag, message",
    [
        ("shapes_di.py", "--config.strategy.name=foo", "unknown strategy 'foo'; valid: ['agem',"),
        ("shapes_di.py", "--config.data.name=coco", "unknown dataset 'coco'; valid: ['ade',"),
        ("shapes_di.py", "--config.model.name=vgg", "unknown model 'vgg'; valid: ['bisenet',"),
        # Mistakes absl and ml_collections reported as a traceback or a fatal flags error.
        ("shapes_di.py:p51", "", "unknown config argument 'p51'; valid: ['compare', 'seed',"),
        ("nope.py", "", "config file 'configs/nope.py' not found"),
        ("shapes_di.py", "--config.epoch=3", "config has no field 'epoch'; did you mean 'epochs'?"),
        (
            "shapes_di.py",
            "--config.model.kwargs.dtpye=bfloat16",
            "config.model.kwargs has no field 'dtpye'; did you mean 'dtype'?",
        ),
        ("shapes_di.py", "--config.epochs=abc", "--config.epochs=abc: expected int"),
        ("shapes_di.py", "--config.precision=fp8", "unknown precision 'fp8'; valid: ['float32',"),
        (
            "shapes_di.py",
            "--config.distributed.num_processes=2",
            "num_processes=2 needs config.distributed.coordinator=host:port",
        ),
        ("shapes_di.py", "--config.progress=maybe", "--config.progress=maybe: expected bool"),
        (
            "shapes_di.py:strategy=ewc",
            "--config.ensemble.sweep={'strategy.ewc_lamda': (1., 10.)}",
            "no field 'strategy.ewc_lamda'; did you mean 'strategy.ewc_lambda'?",
        ),
        (
            "shapes_di.py:strategy=ewc",
            "--config.ensemble.sweep={'strategy.ewc_samples': (8, 16)}",
            "'strategy.ewc_samples' cannot be swept (an integer",
        ),
    ],
)
def test_user_mistakes_give_one_line_errors(config, flag, message, tmp_path):
    proc = _cli([f"--config=configs/{config}", f"--workdir={tmp_path}", *filter(None, [flag])])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, err[-1500:]
    assert err.count(message) == 1 and "Traceback" not in err, err[-1500:]
