"""W2 (BENCHMARKS.md) in Avalanche 0.6: the W1 UNet over the exported shapes stream, per strategy.

Same pixels (``export.py``'s ``stream.npz``), same initial weights (``init.npz``, loaded by
``torch_unet.load_flax_init``), same recipe as ``configs/w2.py``: batch 32, SGD lr 0.01 momentum 0.9
(momentum reset at each experience, as our ``optimizer.reset_per_phase``), 2 epochs per
experience, no augmentation, pixel-wise cross-entropy ignoring label 255. After each experience the
model is evaluated (eval mode, batch 64) on every experience's test set with our metric: a confusion
matrix per test set -> ``clseg_jax.metrics.miou`` -> accuracy matrix ``R[i][j]`` ->
``clseg_jax.metrics.cl_summary``.

Avalanche is used as shipped, with the patches below where it assumes classification (each is
marked ``PATCH`` in the code and listed with every formula difference in baselines/README.md):

* datasets get a dummy per-sample ``targets`` (0) because Avalanche's classification datasets need
  one; the segmentation mask travels as the pattern's "y";
* LwF: distillation classes from the masks instead of the image-level ``targets`` (with the
  dummy targets it would distil one class, i.e. nothing) and the KL averaged over pixels instead
  of summed;
* LFL: the model exposes ``get_features`` (the bottleneck), and the "last fc layer" it freezes is
  the 1x1 conv head (Avalanche looks for an ``nn.Linear`` and raises without one);
* train mode is restored before each training forward: Avalanche's LFL and RWalk plugins switch
  the model to eval mode inside the training loop and never switch it back;
* A-GEM: gradients flattened with ``reshape`` instead of ``view`` (``AGEMPlugin`` raises on the
  ``channels_last`` model's convolution gradients).

Replay and GEM run unpatched (GEM flattens with ``flatten``): the memories keep each pattern's
mask as its "y" and the memory losses go through the strategy's criterion.

  python experiments/baselines/avalanche_w2.py --strategy ewc --export-dir /tmp/w2_export \\
      --out /tmp/ewc_torch.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.utils import _make_taskaware_classification_dataset
from avalanche.models import avalanche_forward
from avalanche.models.base_model import BaseModel
from avalanche.training import LearningWithoutForgetting
from avalanche.training.plugins import (
    AGEMPlugin,
    EvaluationPlugin,
    EWCPlugin,
    GEMPlugin,
    LFLPlugin,
    LwFPlugin,
    MASPlugin,
    ReplayPlugin,
    RWalkPlugin,
    SupervisedPlugin,
    SynapticIntelligencePlugin,
)
from avalanche.training.supervised import Cumulative, JointTraining, Naive
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_unet

# Only numpy functions of clseg_jax.metrics are used (importing it also imports JAX, unused).
from clseg_jax import metrics

STRATEGIES = (
    *("naive", "ewc", "si", "mas", "rwalk", "lfl", "lwf"),
    *("replay", "gem", "agem", "cumulative", "joint"),
)
BATCH, EVAL_BATCH, LR, MOMENTUM = 32, 64, 0.01, 0.9
IGNORE = 255
WARMUP_ITERATIONS = 3  # excluded from images/s (first calls allocate and pick oneDNN kernels)


# ----------------------------------------------------------------------------- model and data


class AvalancheUNet(torch_unet.UNet, BaseModel):
    """The W1 UNet as an Avalanche ``BaseModel``: LFL calls ``get_features``.

    PATCH (LFL): Avalanche's LFL needs a ``BaseModel``; its features are our ``features`` (the
    bottleneck ``[B,128,H/8,W/8]``), the same tensor our LFL distils.
    """

    def get_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def load_stream(path: str) -> tuple[list[tuple[np.ndarray, np.ndarray]], list, int]:
    """``(train, test, num_classes)``; train/test are per-experience ``(images, labels)``."""
    with np.load(path) as f:
        t = len(f["names"])
        train = [(f[f"train_images_{i}"], f[f"train_labels_{i}"]) for i in range(t)]
        test = [(f[f"test_images_{i}"], f[f"test_labels_{i}"]) for i in range(t)]
        return train, test, int(f["num_classes"])


def avalanche_dataset(images: np.ndarray, labels: np.ndarray):
    """An Avalanche dataset of ``(image uint8 [H,W,3], mask int64 [H,W], task 0)`` patterns.

    PATCH (data): Avalanche's supervised datasets need a per-sample ``targets`` field (the class of
    a classification sample); segmentation samples get a dummy 0. The mask is the pattern's "y",
    which the strategy's criterion receives. Masks are int64 because ``CrossEntropyLoss`` wants it.
    """
    ds = TensorDataset(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))
    return _make_taskaware_classification_dataset(ds, targets=[0] * len(images), task_labels=0)


def mask_classes(labels: np.ndarray, num_classes: int) -> set[int]:
    """Classes labelled anywhere in ``labels [N,H,W]`` (255 excluded)."""
    present = np.bincount(labels.reshape(-1), minlength=256)[:num_classes]
    return {int(c) for c in np.flatnonzero(present)}


# ----------------------------------------------------------------------------- patched plugins


class DenseLwF(LearningWithoutForgetting):
    """Avalanche's LwF for ``[B,C,H,W]`` logits.

    PATCH (LwF, classes): Avalanche distils only the classes in the finished experiences'
    image-level ``targets`` (``exp.dataset.targets``); segmentation samples only have a dummy
    target, so it would distil the single class 0, i.e. a softmax over one logit: exactly zero.
    Here the classes are those labelled in the experience's *masks* (for W2: all 5).

    PATCH (LwF, pixels): Avalanche's ``kl_div(..., reduction="batchmean")`` divides the sum over
    every element by the batch size, i.e. it *sums* the per-pixel KL over the 64x64 pixels (4096x
    our mean). Here: per-pixel KL summed over classes, averaged over batch and pixels.

    Kept from Avalanche: no ``T^2`` factor; the teacher is a deep copy of the model taken in train
    mode and never switched to eval, so it normalises with the batch's statistics.
    """

    def __init__(self, alpha: float, temperature: float, classes_by_exp: list[set[int]]):
        super().__init__(alpha, temperature)
        self.classes_by_exp = classes_by_exp

    def _distillation_loss(
        self, out: torch.Tensor, prev_out: torch.Tensor, active_units
    ) -> torch.Tensor:
        au = sorted(active_units)
        log_p = torch.log_softmax(out[:, au] / self.temperature, dim=1)
        q = torch.softmax(prev_out[:, au] / self.temperature, dim=1)
        kl = nn.functional.kl_div(log_p, q, reduction="none").sum(dim=1)  # [B,H,W]
        return kl.mean()

    def post_adapt(self, agent, exp) -> None:
        super().post_adapt(agent, exp)  # copies the model; records the dummy targets' classes
        # Joint/cumulative never reach here; a plain experience has one task label (0).
        self.prev_classes_by_task[0] = set().union(
            *self.classes_by_exp[: exp.current_experience + 1]
        )


class DenseLFLPlugin(LFLPlugin):
    """Avalanche's LFL with the 1x1 conv head as the frozen classifier.

    PATCH (LFL): after each experience Avalanche freezes the last ``nn.Linear`` it finds
    (``get_last_fc_layer`` raises "No fc layer found" for a fully convolutional model). A dense
    model's per-pixel linear classifier is its 1x1 conv head, so that is what is frozen here.
    """

    def after_training_exp(self, strategy, **kwargs) -> None:
        import copy

        from avalanche.training.utils import freeze_everything

        self.prev_model = copy.deepcopy(strategy.model)
        freeze_everything(self.prev_model)
        for param in strategy.model.head.parameters():
            param.requires_grad = False


class ChannelsLastAGEMPlugin(AGEMPlugin):
    """Avalanche's A-GEM for a ``channels_last`` model.

    PATCH (A-GEM): ``AGEMPlugin`` flattens each gradient with ``p.grad.view(-1)``, which raises
    for the 4-D (convolution) gradients of a ``channels_last`` model ("view size is not
    compatible with input tensor's size and stride"). Here ``reshape(-1)``: the same values in
    the same (contiguous NCHW) order for the current and the reference gradient, and the
    projected slices go back through ``view_as(p)`` + ``copy_`` in that order, as in Avalanche.
    Otherwise the two methods are Avalanche 0.6's.
    """

    def before_training_iteration(self, strategy, **kwargs) -> None:
        if len(self.buffers) > 0:
            strategy.model.train()
            strategy.optimizer.zero_grad()
            mb = self.sample_from_memory()
            xref, yref = mb[0].to(strategy.device), mb[1].to(strategy.device)
            out = avalanche_forward(strategy.model, xref, mb[-1])
            strategy._criterion(out, yref).backward()
            self.reference_gradients = _flat_grad(strategy.model, strategy.device)
            strategy.optimizer.zero_grad()

    @torch.no_grad()
    def after_backward(self, strategy, **kwargs) -> None:
        if len(self.buffers) > 0:
            g = _flat_grad(strategy.model, strategy.device)
            g_ref = self.reference_gradients
            dotg = torch.dot(g, g_ref)
            if dotg < 0:
                g = g - g_ref * (dotg / torch.dot(g_ref, g_ref))
                count = 0
                for p in strategy.model.parameters():
                    if p.grad is not None:
                        p.grad.copy_(g[count : count + p.numel()].view_as(p))
                    count += p.numel()


def _flat_grad(model: nn.Module, device: Any) -> torch.Tensor:
    """Every parameter's gradient flattened (zeros where None) and concatenated."""
    return torch.cat(
        [
            p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=device)
            for p in model.parameters()
        ]
    )


