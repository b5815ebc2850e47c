"""Row ownership in chains: each row-appending strategy sees exactly its own rows.

Every ordered pair of the six row-appending strategies (replay, der, icarl, recall,
deepinversion, ccsi) is either refused by ``chain`` with one line naming why, or checked by value
at the ``prepare_batch`` / ``loss`` level: a lookup table stands in for the model (a pixel value
picks a feature row, a linear head gives the logits), so no step is compiled. Each member's
memory holds images of one pixel value (its tag), the experience's rows carry tags 1..B, and
spies record what each member receives.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clseg_jax import strategies, tasks
from clseg_jax.memory import buffer
from clseg_jax.strategies import base, snapshot
from tests import tiny

APPENDERS = ("replay", "der", "icarl", "recall", "deepinversion", "ccsi")
SEGMENTATION_ONLY, CLASSIFICATION_ONLY = {"recall"}, {"icarl", "ccsi"}
SIZE, B, C = 4, 5, 6


def _config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(strategies.default_hparams())
    cfg.update(
        replay_mem_size=8,
        replay_batch=3,
        der_mem_size=8,
        der_batch=2,
        icarl_mem_size=8,
        icarl_batch=2,
        recall_source="callable:clseg_jax.data.replay_sources:noise",
        recall_per_class=2,
        recall_replay_batch=3,
        di_mem_size=8,
        di_replay_batch=2,
        di_logit_mse=1.0,  # so that DeepInversion's loss reads its rows' logits
        ccsi_mem_size=8,
    )
    return cfg


def _lookup(dense: bool):
    """The stand-in model: pixel value -> feature row -> linear head (per pixel if dense)."""

    def forward(params, batch_stats, images, train):
        del train
        idx = images[..., 0].astype(jnp.int32)  # [B,H,W]
        feats = params["table"][idx if dense else idx[:, 0, 0]]  # [B,H,W,C] or [B,C]
        logits = feats @ params["head"]["kernel"] + params["head"]["bias"]
        return {"logits": logits, "features": feats, "penultimate": feats}, batch_stats

    return forward


def _params(k: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "table": jnp.asarray(rng.normal(size=(256, C)), jnp.float32),
        "head": {
            "kernel": jnp.asarray(rng.normal(size=(C, k)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(k,)), jnp.float32),
        },
    }


def _task_for(a: str, b: str) -> str | None:
    kinds = {"segmentation", "classification"}
    for name in (a, b):
        kinds -= {"classification"} if name in SEGMENTATION_ONLY else set()
        kinds -= {"segmentation"} if name in CLASSIFICATION_ONLY else set()
    return "segmentation" if "segmentation" in kinds else next(iter(kinds), None)


def _env(task: str) -> base.Env:
    dense = task == "segmentation"
    graphdef = tiny.tiny_unet()[0]  # DeepInversion's synthesis (never run here) needs one
    return base.Env(
        _lookup(dense),
        3 if dense else 4,
        3,
        image_shape=(SIZE, SIZE, 3),
        label_shape=(SIZE, SIZE) if dense else (),
        task=tasks.SEGMENTATION if dense else tasks.CLASSIFICATION,
        graphdef=graphdef,
    )


class _Spy:
    """Wraps a strategy; records the rows its prepare_batch and loss receive."""

    def __init__(self, strategy: base.Strategy):
        self.strategy, self.seen = strategy, {}

    def wrapped(self) -> base.Strategy:
        def prepare_batch(batch, st, key):
            self.seen["prepare_in"] = batch
            out = self.strategy.prepare_batch(batch, st, key)
            self.seen["prepare_out"] = out
            return out

        def loss(inputs, st, key):
            value, metrics = self.strategy.loss(inputs, st, key)
            self.seen["loss_in"], self.seen["loss_value"] = inputs, value
            return value, metrics

        return self.strategy._replace(prepare_batch=prepare_batch, loss=loss)


def _tags(images) -> list[int]:
    return np.asarray(images)[:, 0, 0, 0].astype(int).tolist()


def _fill(sstate, tag: int, other_params):
    """Every memory row holds an image of pixel value ``tag``; snapshots are active and hold
    ``other_params`` (so distillation terms are not zero)."""

    def fill(node):
        if isinstance(node, buffer.Buffer):
            return node._replace(
                image=jnp.full_like(node.image, tag),
                label=jnp.ones_like(node.label),  # class 1 (RECALL keeps a class id per row)
                exp=jnp.zeros_like(node.exp),
                valid=jnp.ones_like(node.valid),
            )
        if isinstance(node, snapshot.Snapshot):
            return node._replace(
                params=other_params,
                class_mask=jnp.ones_like(node.class_mask),
                active=jnp.ones_like(node.active),
            )
        return node

    is_node = lambda x: isinstance(x, buffer.Buffer | snapshot.Snapshot)
    return jax.tree.map(fill, sstate, is_leaf=is_node)


def _refusal(a: str, b: str) -> str | None:
    """Why chain refuses ``a+b`` (its one-line error), or None."""
    env, cfg = _env(_task_for(a, b)), _config()
    try:
        base.chain(*(strategies.STRATEGIES[n](cfg, env) for n in (a, b)), names=(a, b))
    except ValueError as e:
        return str(e)
    return None


PAIRS = [(a, b) for a, b in itertools.permutations(APPENDERS, 2) if _task_for(a, b) is not None]


@pytest.mark.parametrize("a,b", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_each_appender_sees_exactly_its_own_rows(a, b):
    task = _task_for(a, b)
    env = _env(task)
    cfg = _config()
    members = [strategies.STRATEGIES[n](cfg, env) for n in (a, b)]
    try:
        base.chain(*members, names=(a, b))
    except ValueError as e:
        message = str(e)
        assert "\n" not in message and message.startswith("chain: ")
        replacers = [n for n, s in zip((a, b), members, strict=True) if s.replaces_task_loss]
        assert replacers, f"{a}+{b} refused although neither replaces the task loss: {message}"
        assert all(n in message for n in (a, b)) or "at most one" in message, message
        return

    spies = [_Spy(s) for s in members]
    chained = base.chain(*(s.wrapped() for s in spies), names=(a, b))
    params, other = _params(env.num_classes, 0), _params(env.num_classes, 1)
    sstate = chained.init(params, {})
    tags = (100, 200)
    sstate = tuple(_fill(st, t, other) for st, t in zip(sstate, tags, strict=True))
    rng = np.random.default_rng(0)
    new_images = np.broadcast_to(
        np.arange(1, B + 1, dtype=np.uint8)[:, None, None, None], (B, SIZE, SIZE, 3)
    )
    new_labels = rng.integers(0, env.num_classes, (B, *env.label_shape)).astype(np.uint8)
    batch = {"image": jnp.asarray(new_images), "label": jnp.asarray(new_labels)}
    key = jax.random.key(0)
    out = chained.prepare_batch(batch, sstate, key)

    counts = [s.seen["prepare_out"]["image"].shape[0] - B for s in spies]
    assert all(n > 0 for n in counts)
    np.testing.assert_array_equal(out[base.OWNER], [0] * B + [1] * counts[0] + [2] * counts[1])
    assert _tags(out["image"]) == list(range(1, B + 1)) + [100] * counts[0] + [200] * counts[1]
    for s in spies:  # before appending, every member saw the experience's rows alone
        assert _tags(s.seen["prepare_in"]["image"]) == list(range(1, B + 1))

    mask = jnp.ones(env.num_classes, bool)
    outputs, _ = env.forward(params, {}, out["image"], True)
    task_loss = env.task.loss(outputs["logits"], out["label"], mask)
    inputs = base.LossInputs(params, {}, out, outputs, task_loss, mask)
    total, _ = chained.loss(inputs, sstate, jax.random.key(1))

    member_keys = jax.random.split(jax.random.key(1), 2)
    values = []
    for i, (spy, member, tag) in enumerate(zip(spies, members, tags, strict=True)):
        seen = spy.seen["loss_in"]
        assert _tags(seen.batch["image"]) == list(range(1, B + 1)) + [tag] * counts[i]
        # The same loss from scratch on a batch of the experience's rows and this member's:
        # the model's outputs on exactly these rows, the batch keys the member added itself.
        own = dict(seen.batch)
        alone_outputs, _ = env.forward(params, {}, own["image"], True)
        alone = base.LossInputs(params, {}, own, alone_outputs, task_loss, mask)
        value, _ = member.loss(alone, sstate[i], member_keys[i])
        np.testing.assert_allclose(float(spy.seen["loss_value"]), float(value), rtol=1e-6)
        values.append(float(value))
    np.testing.assert_allclose(float(total), sum(values), rtol=1e-6)


def test_refused_pairs_name_why():
    """The pairs chain refuses, each with one line naming both members."""
    refused = {f"{a}+{b}": _refusal(a, b) for a, b in PAIRS}
    refused = {k: v for k, v in refused.items() if v is not None}
    # A task-loss replacer that appends rows (DER, iCaRL, CCSI, DeepInversion's ABD) trains on
    # its own rows alone; another appender's rows count only through the task loss it replaces.
    assert "der+replay" in refused and "replay+der" in refused
    assert "replay+recall" not in refused and "deepinversion+replay" not in refused
    for message in refused.values():
        assert "\n" not in message and message.startswith("chain: ")
