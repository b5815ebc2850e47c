"""One contract, every registered strategy (optax's shared-test pattern).

For each entry of STRATEGIES, on a tiny model and stream, driven through the hooks for three
experiences: the step compiles, the strategy state keeps its tree, shapes and dtypes, nothing
recompiles after the first experience (counted with JAX's own compile events), the state survives
an orbax round-trip and the loss stays finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clseg_jax import checkpoint, data, models, sharding, strategies, tasks
from clseg_jax import step as step_lib
from clseg_jax import train as train_lib
from clseg_jax.data import loader
from clseg_jax.strategies import base
from configs import multilabel_digits, split_digits
from tests import tiny

# Strategies defined for one kind of task only run their contract on a stream of that kind.
TASK_OF = {"ppi": "multilabel", "icarl": "classification", "ccsi": "classification"}


def _config(task: str):
    if task == "segmentation":
        cfg = tiny.config()
        cfg.data.num_experiences = 3
        return cfg
    cfg = (multilabel_digits if task == "multilabel" else split_digits).get_config()
    cfg.data.classes_per_step = (4, 3, 3)
    cfg.data.train_per_exp = 24
    cfg.data.test_per_exp = 8
    cfg.model.kwargs.widths = (4, 8, 8, 8)
    return cfg


@pytest.fixture(scope="module")
def setups():
    cache = {}

    def get(task):
        if task not in cache:
            cfg = _config(task)
            stream = data.make(cfg.data)
            graphdef, params, stats = models.init(cfg.model, stream.num_classes, seed=0)
            cache[task] = cfg, stream, graphdef, params, stats
        return cache[task]

    return get


@pytest.mark.parametrize("name", sorted(strategies.STRATEGIES))
def test_strategy_contract(name, setups, tmp_path):
    cfg, stream, graphdef, params, stats = setups(TASK_OF.get(name, "segmentation"))
    cfg = cfg.copy_and_resolve_references()
    cfg.strategy.name = name
    if name == "recall":  # replay images must come from somewhere: noise stands in for the web
        cfg.strategy.recall_source = "callable:clseg_jax.data.replay_sources:noise"
        cfg.strategy.recall_per_class = 8
    if name == "ccsi":  # noise stands in for class impressions: the contract is about shapes
        cfg.strategy.ccsi_synthesize = "callable:clseg_jax.strategies.ccsi:noise_synthesize"
        cfg.strategy.ccsi_mem_size = 16
    if name == "deepinversion":  # a few inversion steps: the contract is about shapes
        cfg.strategy.di_iterations = 3
        cfg.strategy.di_mem_size = 16
        cfg.strategy.di_replay_batch = 4
    forward = step_lib.make_forward(graphdef)
    example = stream.experiences[0].train[0]
    env = base.Env(
        forward,
        stream.num_classes,
        len(stream.experiences),
        image_shape=example["image"].shape,
        label_shape=example["label"].shape,
        task=tasks.for_stream(stream.kind, example["label"].shape),
        graphdef=graphdef,
    )
    strategy = strategies.make(cfg.strategy, env)
    tx = step_lib.make_optimizer(cfg.optimizer, 4)
    mesh = sharding.make_mesh((("data", -1),))
    params, stats = jax.tree.map(jnp.copy, (params, stats))  # the step donates its inputs
    state = step_lib.TrainState(params, stats, tx.init(params), jnp.array(0, jnp.int32))
    arrays = {"state": state, "sstate": strategy.init(params, stats)}
    shardings = train_lib.array_shardings(arrays, mesh)
    arrays = jax.device_put(arrays, shardings)
    state, sstate = arrays["state"], arrays["sstate"]
    sig = tiny.signature(sstate)
    # The trainer's jit, not its AOT executable: a changed shape, sharding or captured constant
    # would recompile here, and show in the count.
    step = train_lib.jit_train_step(
        step_lib.make_train_step(forward, strategy, tx, env.task), shardings, mesh
    )
    repl = sharding.replicated(mesh)
    # Drive three experiences one by one whatever the strategy's own schedule.
    phases = train_lib._phases(stream, tuple((i,) for i in range(3)))
    key = jax.device_put(jax.random.PRNGKey(0), repl)
    compiles = []
    for phase in phases:
        with tiny.CompileCounter() as counter:
            new_params, sstate = strategy.before_phase(
                state.params, state.batch_stats, sstate, phase
            )
            state, sstate = jax.device_put(
                (state._replace(params=new_params), sstate),
                (shardings["state"], shardings["sstate"]),
            )
            metrics, monitor = step_lib.TrainMetrics.empty(), step_lib.new_monitor()
            ds = loader.train_dataset(
                stream.experiences[phase.index].train,
                phase.class_mask,
                global_batch=8,
                epochs=1,
                seed=phase.index,
            )
            mask = jax.device_put(jnp.asarray(phase.class_mask), repl)
            for local in ds:
                batch = sharding.global_batch(local, sharding.batch_sharding(mesh))
                state, sstate, metrics, monitor = step(
                    state, sstate, metrics, monitor, batch, key, mask
                )
            sstate = strategy.after_phase(state.params, state.batch_stats, sstate, phase)
            jax.block_until_ready((state, sstate))
        compiles.append(counter.count)
        assert tiny.signature(sstate) == sig, f"{name}: strategy state changed tree/shape/dtype"
        values = metrics.compute()
        assert np.isfinite(float(values["loss"])), f"{name}: non-finite loss"
        assert int(monitor.first_bad_step) == -1
    assert compiles[0] > 0
    assert compiles[1] == 0 and compiles[2] == 0, f"{name} recompiled: {compiles}"

    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    arrays = {"state": state, "sstate": sstate}
    ckpt.save(arrays, {"phase": 3})
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), arrays
    )
    restored, meta = ckpt.restore(abstract)
    ckpt.close()
    assert meta == {"phase": 3}
    for a, b in zip(jax.tree.leaves(arrays), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert tiny.signature(restored["sstate"]) == sig