def freeze_memory_bn(plugin: SupervisedPlugin) -> None:
    """Diagnostic (``--no-memory-bn-update``): undoes what the plugin's
    ``before_training_iteration`` (GEM's and A-GEM's train-mode memory forwards) does to the
    BatchNorm running statistics, as our GEM and A-GEM drop those updates."""
    hook = plugin.before_training_iteration

    def wrapped(strategy, **kwargs) -> None:
        state = strategy.model.state_dict()
        saved = {k: v.clone() for k, v in state.items() if "running_" in k or "num_batches" in k}
        hook(strategy, **kwargs)
        for k, v in saved.items():
            state[k].copy_(v)

    plugin.before_training_iteration = wrapped  # type: ignore[method-assign]


class KeepTrainMode(SupervisedPlugin):
    """PATCH (LFL, RWalk): puts the model back in train mode before every training forward.

    ``LFLPlugin.compute_features`` (in ``before_backward``) and ``RWalkPlugin._update_grad`` (in
    ``before_training_iteration``) call ``model.eval()`` and never call ``model.train()`` again,
    so from their first call on every training forward would use the running statistics and
    never update them. (EWC and MAS restore train mode themselves.)
    """

    def before_forward(self, strategy, **kwargs) -> None:
        strategy.model.train()


class Timer(SupervisedPlugin):
    """Wall-clock timing of the training loops, per iteration and per epoch.

    An iteration's duration runs from its ``before_training_iteration`` to the next one's (or to
    the end of the epoch), so it includes loading its batch and every plugin's per-iteration work
    (e.g. SI's and RWalk's updates that run after this plugin's hooks).
    """

    def __init__(self):
        super().__init__()
        self.iterations: list[float] = []
        self.epochs: list[float] = []
        self._iter_start: float | None = None
        self._epoch_start = 0.0

    def before_training_epoch(self, strategy, **kwargs) -> None:
        self._epoch_start = time.perf_counter()
        self._iter_start = None

    def before_training_iteration(self, strategy, **kwargs) -> None:
        now = time.perf_counter()
        if self._iter_start is not None:
            self.iterations.append(now - self._iter_start)
        self._iter_start = now

    def after_training_epoch(self, strategy, **kwargs) -> None:
        now = time.perf_counter()
        if self._iter_start is not None:
            self.iterations.append(now - self._iter_start)
        self.epochs.append(now - self._epoch_start)


