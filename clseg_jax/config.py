"""The fields every run has (``base_config``) and ``parse_arg`` for ``file.py:k=v,k2=v2`` families.

In the package, not in ``configs/``, so that every caller (config files, the service, tests)
builds runs from one definition.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from clseg_jax import distributed, members, models, strategies


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses ``"strategy=naive,seed=1"`` into a ConfigDict, typed like the defaults.

    A bare word ``"compare"`` sets ``compare=True`` when ``compare`` is a bool default.
    """
    out = ml_collections.ConfigDict(defaults)
    for part in filter(None, (arg or "").split(",")):
        key, sep, value = part.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; valid: {sorted(defaults)}")
        if not sep:
            if not isinstance(defaults[key], bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(defaults[key], bool):
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = type(defaults[key])(value)
    return out


def base_config() -> ml_collections.ConfigDict:
    """Fields every run has; each config file fills in data, model and strategy."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # workers: grain worker processes reading and augmenting training batches (0: the main
    # process); device_prefetch: batches put on the devices ahead of the step (2: double
    # buffering; 0: off). clseg_jax/data/feed.py.
    c.data = ml_collections.ConfigDict(
        {"name": "shapes_di", "seed": 0, "workers": 0, "device_prefetch": 2}
    )
    c.model = ml_collections.ConfigDict(
        {
            "name": "unet",
            # Every argument of the model, declared (models.kwargs_config) so each is
            # overridable from the command line; a config that switches model.name switches
            # this with it.
            "kwargs": models.kwargs_config("unet"),
            # "symmetric": uint8 -> [-1, 1]; "imagenet": torchvision's mean/std (converted
            # ImageNet backbones).
            "input_norm": "symmetric",
            # Weights to start from (models/weights.py): a .npz path ("" = none), the sub-tree
            # it goes into ("backbone" for an ImageNet classifier) and whether the head is
            # skipped (another class count). Declared so --config.model.pretrained.path=... works.
            "pretrained": {"path": "", "into": "", "skip_head": True},
            # "auto" | "xla" | "onednn": who computes the convolutions; auto = the oneDNN
            # kernel on a one-device CPU run in float32 where it is built, else XLA
            # (clseg_jax/kernels/select.py).
            "conv_impl": "auto",
        }
    )
    # "float32" | "bfloat16" | "auto" (bf16 on GPU/TPU): the dtype convolutions and matmuls run
    # in; parameters, optimizer and strategy state stay float32 (clseg_jax/precision.py).
    c.precision = "float32"
    c.strategy = ml_collections.ConfigDict({"name": "naive", **strategies.default_hparams()})
    c.optimizer = ml_collections.ConfigDict(
        {
            "name": "sgd",
            "lr": 0.01,
            "momentum": 0.9,
            "weight_decay": 0.0,
            "schedule": "constant",
            # Base rate of the phases after the first (MiB, PLOP: 0.001 after 0.01); unset =
            # lr. A typed placeholder so that --config.optimizer.lr_next=... works.
            "lr_next": config_dict.placeholder(float),
            # Fresh optimizer state (momentum, Adam moments) per experience; the Avalanche
            # baseline matches it with reset_optimizer_state=True (its 0.6 default keeps state).
            "reset_per_phase": True,
        }
    )
    c.batch_size = 32
    c.eval_batch_size = 64
    # Classification streams: also score each test set with predictions limited to its own
    # experience's classes (task-incremental), next to the class-incremental matrix.
    c.eval_task_il = False
    # Task-incremental training: the task id is known, so each phase predicts only its own
    # experience's classes (per-task heads by masking); implies eval_task_il.
    c.task_incremental = False
    c.epochs = 2
    # Fixed upper bound on the stream length (0: the stream's own length). A stream that grows
    # between runs on one workdir (the service's lineages) sets it, so strategy state keeps its
    # shapes.
    c.max_experiences = 0
    # scale=(lo, hi): random rescale before the crop (the segmentation papers' 0.5-2.0).
    c.augment = ml_collections.ConfigDict({"crop": 0, "flip": False, "scale": ()})
    c.sharding = ml_collections.ConfigDict({"mesh": (("data", -1),), "param_rules": ()})
    # Several processes (TPU VM workers, SLURM, hand launches): clseg_jax/distributed.py.
    c.distributed = distributed.fields()
    # N members (seeds x a hyperparameter grid) trained as one compiled program:
    # clseg_jax/members.py, docs/ensembles.md.
    c.ensemble = members.fields()
    c.log_every_steps = 20
    c.checkpoint_every_steps = 0  # 0: only at the end of each experience
    c.progress = True
    c.log = ml_collections.ConfigDict(
        {"tensorboard": True, "wandb": False, "wandb_mode": "offline"}
    )
    # Strategies run one after another into <workdir>/<name>/ with a comparison table.
    c.compare = ()
    # Fault injection for the resume tests: SIGKILL at a global step; a delay before each
    # checkpoint's metadata is written, so that a save is in flight when the kill comes.
    c.debug = ml_collections.ConfigDict({"kill_at_step": -1, "save_delay_s": 0.0})
    # XLA executables persist here across runs (the CLI sets it; "" disables): a rerun, a resume
    # or another strategy's run of the same model skips most compilation.
    c.compilation_cache_dir = "~/.cache/clseg_jax/xla"
    return c
