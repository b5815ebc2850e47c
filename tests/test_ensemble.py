"""Ensembles (``config.ensemble``): N members of one stream as one compiled program.

Each member must equal the separate run it stands for (its seed, swept values and data order)
after steps of two phases, hooks included; bad ensembles are refused with one line.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clseg_jax import compiles, ensemble, members, setup, train
from clseg_jax.data import feed
from tests import tiny

STEPS = 3  # per phase: enough for momentum, memories and the phase-1 penalty to matter


def _drive(room, parts, phases: int = 2, steps: int = STEPS):
    """``steps`` steps of the first ``phases`` phases the way ``train.run`` takes them, through
    ``room`` (``setup`` or ``ensemble``); returns the final (state, sstate, last phase's row)."""
    step = room.compile_step(parts)
    state, sstate, key = parts.arrays["state"], parts.arrays["sstate"], parts.arrays["rng"]
    for phase in parts.phases[:phases]:
        state, sstate = room.begin_phase(parts, state, sstate, phase)
        metrics, monitor = room.fresh_accumulators(parts)
        mask = jnp.asarray(phase.class_mask)
        batches = feed.iterate(parts.datasets[phase.index], room.feed_sharding(parts), prefetch=0)
        for _ in range(steps):
            state, sstate, metrics, monitor = step(
                state, sstate, metrics, monitor, next(batches), key, mask
            )
        sstate = room.end_phase(parts, state, sstate, phase)
    row = parts.evaluator.row(state.params, state.batch_stats, phase.class_mask, sstate)
    return state, sstate, row


def _max_diff(a, b) -> float:
    return max(
        (
            float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        ),
        default=0.0,
    )


CASES = {
    # name: (config overrides, ensemble overrides)
    # Three members two at a time: a vmapped pair, then the third, in one program.
    "naive-seeds-chunk2": ({"strategy.name": "naive"}, {"seeds": (0, 1, 2), "chunk": 2}),
    "ewc-lambda": (
        {"strategy.name": "ewc"},
        {"seeds": (0,), "sweep": "{'strategy.ewc_lambda': (1., 1000.)}"},
    ),
    "replay-shuffled": ({"strategy.name": "replay"}, {"seeds": (0, 1), "shuffle_per_member": True}),
    "mib-class-incremental": (
        {"strategy.name": "mib", "data.name": "shapes_ci", "data.classes_per_step": (2, 2)},
        {"seeds": (0,), "sweep": "{'strategy.mib_kd': (1., 10.)}", "chunk": 2},  # vmapped
    ),
    "der-alpha-lr": (
        {"strategy.name": "der"},
        {"sweep": "{'strategy.der_alpha': (0.1, 1.), 'optimizer.lr': (1e-3,)}"},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_member_equals_its_separate_run(case):
    overrides, ens = CASES[case]
    # SGD: Adam's m / sqrt(v) turns last-bit differences of near-zero gradients into
    # lr-sized steps (as in test_multihost), which would hide what is compared here.
    sgd = {"optimizer.name": "sgd", "optimizer.lr": 0.01}
    config = tiny.config(**{**sgd, **overrides}, **{f"ensemble.{k}": v for k, v in ens.items()})
    e = ensemble.build(config)
    with compiles.Counter() as counter:
        state, sstate, row = _drive(ensemble, e)
    for m in e.members:
        alone = setup.build(m.config)
        s_state, s_sstate, s_row = _drive(setup, alone)
        params_diff = _max_diff(members.take(state, m.index), s_state)
        sstate_diff = _max_diff(members.take(sstate, m.index), s_sstate)
        assert params_diff <= 1e-5 and sstate_diff <= 1e-5, (m.index, params_diff, sstate_diff)
        confusions = np.stack([r[m.index] for r in row]), np.stack(s_row)
        assert np.abs(confusions[0] - confusions[1]).sum() <= 2, m.index
    # Members differ (their seeds or values), so the test could fail.
    assert _max_diff(members.take(state.params, 0), members.take(state.params, 1)) > 1e-4
    print(case, counter.count)


@pytest.mark.parametrize(
    "strategy, ensemble_fields, message",
    [
        ("naive", {"sweep": "strategy.lr=1"}, "is not a dict of field: values"),
        ("ewc", {"sweep": "{'strategy.ewc_lamda': (1.,)}"}, "did you mean 'strategy.ewc_lambda'?"),
        ("naive", {"sweep": "{'strategy.ewc_lambda': (1.,)}"}, "read by ['ewc'], not by strategy"),
        ("ewc", {"sweep": "{'strategy.ewc_mode': ('online',)}"}, "(a name: it sets shapes"),
        ("replay", {"sweep": "{'strategy.replay_mem_size': (8,)}"}, "(an integer: it sets"),
        ("naive", {"sweep": "{'optimizer.momentum': (0.5,)}"}, "only the learning rates"),
        ("naive", {"sweep": "{'optimizer.lr': ()}"}, "needs a tuple of numbers"),
        ("naive", {"seeds": (1, 1)}, "config.ensemble.seeds has repeats: (1, 1)"),
        # A float that the step uses in a Python branch (test_contract traces them all).
        (
            "deepinversion",
            {"sweep": "{'strategy.di_logit_mse': (0., 1.)}"},
            "'strategy.di_logit_mse' cannot be swept (a Python branch skips the logit MSE",
        ),
    ],
)
def test_what_cannot_be_an_ensemble_is_refused_with_one_line(strategy, ensemble_fields, message):
    config = tiny.config(
        **{"strategy.name": strategy}, **{f"ensemble.{k}": v for k, v in ensemble_fields.items()}
    )
    with pytest.raises(ValueError) as err:
        ensemble.build(config)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_members_are_seeds_times_the_sweep_grid():
    config = tiny.config(
        **{
            "strategy.name": "ewc",
            "ensemble.seeds": (3, 4),
            "ensemble.sweep": "{'strategy.ewc_lambda': (1., 2., 3.), 'optimizer.lr': (0.1, 1)}",
        }
    )
    ms = members.make(config)
    assert len(ms) == 12 and [m.index for m in ms] == list(range(12))
    assert ms[7].seed == 4 and ms[7].values == {"strategy.ewc_lambda": 1.0, "optimizer.lr": 1.0}
    c = ms[7].config
    assert (c.seed, c.strategy.ewc_lambda, c.optimizer.lr) == (4, 1.0, 1.0)
    # Every member reads the config's batches (seed 0) unless shuffled per member.
    assert {m.config.ensemble.data_order_seed for m in ms} == {0}
    assert not members.enabled(c)  # a member's config is its separate run
    config.ensemble.shuffle_per_member = True
    assert [m.config.ensemble.data_order_seed for m in members.make(config)[::6]] == [3, 4]


def _run_config(**more):
    return tiny.config(
        **{
            "strategy.name": "ewc",
            "data.num_experiences": 2,
            "epochs": 1,
            "optimizer.name": "sgd",
            "ensemble.seeds": (0, 1),
            "ensemble.sweep": "{'strategy.ewc_lambda': (10., 1000.)}",
            **more,
        }
    )


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    return train.run(_run_config(), str(tmp_path_factory.mktemp("ensemble")))


def test_an_ensemble_run_reports_every_member_and_compiles_once(whole_run):
    r = whole_run
    assert r["ensemble"]["size"] == 4 and r["ensemble"]["seeds"] == [0, 1]
    assert [(m["seed"], m["values"]["strategy.ewc_lambda"]) for m in r["members"]] == [
        (0, 10.0),
        (0, 1000.0),
        (1, 10.0),
        (1, 1000.0),
    ]
    for m in r["members"]:
        assert np.shape(m["accuracy_matrix"]) == (2, 2) and "avg_miou" in m and "bwt" in m
    mean = np.mean([m["accuracy_matrix"] for m in r["members"]], axis=0)
    np.testing.assert_allclose(r["accuracy_matrix"], mean)
    std = np.std([m["avg_miou"] for m in r["members"]])
    assert r["ensemble"]["std"]["avg_miou"] == pytest.approx(std) and std > 0
    points = r["ensemble"]["points"]
    assert [p["values"] for p in points] == [{"strategy.ewc_lambda": v} for v in (10.0, 1000.0)]
    assert all(p["seeds"] == [0, 1] for p in points)
    # One program for every member: nothing compiles again in the second phase.
    assert r["timing"]["compiles_per_phase"][1:] == [0], r["timing"]["compiles_per_phase"]


def test_a_stopped_ensemble_resumes_from_its_one_checkpoint(whole_run, tmp_path):
    config = _run_config()
    steps = iter(range(10**6))
    stop_mid_second_phase = train.Hooks(should_stop=lambda: next(steps) == 11)
    assert train.run(config, str(tmp_path), stop_mid_second_phase) == {}
    resumed = train.run(config, str(tmp_path))
    for a, b in zip(resumed["members"], whole_run["members"], strict=True):
        np.testing.assert_allclose(a["accuracy_matrix"], b["accuracy_matrix"], atol=1e-6)


def test_a_multilabel_ensemble_scores_each_member_as_its_separate_run():
    # The AP evaluator scores members one after another (its own code path, not the vmap).
    from tests.test_contract import _config as contract_config

    config = contract_config("multilabel")
    config.ensemble.seeds = (0, 1)
    e = ensemble.build(config)
    state = e.arrays["state"]
    phase = e.phases[0]
    ev = e.evaluator.after_phase(state.params, state.batch_stats, None, phase)
    for m, parts in enumerate(e.parts):
        mine = members.take(state, m)
        alone = parts.evaluator.after_phase(mine.params, mine.batch_stats, None, phase)
        for a, b in zip(ev.row, alone.row, strict=True):
            np.testing.assert_allclose(a[m], b, atol=1e-6)
        assert ev.overall[m] == pytest.approx(alone.overall, abs=1e-6)
    assert not np.allclose(ev.row[0][0], ev.row[0][1], equal_nan=True)  # members differ