# ----------------------------------------------------------------------------- strategies


def make_strategy(
    name: str,
    model: nn.Module,
    epochs: int,
    classes_by_exp: list[set[int]],
    timer: Timer,
    memory_bn_update: bool = True,
) -> tuple[Any, str]:
    """The Avalanche strategy for ``name`` and a one-line description of its hyperparameters.

    ``memory_bn_update=False`` (diagnostic, GEM and A-GEM only): their memory forwards leave the
    BatchNorm running statistics as they were (``freeze_memory_bn``)."""
    plugins: list[SupervisedPlugin] = [timer, KeepTrainMode()]
    desc = ""
    if name == "ewc":
        # Fisher: squared *batch* gradients (batches of train_mb_size) over the experience's whole
        # training set, averaged over batches, in eval mode; penalty lambda * sum F (w - w*)^2.
        plugins.append(EWCPlugin(ewc_lambda=100.0, mode="separate"))
        desc = "lambda 100 separate, F=batch-32 grads^2"
    elif name == "si":
        plugins.append(SynapticIntelligencePlugin(si_lambda=0.1))
        desc = "si_lambda 0.1, eps 1e-7, clip 1e-3, no BN"
    elif name == "mas":
        plugins.append(MASPlugin(lambda_reg=1.0, alpha=0.5))
        desc = "lambda 1, alpha 0.5 EMA, batch |grad|"
    elif name == "rwalk":
        plugins.append(RWalkPlugin(ewc_lambda=1.0, ewc_alpha=0.9, delta_t=10))
        desc = "lambda 1, alpha 0.9, delta_t 10"
    elif name == "lfl":
        plugins.append(DenseLFLPlugin(lambda_e=0.1))
        desc = "lambda 0.1 (MSE mean), head frozen"
    elif name == "lwf":
        plugin = LwFPlugin(alpha=1.0, temperature=2.0)
        plugin.lwf = DenseLwF(1.0, 2.0, classes_by_exp)
        plugins.append(plugin)
        desc = "alpha 1, T 2, no T^2"
    elif name == "replay":
        # = avalanche.training.Replay(mem_size=200): the default storage policy is
        # ExperienceBalancedBuffer(200, adaptive_size=True). From the second experience on a
        # ReplayDataLoader concatenates batch_size new rows and batch_size_mem memory rows (both
        # default to train_mb_size; set explicitly here), the epoch's length set by the new data
        # (16 iterations), the memory cycled (200 = 6 x 32 + 8: one memory batch in 7 has 8 rows).
        # The first experience trains on plain batches of 32 (empty buffer).
        plugins.append(ReplayPlugin(mem_size=200, batch_size=BATCH, batch_size_mem=BATCH))
        desc = "mem 200 exp-balanced, 32 new + 32 replayed from 2nd exp"
    elif name == "gem":
        # = avalanche.training.GEM(patterns_per_exp=32, memory_strength=0.5): per step, one
        # train-mode forward + backward per finished experience (its 32 rows, BN running
        # statistics updated), then a dual QP on the host (qpsolvers -> quadprog, float64) when
        # a constraint is violated.
        plugins.append(GEMPlugin(patterns_per_experience=32, memory_strength=0.5))
        desc = "32/exp, strength 0.5, 1 grad per past exp, QP on host"
    elif name == "agem":
        # = avalanche.training.AGEM(patterns_per_exp=32, sample_size=32): per step one train-mode
        # forward + backward on a memory sample, group-balanced over the finished experiences with
        # sample_size // experiences rows each (32, 16 + 16, 3 x 10), BN running stats updated.
        plugins.append(ChannelsLastAGEMPlugin(patterns_per_experience=32, sample_size=32))
        desc = "32/exp, sample 32 balanced (32, 2x16, 3x10)"
    elif name not in ("naive", "cumulative", "joint"):
        raise ValueError(f"unknown strategy {name!r}; valid: {list(STRATEGIES)}")
    if not memory_bn_update:
        if name not in ("gem", "agem"):
            raise ValueError("memory_bn_update=False applies to gem and agem only")
        freeze_memory_bn(plugins[-1])
        desc += ", memory BN updates undone"
    cls: Callable[..., Any] = {"cumulative": Cumulative, "joint": JointTraining}.get(name, Naive)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no loggers": metrics are computed outside Avalanche
        evaluator = EvaluationPlugin(loggers=[])
    strategy = cls(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
        criterion=nn.CrossEntropyLoss(ignore_index=IGNORE),
        train_mb_size=BATCH,
        train_epochs=epochs,
        eval_mb_size=EVAL_BATCH,
        device="cpu",
        plugins=plugins,
        evaluator=evaluator,
    )
    return strategy, desc or "-"


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def confusions(
    model: nn.Module, tests: list[tuple[np.ndarray, np.ndarray]], num_classes: int
) -> list[np.ndarray]:
    """``[K,K]`` confusion (rows truth, columns prediction) per test set, eval mode, batch 64."""
    was_training = model.training
    model.eval()
    out = []
    for images, labels in tests:
        conf = np.zeros(num_classes * num_classes, np.int64)
        for s in range(0, len(images), EVAL_BATCH):
            pred = model(torch.from_numpy(images[s : s + EVAL_BATCH])).argmax(dim=1).numpy()
            y = labels[s : s + EVAL_BATCH].astype(np.int64)
            valid = y < num_classes  # 255 = ignore
            conf += np.bincount(y[valid] * num_classes + pred[valid], minlength=conf.size)
        out.append(conf.reshape(num_classes, num_classes))
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------- the run


