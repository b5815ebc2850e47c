"""A lineage's machine-learning side, without HTTP or a database: spec -> train config, one
experience trained on top of the previous version's full CL state, its evaluation, its weights.

A lineage's stream is the datasets of its versions in order. Job ``v`` (making version ``v``,
numbered from 1) materialises ``exp0.npz .. exp{v-1}.npz`` in its work folder, restores the
version ``v-1`` checkpoint (weights, optimizer, strategy state: Fisher, importances, replay
buffer), and lets ``train.run`` train the one untrained phase and evaluate every experience's test
split: the new row of R. ``max_experiences`` is fixed at creation so that strategy state keeps its
shapes as the stream grows.

Checkpoints travel as uncompressed tars of one orbax step folder; they are unpacked only after
their sha256 was verified against the row that points at them, and with tarfile's ``data`` filter
(no absolute paths, links out of the folder or device files).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from clseg_jax import config as config_lib
from clseg_jax import models, precision, setup, strategies, tasks, train
from clseg_jax import step as step_lib
from clseg_jax.checkpoint import Checkpointer
from clseg_jax.data import npz
from clseg_jax.models import weights as weights_lib
from clseg_jax.serve import jobs
from clseg_jax.strategies import base

# What a lineage may set, with defaults: a recipe that learns each domain of a 64x64, 5-class
# shapes stream it has never seen to diag(R) >= 0.5 for naive and replay within two minutes a
# job on a 2-core CPU (experiments/serve_recipe.py, docs/service.md); a GPU deployment raises
# the sizes.
SPEC_DEFAULTS: dict[str, Any] = {
    "num_classes": 2,
    # One per class (a segmentation lineage's background first); [] = the data's or class_<k>.
    "class_names": [],
    "image_size": [64, 64],
    "kind": "domain",  # or "class": an experience's classes are those of its training labels
    "strategy": "naive",
    "strategy_params": {},
    # One of SEG_MODELS (a class per pixel) or CLS_MODELS (a class per image: the lineage
    # classifies, and its uploads hold [N] class ids).
    "model": "unet",
    "pretrained": "",  # the id of uploaded weights (POST /weights) the model starts from
    "model_widths": [16, 32, 64, 128],  # the UNet's levels or the ResNet's four stages
    "max_experiences": 16,
    "epochs": 10,
    "batch_size": 16,
    "optimizer": "adam",
    "lr": 1e-3,
    "checkpoint_every_steps": 20,
    "seed": 0,
    # float32 | bfloat16 | auto (bf16 convolutions on a GPU/TPU worker, float32 on a CPU one);
    # parameters, optimizer and strategy state stay float32 (clseg_jax/precision.py).
    "precision": "auto",
}
OPTIMIZERS = ("adam", "sgd")
# Segmentation models a lineage may train (clseg_jax.models.MODELS names); all but the UNet take
# images whose sides are multiples of 32 (their deepest stride).
SEG_MODELS = (
    "unet",
    "deeplabv3",
    "deeplabv3_r50",
    "deeplabv3_small",
    "bisenet",
    "bisenet_small",
)
# Classification models: ResNets (``model_widths`` are their four stages' widths); images under
# SMALL_INPUT pixels a side get the CIFAR-style stem (3x3 stride 1, no max pool), so that a 32x32
# image is not pooled down to 1x1 before the last stage.
CLS_MODELS = tuple(name for name in models.MODELS if name in models.IMAGE_MODELS)
SMALL_INPUT = 64
# A lineage's task and the label form its uploads must have (``npz.LABELS``).
LABEL_FORMS = {"segmentation": "masks", "classification": "classes"}
# Memory batches (rows replayed per step) are half the lineage's batch_size unless a lineage sets
# them: the library's 32 on top of a batch of 8 made replayed rows 80% of every step, and a
# whole batch more made a replay job 1.7x a naive one (124 s for the first version here).
MEMORY_BATCHES = ("replay_batch", "der_batch", "icarl_batch", "agem_sample_size", "di_replay_batch")
# A version whose new experience scores below the trivial predictor's score plus this margin is
# marked did_not_learn (its job still succeeds).
LEARN_MARGIN = 0.05


def task_of(spec: dict[str, Any]) -> str:
    """``"classification"`` for a ResNet lineage, else ``"segmentation"``."""
    return "classification" if spec.get("model", "unet") in CLS_MODELS else "segmentation"


def validate_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Fills defaults and checks what types alone cannot; one-line ``ValueError`` otherwise."""
    unknown = sorted(set(spec) - set(SPEC_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown lineage field {unknown[0]!r}; valid: {sorted(SPEC_DEFAULTS)}")
    out = {**SPEC_DEFAULTS, **spec}
    # The library's own check of the run's names (each of 'a+b' strategies, dataset, model).
    config = train_config({**out, "strategy_params": {}}, "")
    setup.validate_names(config)
    hparams = {k: v for k, v in config.strategy.items() if k != "name"}
    for key, value in out["strategy_params"].items():
        if key not in hparams:
            raise ValueError(f"unknown strategy parameter {key!r}; valid: {sorted(hparams)}")
        default = hparams[key]
        # What ml_collections would accept in place of the default (an int for a float).
        kinds = (int, float) if type(default) is float else (type(default),)
        if type(value) not in kinds:
            raise ValueError(
                f"strategy parameter {key!r} must be {type(default).__name__} "
                f"(default {default!r}), got {value!r}"
            )
    if not 2 <= out["num_classes"] <= 255:
        raise ValueError(f"num_classes must be in 2..255, got {out['num_classes']}")
    if out["model"] not in SEG_MODELS + CLS_MODELS:
        raise ValueError(
            f"unknown model {out['model']!r}; valid: {list(SEG_MODELS)} (segmentation) or "
            f"{list(CLS_MODELS)} (classification)"
        )
    classify = task_of(out) == "classification"
    names = out["class_names"]
    if names and len(names) != out["num_classes"]:
        which = "" if classify else " (background first)"
        raise ValueError(
            f"class_names must name all {out['num_classes']} classes{which} "
            f"or be empty, got {len(names)}"
        )
    if out["kind"] not in ("domain", "class"):
        raise ValueError(f"kind must be 'domain' or 'class', got {out['kind']!r}")
    widths = out["model_widths"]
    if not 2 <= len(widths) <= 5 or any(not 1 <= w <= 512 for w in widths):
        raise ValueError(f"model_widths must be 2..5 widths in 1..512, got {widths}")
    if classify and len(widths) != 4:
        raise ValueError(
            f"model_widths of a {out['model']} lineage are its 4 stages' widths, got {widths}"
        )
    h, w = out["image_size"]
    if classify:  # global average pooling: any size the stem can take
        if not (8 <= h <= 1024 and 8 <= w <= 1024):
            raise ValueError(f"image_size must be 8..1024 a side, got {[h, w]}")
    else:
        unet = out["model"] == "unet"
        stride = 2 ** (len(widths) - 1) if unet else 32
        why = "2**(len(model_widths)-1)" if unet else f"{out['model']}'s deepest stride"
        if not (stride <= h <= 1024 and stride <= w <= 1024) or h % stride or w % stride:
            raise ValueError(
                f"image_size must be multiples of {stride} ({why}) up to 1024, got {[h, w]}"
            )
    if out["pretrained"] and not re.fullmatch(r"[0-9a-f]{32}", out["pretrained"]):
        raise ValueError(
            f"pretrained must be the id of uploaded weights, got {out['pretrained']!r}"
        )
    for key, lo, hi in (
        ("max_experiences", 1, 256),
        ("epochs", 1, 1000),
        ("batch_size", 1, 1024),
        ("checkpoint_every_steps", 0, 10**6),
    ):
        if not lo <= out[key] <= hi:
            raise ValueError(f"{key} must be in {lo}..{hi}, got {out[key]}")
    if out["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {out['optimizer']!r}")
    if not 0 < out["lr"] <= 10:
        raise ValueError(f"lr must be in (0, 10], got {out['lr']}")
    precision.check(out["precision"])
    _check_strategy(out)  # last: it builds the model's graph, which needs the checks above
    return out


def check_dataset(spec: dict[str, Any], lineage_id: str, summary: dict[str, Any]) -> None:
    """A one-line ``ValueError`` unless an uploaded dataset (its ``uploads.summary``) fits the
    lineage: its label form (masks for segmentation, class ids for classification), image size
    and class ids."""
    task = task_of(spec)
    form = summary.get("labels", "masks")  # datasets uploaded before classification: masks
    if form != LABEL_FORMS[task]:
        raise ValueError(
            f"the dataset holds {npz.LABELS[form]} but lineage {lineage_id} is a {task} "
            f"lineage ({spec['model']}): its datasets hold {npz.LABELS[LABEL_FORMS[task]]}"
        )
    h, w = spec["image_size"]
    if [summary["height"], summary["width"]] != [h, w]:
        raise ValueError(
            f"dataset images are {summary['height']}x{summary['width']} but lineage "
            f"{lineage_id} takes {h}x{w}"
        )
    n = spec["num_classes"]
    # Datasets uploaded before max_label: their training classes only.
    top = summary.get("max_label", max(summary["classes"], default=-1))
    if top >= n:
        raise ValueError(
            f"dataset labels class {top} but lineage {lineage_id} has {n} classes (0..{n - 1})"
        )


def _abstract_model(config: ml_collections.ConfigDict, num_classes: int) -> nnx.Module:
    """The lineage's model with shapes only (``nnx.eval_shape``): nothing initialised or
    compiled, what the checks at creation need."""
    return nnx.eval_shape(lambda: models.make(config.model, num_classes, 0))


def _check_strategy(spec: dict[str, Any]) -> None:
    """Builds the lineage's strategy as a job will (its values checked by its own factory: an
    unknown policy, a stream it cannot train), without data or a model: the graph definition is
    abstract and the forward function is never called while building."""
    config = train_config(spec, "")
    h, w = spec["image_size"]
    n = spec["num_classes"]
    label_shape = () if task_of(spec) == "classification" else (h, w)

    def forward(*args, **kwargs):
        raise RuntimeError("a strategy called the model while being built")

    graphdef = nnx.graphdef(_abstract_model(config, n))
    env = base.Env(
        forward=forward,
        num_classes=n,
        num_experiences=spec["max_experiences"],
        image_shape=(h, w, 3),
        label_shape=label_shape,
        task=tasks.for_stream(spec["kind"], label_shape),
        graphdef=graphdef,
    )
    try:
        strategies.make(config.strategy, env)
    except (ValueError, TypeError, KeyError) as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"strategy {spec['strategy']!r} cannot train this lineage: {why}"
        ) from None


def train_config(
    spec: dict[str, Any], data_dir: str, pretrained: str = ""
) -> ml_collections.ConfigDict:
    """The ``train.run`` config of a lineage whose experiences lie in ``data_dir``;
    ``pretrained``: the local path of its uploaded weights, when it has them."""
    c = config_lib.base_config()
    c.seed = spec["seed"]
    c.data.name = "npz"
    c.data.path = data_dir
    c.data.num_classes = spec["num_classes"]
    c.data.kind = spec["kind"]
    name = spec.get("model", "unet")
    c.model.name = name
    if name == "unet":
        c.model.kwargs.widths = tuple(spec["model_widths"])
    elif name in CLS_MODELS:
        small = min(spec["image_size"]) < SMALL_INPUT
        c.model.kwargs = models.kwargs_config(
            name, widths=tuple(spec["model_widths"]), small_input=small
        )
    else:
        c.model.kwargs = models.kwargs_config(name)
    # A whole model of the same layout: its head is the lineage's own (another class count).
    c.model.pretrained.path = pretrained
    c.strategy.name = spec["strategy"]
    for key in MEMORY_BATCHES:
        c.strategy[key] = max(1, spec["batch_size"] // 2)
    c.strategy.update(spec["strategy_params"])
    c.optimizer.name = spec.get("optimizer", "sgd")  # lineages made before the field: SGD
    c.optimizer.lr = spec["lr"]
    c.batch_size = spec["batch_size"]
    c.eval_batch_size = max(spec["batch_size"], 16)
    c.epochs = spec["epochs"]
    c.max_experiences = spec["max_experiences"]
    c.checkpoint_every_steps = spec["checkpoint_every_steps"]
    c.log_every_steps = max(1, min(20, spec["checkpoint_every_steps"] or 20))
    c.precision = spec.get("precision", "float32")  # lineages made before the field
    c.progress = False
    c.log.tensorboard = False
    c.compilation_cache_dir = ""
    return c


def stage_stream(data_dir: str, files: Sequence[str]) -> None:
    """Makes ``data_dir`` hold exactly ``exp0.npz ..`` for ``files`` (hard links when possible)."""
    shutil.rmtree(data_dir, ignore_errors=True)
    os.makedirs(data_dir)
    for k, f in enumerate(files):
        dst = os.path.join(data_dir, f"exp{k}.npz")
        try:
            os.link(f, dst)
        except OSError:
            shutil.copyfile(f, dst)


def pack(directory: str, out_path: str) -> None:
    """Tars ``directory`` (an orbax step folder) as ``<basename>/...``."""
    with tarfile.open(out_path, "w") as tar:
        tar.add(directory, arcname=os.path.basename(directory))


def unpack_checkpoint(tar_path: str, workdir: str) -> None:
    """Unpacks a packed step folder as the only checkpoint under ``workdir/checkpoints``."""
    dest = os.path.join(workdir, "checkpoints")
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    with tarfile.open(tar_path, "r") as tar:
        tar.extractall(dest, filter="data")


def run_experience(
    spec: dict[str, Any],
    data_dir: str,
    workdir: str,
    hooks: train.Hooks | None = None,
    pretrained: str = "",
) -> dict:
    """Trains the stream's untrained phases (normally the last one); ``{}`` if stopped."""
    config = train_config(spec, data_dir, pretrained)
    return train.run(config, workdir, hooks or train.Hooks())


def check_pretrained(spec: dict[str, Any], path: str) -> None:
    """A one-line ``ValueError`` unless the weights file at ``path`` fits the lineage's model
    (every key and shape but the head's), checked against an abstract model: nothing is
    initialised or compiled."""
    abstract = _abstract_model(train_config(spec, ""), spec["num_classes"])
    _, params, stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)

    def template(state) -> dict:
        """The abstract pure dict, its head concrete (``load`` keeps the template's head)."""
        tree = state.to_pure_dict()
        if weights_lib.HEAD in tree:
            head = tree[weights_lib.HEAD]
            tree[weights_lib.HEAD] = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), head)
        return tree

    try:
        weights_lib.load(path, template(params), template(stats), skip_head=True)
    except (ValueError, KeyError, OSError) as err:
        raise ValueError(
            f"these weights do not fit model {spec['model']!r}: {str(err).splitlines()[0]}"
        ) from None


