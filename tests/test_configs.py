"""Every config file loads, and every name in it resolves in its registry (scenic's lesson)."""

from __future__ import annotations

import glob
import importlib
import os

import pytest
from flax import nnx

from clseg_jax import config as config_lib
from clseg_jax import data, main, models, setup, strategies
from configs import voc_ci

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
        # Every argument of its model declared, so each takes a --config.model.kwargs.<k>=.
        assert set(cfg.model.kwargs) == set(models.kwargs_config(cfg.model.name)), arg
        for s in (cfg.strategy.name, *cfg.get("compare", ())):
            assert all(n in strategies.STRATEGIES for n in strategies.names(s))


def test_parse_arg_types_and_errors():
    a = config_lib.parse_arg(
        "strategy=joint,seed=3,compare", strategy="naive", seed=0, compare=False
    )
    assert (a.strategy, a.seed, a.compare) == ("joint", 3, True)
    with pytest.raises(ValueError, match="unknown config argument 'sede'"):
        config_lib.parse_arg("sede=1", seed=0)


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_declared_model_kwargs_build_the_model(name):
    """``kwargs_config`` declares what the constructor takes and nothing else: the model builds
    from it (shapes only), a None default stays None until set, and a typed one takes a value."""
    kwargs = models.kwargs_config(name)
    cfg = config_lib.base_config().model
    cfg.name, cfg.kwargs = name, kwargs
    nnx.eval_shape(lambda: models.make(cfg, 3, 0))
    assert kwargs.dtype is None and kwargs.get_type("dtype") is str
    kwargs.dtype = "bfloat16"
    nnx.eval_shape(lambda: models.make(cfg, 3, 0))


def test_model_kwargs_follow_the_model_and_take_command_line_values(monkeypatch):
    monkeypatch.chdir(ROOT)
    for model in ("unet", "deeplabv3_small", "bisenet_small", "resnet18"):
        cfg = voc_ci.get_config(f"tiny,model={model}")
        assert set(cfg.model.kwargs) == set(models.kwargs_config(model)), model
    assert voc_ci.get_config("recipe=small").model.kwargs.widths == (16, 32, 64)
    assert voc_ci.get_config("model=deeplabv3_r50").model.kwargs.output_stride == 16
    for spec, flags in [
        ("shapes_di.py", ["--config.model.kwargs.dtype=bfloat16"]),
        (
            "medmnist_ci.py",
            ["--config.model.kwargs.head=cosine", "--config.model.kwargs.widths=(8,16,32,64)"],
        ),
        ("voc_ci.py:model=deeplabv3_small", ["--config.model.kwargs.rates=(2,4,6)"]),
        ("voc_ci.py:model=bisenet_small", ["--config.model.kwargs.ffm_channels=64"]),
    ]:
        main.check_args(["main", f"--config=configs/{spec}", *flags])
    with pytest.raises(ValueError, match="expected int"):
        main.check_args(
            [
                "main",
                "--config=configs/voc_ci.py:model=bisenet_small",
                "--config.model.kwargs.ffm_channels=wide",
            ]
        )
    cfg = config_lib.base_config().model
    cfg.name = "resnet18"  # switched without its kwargs: unet's are mostly resnet's too
    cfg.kwargs.unknown = 1
    with pytest.raises(ValueError, match=r"model 'resnet18' takes no model.kwargs \['unknown'\]"):
        models.make(cfg, 3, 0)
    with pytest.raises(ValueError, match=r"model 'unet' takes no \['head'\]; its kwargs"):
        models.kwargs_config("unet", head="cosine")