def run(
    name: str,
    export_dir: str,
    epochs: int = 2,
    seed: int = 0,
    threads: int | None = None,
    memory_bn_update: bool = True,
) -> dict[str, Any]:
    """Trains strategy ``name`` over the exported stream; returns results and timings."""
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(seed)  # the train DataLoader shuffles with torch's global generator
    random.seed(seed)
    np.random.seed(seed)

    t_run = time.perf_counter()
    train, test, k = load_stream(os.path.join(export_dir, "stream.npz"))
    classes_by_exp = [mask_classes(labels, k) for _, labels in train]
    bench = benchmark_from_datasets(
        train=[avalanche_dataset(*a) for a in train], test=[avalanche_dataset(*a) for a in test]
    )
    model = AvalancheUNet(k)
    with np.load(os.path.join(export_dir, "init.npz")) as f:
        torch_unet.load_flax_init(model, dict(f))
    timer = Timer()
    strategy, desc = make_strategy(name, model, epochs, classes_by_exp, timer, memory_bn_update)

    t0 = time.perf_counter()
    initial = [metrics.miou(c) for c in confusions(model, test, k)]
    eval_s = time.perf_counter() - t0
    rows: list[list[float]] = []
    train_call_s = 0.0
    # Joint trains once on the union of every experience; the others once per experience.
    # reset_optimizer_state: Avalanche 0.6 keeps SGD momentum across experiences by default; ours
    # resets it per phase (optimizer.reset_per_phase=True).
    schedule = [bench.train_stream] if name == "joint" else list(bench.train_stream)
    for item in schedule:
        t0 = time.perf_counter()
        strategy.train(item, reset_optimizer_state=True)
        train_call_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        rows.append([metrics.miou(c) for c in confusions(model, test, k)])
        eval_s += time.perf_counter() - t0
    run_s = time.perf_counter() - t_run

    train_s = sum(timer.epochs)
    timed = timer.iterations[WARMUP_ITERATIONS:]
    return {
        "side": "avalanche",
        "strategy": name,
        "hparams": desc,
        "accuracy_matrix": rows,
        "initial_row": initial,
        **metrics.cl_summary(rows, initial if len(rows) > 1 else None),
        "timing": {
            "run_s": run_s,
            "train_s": train_s,
            "train_steps": len(timer.iterations),
            # Everything train() does besides the epochs: dataset and optimizer set-up and the
            # plugins' before/after-experience work (Fisher, importances, model copies).
            "strategy_s": train_call_s - train_s,
            "eval_s": eval_s,
            "images_per_s": BATCH * len(timed) / max(sum(timed), 1e-9),
            "warmup_iterations": WARMUP_ITERATIONS,
            "threads": threads,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        },
        "versions": {"torch": torch.__version__, "avalanche": _version("avalanche-lib")},
    }