def trivial_score(arrays: dict[str, np.ndarray], num_classes: int) -> float:
    """R's score of predicting, on ``arrays``' test split, the class most frequent in its
    training labels, everywhere (masks: mIoU over the classes present) or for every image
    (``[N]`` class ids: accuracy): what a model that learnt nothing but the majority class
    (normally the background) gets. Labels >= ``num_classes`` (255: ignore) are left out, as
    evaluation leaves them out."""
    y_train = np.asarray(arrays["y_train"])
    task = tasks.for_stream("domain", y_train.shape[1:])
    train = np.bincount(y_train.ravel(), minlength=num_classes)
    test = np.bincount(np.asarray(arrays["y_test"]).ravel(), minlength=num_classes)
    conf = np.zeros((num_classes, num_classes), np.int64)
    conf[:, int(np.argmax(train[:num_classes]))] = test[:num_classes]
    return task.score(conf, ())


def learning_verdict(results: dict, new_file: str, num_classes: int) -> dict:
    """Whether the version learnt its new experience: its diag(R) against ``trivial_score``."""
    k = len(results["stream"]["experiences"]) - 1
    new = float(results["accuracy_matrix"][k][k])
    with np.load(new_file) as arrays:
        trivial = trivial_score(arrays, num_classes)
    return {
        "new_score": new,
        "trivial_score": trivial,
        "margin": LEARN_MARGIN,
        "did_not_learn": not new >= trivial + LEARN_MARGIN,  # NaN did not learn either
    }


