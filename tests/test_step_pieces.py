"""step.py's pieces: the per-phase learning-rate schedule against optax's own schedules, and
the forward's input normalisations."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax
import pytest

from clseg_jax import step as step_lib

PARAMS = {"w": jnp.arange(4.0), "b": jnp.ones(2)}
GRADS = {"w": jnp.array([0.1, -0.2, 0.3, 0.5]), "b": jnp.array([1.0, -1.0])}
SCHEDULES = {
    "constant": lambda lr, t: lr,
    "cosine": optax.cosine_decay_schedule,
    "poly": lambda lr, t: optax.polynomial_schedule(lr, 0.0, 0.9, t),
}
REFERENCES = {
    "sgd": (
        {"momentum": 0.9, "weight_decay": 1e-4},
        lambda lr: optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(lr, momentum=0.9)),
    ),
    "nesterov": (
        {"momentum": 0.9, "nesterov": True},
        lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
    ),
    "adam": ({"weight_decay": 0.0}, optax.adam),
    "adamw": ({"weight_decay": 0.01}, lambda lr: optax.adamw(lr, weight_decay=0.01)),
}


def _run(tx, state, steps, params=PARAMS):
    for _ in range(steps):
        updates, state = tx.update(GRADS, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_matches_optax(name, schedule):
    kwargs, ref = REFERENCES[name]
    opt = "sgd" if name == "nesterov" else name
    cfg = ml_collections.ConfigDict({"name": opt, "lr": 0.1, "schedule": schedule, **kwargs})
    ours = step_lib.make_optimizer(cfg, 10)
    theirs = ref(SCHEDULES[schedule](0.1, 10))
    a, _ = _run(ours, ours.init(PARAMS), 12)  # past the horizon: the schedule stays at its end
    b, _ = _run(theirs, theirs.init(PARAMS), 12)
    for k in PARAMS:
        assert jnp.allclose(a[k], b[k], atol=1e-6), k


def test_start_phase_restarts_the_schedule_with_the_phase_rate():
    cfg = ml_collections.ConfigDict(
        {"name": "sgd", "lr": 0.01, "lr_next": 0.001, "schedule": "poly", "momentum": 0.0}
    )
    tx = step_lib.make_optimizer(cfg, 100)
    _, state = _run(tx, tx.init(PARAMS), 3)
    state = step_lib.start_phase(state, total=5, lr=step_lib.phase_lr(cfg, 1))
    after, _ = _run(tx, state, 5)
    theirs = optax.sgd(optax.polynomial_schedule(0.001, 0.0, 0.9, 5))
    ref, _ = _run(theirs, theirs.init(PARAMS), 5)
    for k in PARAMS:
        assert jnp.allclose(after[k], ref[k], atol=1e-7), k
    assert step_lib.phase_lr(cfg, 0) == 0.01


def test_unknown_schedule_is_one_line_error():
    cfg = ml_collections.ConfigDict({"name": "sgd", "lr": 0.1, "schedule": "step"})
    with pytest.raises(ValueError, match="unknown lr schedule 'step'; valid"):
        step_lib.make_optimizer(cfg, 10)


def test_forward_input_normalisations():
    from flax import nnx

    class Identity(nnx.Module):
        def __call__(self, x, train=False):
            return {"logits": x}

    graphdef, params, stats = nnx.split(Identity(), nnx.Param, nnx.BatchStat)
    images = jnp.array([[[[0, 128, 255]]]], jnp.uint8)
    sym, _ = step_lib.make_forward(graphdef)(params, stats, images, False)
    assert jnp.allclose(sym["logits"], jnp.array([-1.0, 128 / 127.5 - 1, 1.0]), atol=1e-6)
    imnet, _ = step_lib.make_forward(graphdef, "imagenet")(params, stats, images, False)
    expected = (jnp.array([0, 128, 255]) / 255.0 - jnp.array(step_lib.IMAGENET_MEAN)) / jnp.array(
        step_lib.IMAGENET_STD
    )
    assert jnp.allclose(imnet["logits"][0, 0, 0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="unknown input_norm 'caffe'"):
        step_lib.make_forward(graphdef, "caffe")
