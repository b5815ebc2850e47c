"""Every config file loads, and every name in it resolves in its registry (scenic's lesson)."""

from __future__ import annotations

import glob
import importlib
import os

import pytest

from clseg_jax import config as config_lib
from clseg_jax import data, models, setup, strategies

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not os.path.basename(p).startswith("_")
)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_names_resolve(name):
    module = importlib.import_module(f"configs.{name}")
    assert module.__doc__ and "python -m clseg_jax.main" in module.__doc__, "docstring: command"
    args = getattr(module, "EXAMPLE_ARGS", (None,))
    for arg in args:
        cfg = module.get_config(arg)
        setup.validate_names(cfg)
        assert cfg.data.name in data.DATASETS
        assert cfg.model.name in models.MODELS
        for s in (cfg.strategy.name, *cfg.get("compare", ())):
            assert all(n in strategies.STRATEGIES for n in strategies.names(s))


def test_parse_arg_types_and_errors():
    a = config_lib.parse_arg(
        "strategy=joint,seed=3,compare", strategy="naive", seed=0, compare=False
    )
    assert (a.strategy, a.seed, a.compare) == ("joint", 3, True)
    with pytest.raises(ValueError, match="unknown config argument 'sede'"):
        config_lib.parse_arg("sede=1", seed=0)
