"""Loading a classifier's weight file into one sub-tree of a larger model (``into``)."""

from __future__ import annotations

import numpy as np
import pytest

from clseg_jax.models import weights


def _tree(seed: int):
    r = np.random.default_rng(seed)
    backbone = {"stem": {"kernel": r.normal(size=(3, 3, 3, 4)).astype(np.float32)}}
    params = {
        "backbone": backbone,
        "aspp": {"kernel": r.normal(size=(1, 1, 4, 2)).astype(np.float32)},
        "head": {"kernel": r.normal(size=(1, 1, 2, 5)).astype(np.float32)},
    }
    stats = {"backbone": {"bn": {"mean": r.normal(size=(4,)).astype(np.float32)}}}
    return params, stats


def test_into_loads_the_backbone_and_keeps_the_rest(tmp_path):
    template_params, template_stats = _tree(0)
    r = np.random.default_rng(1)
    file_params = {
        "stem": {"kernel": r.normal(size=(3, 3, 3, 4)).astype(np.float32)},
        "head": {"kernel": r.normal(size=(4, 1000)).astype(np.float32)},  # ImageNet fc: ignored
    }
    file_stats = {"bn": {"mean": r.normal(size=(4,)).astype(np.float32)}}
    path = tmp_path / "resnet.npz"
    weights.save(path, file_params, file_stats)
    params, stats = weights.load(path, template_params, template_stats, into="backbone")
    np.testing.assert_array_equal(
        params["backbone"]["stem"]["kernel"], file_params["stem"]["kernel"]
    )
    np.testing.assert_array_equal(stats["backbone"]["bn"]["mean"], file_stats["bn"]["mean"])
    np.testing.assert_array_equal(params["aspp"]["kernel"], template_params["aspp"]["kernel"])
    np.testing.assert_array_equal(params["head"]["kernel"], template_params["head"]["kernel"])


def test_into_reports_a_missing_backbone_key(tmp_path):
    template_params, template_stats = _tree(0)
    path = tmp_path / "partial.npz"
    weights.save(path, {}, {"bn": {"mean": np.zeros(4, np.float32)}})
    with pytest.raises(ValueError, match=r"missing key 'params/backbone/stem/kernel'"):
        weights.load(path, template_params, template_stats, into="backbone")


def test_missing_file_is_one_line_error(tmp_path):
    params, stats = _tree(0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weights.load(tmp_path / "nope.npz", params, stats)
