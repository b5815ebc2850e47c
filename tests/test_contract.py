"""One contract, every registered strategy (optax's shared-test pattern).

For each entry of STRATEGIES, on a tiny model and stream, driven through the hooks for three
experiences: the step compiles, the strategy state keeps its tree, shapes and dtypes, nothing
recompiles after the first experience (counted with JAX's own compile events), the state survives
an orbax round-trip and the loss stays finite.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from clseg_jax import checkpoint, data, ensemble, members, setup, strategies
from clseg_jax.data import phases as phases_lib
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
            cache[task] = cfg, data.make(cfg.data)
        return cache[task]

    return get


@pytest.mark.parametrize("name", sorted(strategies.STRATEGIES))
def test_strategy_contract(name, setups, tmp_path):
    _contract(name, setups, tmp_path, "float32")


# One strategy per kind of hook: a penalty with between-phase state (ewc), a per-step state
# update (si), a gradient transform (agem), appended rows (replay), a task-loss replacer with a
# head init (mib). Their state must stay float32 (its signature is checked) under bf16 compute.
@pytest.mark.parametrize("name", ["ewc", "si", "agem", "replay", "mib"])
def test_strategy_contract_under_bf16(name, setups, tmp_path):
    _contract(name, setups, tmp_path, "bfloat16")


def _contract(name, setups, tmp_path, policy: str) -> None:
    cfg, stream = setups(TASK_OF.get(name, "segmentation"))
    cfg = cfg.copy_and_resolve_references()
    cfg.strategy.name = name
    cfg.precision = policy
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
    cfg.batch_size, cfg.epochs = 8, 1
    parts = setup.build(cfg, stream=stream)
    if policy == "float32":
        # What docs/ensembles.md says cannot be swept is what tracing finds.
        owned = set(members.float_fields(cfg)) & set(members.UNSWEEPABLE)
        assert set(ensemble.untraceable(parts)) == owned, name
    sig = tiny.signature(parts.arrays["sstate"])
    # Drive three experiences one by one whatever the strategy's own schedule.
    driven = tiny.drive(parts, phases_lib.make(stream, ((0,), (1,), (2,))), evaluate=False)
    state, sstate = driven.state, driven.sstate
    assert tiny.signature(sstate) == sig, f"{name}: strategy state changed tree/shape/dtype"
    floats = {x.dtype for x in jax.tree.leaves((state, sstate)) if x.dtype.kind == "f"}
    assert floats <= {np.dtype(np.float32)}, f"{name} under {policy}: {floats}"
    assert all(np.isfinite(m["loss"]) for m in driven.metrics), f"{name}: non-finite loss"
    assert driven.first_bad_step == [-1, -1, -1]
    compiles = driven.compiles
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
