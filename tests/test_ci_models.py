"""DeepLab-v3 and BiSeNet (small variants) through the class-incremental trainer's pieces.

The VOC-layout tiny stream, two steps, each paper method whose loss reads more than the logits:
PLOP its pooled maps (``pod``), ILT the encoder features (``features``), MiB the logits of its
reinitialised head. Both phases run as ``train.run`` runs them (``setup.build``, the jitted step,
the strategy's hooks) and the step compiles once for the stream; old/new/all mIoU is reported on
the full test set. Then, on a batch of the second
phase, the method's own term must read the model's output: it is positive, and replacing that
output by the frozen model's changes it (to zero for ILT's feature distillation, to PLOP's
logits-map part alone for its pooled-output distillation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clseg_jax import losses, results, setup, sharding
from clseg_jax.strategies import base, snapshot
from configs import voc_ci
from tests import tiny


@pytest.mark.parametrize(
    "model,method,term,read,left",
    [
        # MiB's KD is a cross-entropy: the old model's own logits do not make it 0.
        ("deeplabv3_small", "mib", "mib_kd", "logits", None),
        # PLOP's last pooled map is the head's logits on ``penultimate``, which stays.
        ("bisenet_small", "plop", "plop_pod", "pod", 0.1),
        ("deeplabv3_small", "ilt", "ilt_de", "features", 0.0),
    ],
)
def test_method_reads_the_models_outputs(model, method, term, read, left):
    cfg = voc_ci.get_config(f"tiny,task=3-1,method={method},model={model},epochs=1")
    assert cfg.model.name == model
    parts = setup.build(cfg)
    evals = []

    def on_end(phase, state, sstate):
        evals.append(parts.evaluator.after_phase(state.params, state.batch_stats, sstate, phase))

    driven = tiny.drive(parts, evaluate=False, on_end=on_end)
    assert driven.compiles[0] > 0 and driven.compiles[1] == 0, driven.compiles
    assert driven.first_bad_step == [-1, -1]
    # What results.json reports for these models: old/new/all per step on the full test set.
    table = results.old_new_all(
        parts.phases, [e.row for e in evals], [e.full for e in evals], parts.task
    )
    assert table["old_new_all_on"] == "full test set" and len(table["old_new_all"]) == 2
    assert all(0.0 <= v <= 1.0 for v in table["old_new_all"][-1].values())

    state, sstate = driven.state, driven.sstate
    phase = parts.phases[1]
    local = next(iter(phase.batches(cfg.batch_size)))
    batch = sharding.global_batch(local, sharding.batch_sharding(parts.mesh))
    mask = jnp.asarray(phase.class_mask)

    @jax.jit  # one program, not hundreds of eager ops
    def terms(params, batch_stats, sstate, batch):
        outputs, _ = parts.forward(params, batch_stats, batch["image"], True)
        outputs = {**outputs, "logits": losses.mask_logits(outputs["logits"], mask)}
        task_loss = parts.task.loss(outputs["logits"], batch["label"], mask)
        snap = sstate if isinstance(sstate, snapshot.Snapshot) else sstate.snap
        old = snapshot.outputs(parts.forward, snap, batch["image"])

        def term_with(outs):
            inputs = base.LossInputs(params, batch_stats, batch, outs, task_loss, mask)
            return parts.strategy.loss(inputs, sstate, jax.random.key(0))[1][term]

        return term_with(outputs), term_with({**outputs, read: old[read]})

    own, replaced = (float(t) for t in terms(state.params, state.batch_stats, sstate, batch))
    assert np.isfinite(own) and own > 0, (method, own)
    if left is None:
        assert abs(own - replaced) > 1e-3 * own, (method, own, replaced)
    else:
        assert replaced <= left * own + 1e-6, (method, own, replaced)
