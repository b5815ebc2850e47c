"""Mixed precision (``config.precision``): what runs in bfloat16 and what stays float32."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clseg_jax import precision, setup
from configs import split_digits, voc_ci
from tests import tiny

# The operand and result types at the end of a convolution / dot_general line of StableHLO.
_OP = re.compile(r"stablehlo\.(convolution|dot_general)\b.*: \((tensor<[^>]*>), (tensor<[^>]*>)\)")


def _element(tensor: str) -> str:
    return tensor[len("tensor<") : -1].split("x")[-1]


def _config(task: str, policy: str, conv_impl: str = "auto"):
    if task == "segmentation":
        return tiny.config(precision=policy, **{"model.conv_impl": conv_impl})
    cfg = split_digits.get_config()
    cfg.data.classes_per_step, cfg.data.train_per_exp, cfg.data.test_per_exp = (5, 5), 24, 8
    cfg.model.kwargs.widths = (4, 8, 8, 8)
    cfg.precision = policy
    cfg.model.conv_impl = conv_impl
    return cfg


def _float_dtypes(tree) -> set:
    return {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_policy_puts_every_convolution_and_matmul_of_the_step_in_bf16(task):
    """The lowered train step (forward and backward): under ``bfloat16`` every convolution and
    dot_general takes bf16 operands, under ``float32`` none does; parameters, optimizer state,
    BatchNorm statistics and strategy state are float32 either way. (float32 with XLA's
    convolutions: on this CPU ``auto`` hands them to oneDNN custom calls, tests/test_onednn.py.)
    """
    ops = {}
    for policy in ("bfloat16", "float32"):
        parts = setup.build(
            _config(task, policy, conv_impl="xla" if policy == "float32" else "auto")
        )
        text = setup.lower_step(parts).as_text()
        ops[policy] = [(m[1], _element(m[2]), _element(m[3])) for m in _OP.finditer(text)]
        state = parts.arrays["state"]
        for tree in (state.params, state.opt_state, state.batch_stats, parts.arrays["sstate"]):
            assert _float_dtypes(tree) <= {jnp.dtype(jnp.float32)}, policy
    kinds = {op for op, _, _ in ops["bfloat16"]}
    assert kinds == {"convolution", "dot_general"}, kinds  # both kinds are checked
    assert len(ops["bfloat16"]) == len(ops["float32"]) > 10
    assert all(a == b == "bf16" for _, a, b in ops["bfloat16"]), ops["bfloat16"]
    assert not any("bf16" in (a, b) for _, a, b in ops["float32"]), ops["float32"]


def test_bf16_run_trains_like_float32_and_keeps_float32_state():
    """A 2-experience tiny run: the loss of each experience within 5% of float32's, and after
    real steps the BatchNorm statistics, optimizer state and parameters are still float32."""
    runs = {}
    for policy in ("float32", "bfloat16"):
        cfg = tiny.config(precision=policy, **{"data.num_experiences": 2})
        cfg.strategy.name = "ewc"
        runs[policy] = tiny.drive(setup.build(cfg), evaluate=False)
    for f32, bf16 in zip(runs["float32"].metrics, runs["bfloat16"].metrics, strict=True):
        assert bf16["loss"] == pytest.approx(f32["loss"], rel=0.05), (f32, bf16)
    state = runs["bfloat16"].state
    for tree in (state.params, state.opt_state, state.batch_stats, runs["bfloat16"].sstate):
        assert _float_dtypes(tree) <= {jnp.dtype(jnp.float32)}
    # The statistics moved: they are updated, in float32, from bf16 activations.
    before = setup.build(tiny.config(precision="bfloat16")).arrays["state"].batch_stats
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), state.batch_stats, before)
    assert max(jax.tree.leaves(moved)) > 1e-3


def test_policy_resolution_and_bad_input():
    assert precision.compute_dtype("auto", "cpu") == "float32"
    assert precision.compute_dtype("auto", "gpu") == precision.compute_dtype("auto", "tpu")
    assert precision.compute_dtype("auto", "tpu") == "bfloat16"
    assert precision.compute_dtype("float32", "tpu") == "float32"
    cfg = tiny.config()
    on_tpu = precision.model_config(cfg.model, "auto", backend="tpu")
    assert on_tpu.kwargs.dtype == "bfloat16" and cfg.model.kwargs.dtype is None  # a copy
    cfg.model.kwargs.dtype = "float16"
    with pytest.raises(ValueError, match="precision='bfloat16' means bfloat16 here but"):
        precision.model_config(cfg.model, "bfloat16")
    cfg.precision = "fp8"
    with pytest.raises(ValueError, match=r"unknown precision 'fp8'; valid: \['float32', 'bf"):
        setup.validate_names(cfg)
    # The accelerator recipes say auto (float32 on this CPU).
    assert voc_ci.get_config().precision == "auto"
    assert precision.describe(voc_ci.get_config()) == {"policy": "auto", "compute": "float32"}