def version_metrics(
    results: dict, learning: dict | None = None, class_names: Sequence[str] = ()
) -> dict:
    """What the API serves for a version: R (NaN -> None), CL summary, per-class scores, and
    ``learning`` (``learning_verdict``); ``class_names`` (the lineage's) replace the data's."""

    def clean(x):
        if isinstance(x, float) and not np.isfinite(x):
            return None
        if isinstance(x, list):
            return [clean(v) for v in x]
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        return x

    keys = ("metric", "accuracy_matrix", "avg_miou", "forgetting", "bwt", "avg_incremental")
    return clean(
        {
            **{k: results[k] for k in keys},
            "per_class": results["per_class"],
            "class_names": list(class_names) or results["stream"]["class_names"],
            "learning": learning,
        }
    )


def export_weights(workdir: str, out_path: str) -> None:
    """Writes the latest checkpoint's params and BatchNorm statistics as a weights ``.npz``."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        arrays, _ = ckpt.read()
    finally:
        ckpt.close()
    state = arrays["state"]
    if isinstance(state, dict):
        params, stats = state["params"], state["batch_stats"]
    else:
        params, stats = state[:2]
    weights_lib.save(out_path, params, stats)


class Predictor:
    """Predicts with one version's weights; compiled once per lineage image size.

    The model is the one ``train_config`` trains (``setup.init_model``, the same input norm).
    A segmentation lineage's predictor ``segment``s, a classification lineage's ``classify``s
    (``task``)."""

    def __init__(self, spec: dict[str, Any], weights_path: str):
        model = train_config(spec, "").model
        graphdef, params, stats = setup.init_model(model, spec["num_classes"], seed=0)
        params, stats = weights_lib.load(weights_path, params, stats)
        self.size = tuple(spec["image_size"])
        self.task = task_of(spec)
        n = spec["num_classes"]
        self.names = list(spec["class_names"]) or [f"class_{c}" for c in range(n)]
        forward = step_lib.make_forward(graphdef, model.get("input_norm", "symmetric"))

        @jax.jit
        def predict(image):  # [1,H,W,3] uint8 -> [1,H,W] class ids or [1,K] probabilities
            logits = forward(params, stats, image, False)[0]["logits"]
            return jnp.argmax(logits, -1) if logits.ndim == 4 else jax.nn.softmax(logits, -1)

        self._predict = predict

    def _input(self, image_bytes: bytes, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
        """``([1,H,W,3] uint8 at the lineage's size, the image's own (W, H))``."""
        image = _open_image(image_bytes, max_pixels)
        x = np.asarray(image.resize(self.size[::-1], Image.BILINEAR), np.uint8)[None]
        return x, image.size

    def segment(self, image_bytes: bytes, max_pixels: int) -> bytes:
        """PNG/JPEG bytes -> mask PNG bytes (mode L, class ids) at the input's size."""
        x, size = self._input(image_bytes, max_pixels)
        mask = np.asarray(self._predict(x))[0].astype(np.uint8)
        out = Image.fromarray(mask, "L").resize(size, Image.NEAREST)
        buf = io.BytesIO()
        out.save(buf, "PNG")
        return buf.getvalue()

    def classify(self, image_bytes: bytes, max_pixels: int) -> dict[str, Any]:
        """PNG/JPEG bytes -> ``{"class": id, "name": its name, "probabilities": [K] softmax,
        "class_names": [K]}``."""
        x, _ = self._input(image_bytes, max_pixels)
        probs = np.asarray(self._predict(x), np.float64)[0]
        best = int(np.argmax(probs))
        return {
            "class": best,
            "name": self.names[best],
            "probabilities": [round(float(p), 6) for p in probs],
            "class_names": self.names,
        }


def _open_image(data: bytes, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ("PNG", "JPEG"):
            raise ValueError(f"image must be PNG or JPEG, got {image.format}")
        w, h = image.size
        if w * h > max_pixels:
            raise ValueError(f"image is {w}x{h}, over the limit of {max_pixels} pixels")
        return image.convert("RGB")
    except Image.UnidentifiedImageError:
        raise ValueError("image cannot be decoded: it is not a PNG or JPEG file") from None
    except (OSError, Image.DecompressionBombError) as err:
        why = jobs.plain(str(err).strip().splitlines()[0] if str(err).strip() else "")
        raise ValueError(f"image cannot be decoded ({why or type(err).__name__})") from None