def check_lwf(seed: int = 0) -> float:
    """Relative difference between ``T^2 *`` our patched Avalanche LwF loss and clseg_jax's
    ``losses.distillation`` on random ``[B,K,H,W]`` logits (they differ only by the ``T^2``)."""
    from clseg_jax import losses

    t = 2.0
    rng = np.random.default_rng(seed)
    new, old = (rng.normal(size=(4, 5, 16, 16)).astype(np.float32) * 3 for _ in range(2))
    theirs = DenseLwF(1.0, t, [set(range(5))])._distillation_loss(
        torch.from_numpy(new), torch.from_numpy(old), range(5)
    )
    nhwc = lambda a: a.transpose(0, 2, 3, 1)
    ours = float(losses.distillation(nhwc(new), nhwc(old), np.ones(5, bool), t))
    return abs(t**2 * float(theirs) - ours) / abs(ours)


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", choices=STRATEGIES)
    parser.add_argument(
        "--check", action="store_true", help="only check the patched LwF loss against ours"
    )
    parser.add_argument("--export-dir", help="folder written by export.py")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    parser.add_argument(
        "--no-memory-bn-update",
        action="store_true",
        help="diagnostic for gem/agem: their memory forwards leave the BN running statistics "
        "unchanged (as ours do)",
    )
    args = parser.parse_args()
    if args.check:
        diff = check_lwf()
        print(f"T^2 * patched Avalanche LwF vs clseg_jax distillation: relative diff {diff:.1e}")
        sys.exit(0 if diff < 1e-5 else 1)
    if not (args.strategy and args.export_dir):
        parser.error("--strategy and --export-dir are required (or --check)")
    results = run(
        args.strategy,
        args.export_dir,
        args.epochs,
        args.seed,
        args.threads,
        memory_bn_update=not args.no_memory_bn_update,
    )
    text = json.dumps(results, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
