"""W4's PyTorch side: NVlabs/DeepInversion's synthesis loop on a ResNet-18 loaded from our weights.

The loop is the reference's (Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via
DeepInversion", CVPR 2020; NVlabs/DeepInversion, ``deepinversion.py``'s ``get_images`` with
``setting_id=1``: one resolution, no multi-resolution warm start), one iteration being:

1. the learning rate of the reference's ``lr_cosine_policy(lr, 100, iterations)``: linear warm-up
   over the first 100 iterations, then a cosine decay to 0;
2. jitter: ``torch.roll`` of the whole batch by one random offset per axis drawn from
   ``[-jitter, jitter]`` (Python's ``random``, as the reference), then a horizontal flip of the
   whole batch with probability 1/2 when ``flip``;
3. the teacher's forward on the jittered copy; forward hooks on every ``BatchNorm2d`` (in
   ``model.modules()`` order, so the stem's first) take the mean and the *biased* variance of the
   layer's input over batch and positions and give ``||running_var - var||_2 + ||running_mean -
   mean||_2``; ``r_feature`` sums them with the first layer times ``first_bn_multiplier``;
4. ``loss = main_scale * CE(logits, targets) + tv_l2 * TV_l2 + tv_l1 * TV_l1 + bn_scale *
   r_feature + l2 * L2`` with the reference's priors on the jittered copy: the four neighbour
   differences (right, down, and both diagonals), ``TV_l2`` the sum of their Frobenius norms,
   ``TV_l1`` the sum of their mean absolute values, ``L2`` the mean over images of each image's L2
   norm;
5. backward, one Adam step on the pixels (betas and eps from the config: the reference's
   (0.5, 0.9), 1e-8), then clipping to the valid input range. The reference clamps each channel
   so that the de-normalised pixel stays in [0, 1]; our models take pixels in [-1, 1], so both sides
   clamp to [-1, 1].

Adaptive DeepInversion (the student competition term) is off in W4 (``adi_scale`` 0), as it is in
the timed loop on our side.

Variants (``--variants``, each on its own copy of the teacher):

* ``nchw``: the reference's layout, with the teacher frozen (``requires_grad_(False)``): only the
  pixels' gradient is computed, as on our side (``jax.grad`` with respect to the images).
* ``channels_last``: the same, in the fastest PyTorch CPU layout of BENCHMARKS.md W1.
* ``reference_grads``: as the reference is written, which leaves the teacher's parameters
  trainable, so every backward also computes (and ``zero_grad`` then discards) the weight
  gradients.

The teacher: ``torchvision.models.resnet18`` with the CIFAR-style stem of our
``resnet.ResNet(small_input=True)`` (a 3x3 stride-1 conv, no max-pool), loaded from one of our
``.npz`` weight files (``clseg_jax.models.weights``): the inverse of
``convert_torchvision.convert``, checked by converting the loaded state dict back and comparing
every array. It runs in eval mode (running statistics, no BatchNorm update), as the reference.

Modes (``--mode``):

* ``time``: each variant (``--variants``) is built on its own copy of the teacher and warmed up
  (``warmup`` iterations), then runs ``iterations`` timed ones (each after the step and the clip,
  synchronised on GPU); per-iteration seconds, images/s and iterations/s.
* ``serve``: the variants built and warmed up as in ``time``, then ``bench_w4.py`` sends lines
  ``VARIANT N`` on stdin and gets each of those N iterations' seconds back as one JSON line, so
  it can interleave both sides' iterations on a shared machine; ``quit`` ends it.
* ``check``: a given start (``--init``, ``[N,H,W,3]`` float in [-1, 1]) and targets: the
  teacher's logits and each BatchNorm's distance on the start, every iteration's loss parts, the
  final images, for ``bench_w4.py`` to compare with our side's.

  .venv-baselines/bin/python experiments/baselines/deepinversion_torch.py --weights teacher.npz \\
      --config cfg.json --out torch_w4.json [--mode check --init start.npz] [--device cuda]

``cfg.json`` holds the loop's hyperparameters under our ``DIConfig`` names (``lr``, ``betas``,
``eps``, ``bn_scale``, ``first_bn_multiplier``, ``tv_l1``, ``tv_l2``, ``l2``, ``main_scale``,
``jitter``, ``flip``, ``warmup_iterations``, ``schedule_iterations``) and the run's sizes
(``batch``, ``image_size``, ``num_classes``, ``iterations``, ``warmup``, ``threads``, ``seed``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Mapping
from importlib import metadata

import numpy as np
import torch
import torchvision
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import convert_torchvision  # noqa: E402  (NumPy only: the name mapping shared with our loader)

# ----------------------------------------------------------------------------- the teacher


def resnet18_small_input(num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with our ``small_input=True`` stem: a 3x3 stride-1 conv (padding
    1, no bias) and no max-pool. ``[B,3,32,32] -> [B,K]``; the last stage runs at 4x4."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _to_torch_layout(name: str, ours: np.ndarray) -> np.ndarray:
    """Our array for torchvision entry ``name`` in torchvision's layout (HWIO -> OIHW conv
    kernels, ``[C,K]`` -> ``[K,C]`` for the linear head; BatchNorm vectors unchanged)."""
    if ours.ndim == 4:
        return ours.transpose(3, 2, 0, 1)
    if ours.ndim == 2:
        return ours.T
    return ours


def state_dict_from_npz(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> dict:
    """Our ``.npz`` arrays (``params/...``, ``batch_stats/...``) as ``model``'s state dict.

    Every torchvision entry is located through ``convert_torchvision``'s mapping; shapes are
    checked, and converting the result back must reproduce every one of our arrays exactly.
    """
    state = {}
    for name, ref in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = ref
            continue
        group, path, _ = convert_torchvision._target(name, ref.numpy())
        key = "/".join([group, *map(str, path)])
        if key not in arrays:
            raise ValueError(f"deepinversion_torch: {key!r} (for {name!r}) not in the weights")
        value = _to_torch_layout(name, np.asarray(arrays[key]))
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(f"deepinversion_torch: {key!r} {value.shape} vs {name} {ref.shape}")
        state[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    # Round trip: torchvision -> ours must give back the file's arrays, all of them.
    params, stats = convert_torchvision.convert({k: v.numpy() for k, v in state.items()})
    back = {**_flatten(params, "params"), **_flatten(stats, "batch_stats")}
    if set(back) != set(arrays):
        raise ValueError(f"deepinversion_torch: keys differ: {sorted(set(back) ^ set(arrays))}")
    for key, value in back.items():
        if not np.array_equal(value, arrays[key]):
            raise ValueError(f"deepinversion_torch: {key!r} changed in the round trip")
    return state


def _flatten(tree: Mapping, prefix: str) -> dict[str, np.ndarray]:
    """``{"a": {0: {"b": x}}}`` -> ``{"prefix/a/0/b": x}`` (the ``.npz`` key layout)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


def load_teacher(path: str, num_classes: int) -> nn.Module:
    """ResNet-18 (small input) from our ``.npz``, in eval mode."""
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    model = resnet18_small_input(num_classes)
    model.load_state_dict(state_dict_from_npz(model, arrays), strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- the loop


class BNStatsHook:
    """The reference's ``DeepInversionFeatureHook``: the distance between a BatchNorm2d input's
    batch moments (variance biased) and the layer's running ones."""

    def __init__(self, module: nn.BatchNorm2d):
        self.handle = module.register_forward_hook(self.hook)
        self.r_feature: torch.Tensor | None = None

    def hook(self, module: nn.BatchNorm2d, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1).var(dim=1, unbiased=False)
        self.r_feature = torch.norm(module.running_var - var, 2) + torch.norm(
            module.running_mean - mean, 2
        )

    def close(self) -> None:
        self.handle.remove()


def image_priors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(TV_l1, TV_l2, L2)`` of ``x [B,C,H,W]`` as the reference computes them."""
    diffs = (
        x[:, :, :, :-1] - x[:, :, :, 1:],
        x[:, :, :-1, :] - x[:, :, 1:, :],
        x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
        x[:, :, :-1, :-1] - x[:, :, 1:, 1:],
    )
    tv_l2 = sum(torch.norm(d) for d in diffs)
    tv_l1 = sum(d.abs().mean() for d in diffs)  # the reference's /255 then *255 cancels
    l2 = torch.norm(x.reshape(x.shape[0], -1), dim=1).mean()
    return tv_l1, tv_l2, l2


def cosine_lr(base: float, warmup: int, total: int, i: int) -> float:
    """The reference's ``lr_cosine_policy``: linear warm-up over ``warmup`` iterations, then
    ``0.5 (1 + cos(pi e / (total - warmup))) base``."""
    if i < warmup:
        return base * (i + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (i - warmup) / (total - warmup))) * base


class DeepInversion:
    """One synthesis batch; ``step()`` runs one iteration of the reference's loop."""

    def __init__(
        self,
        teacher: nn.Module,
        cfg: Mapping,
        targets: torch.Tensor,
        inputs: torch.Tensor,
        *,
        channels_last: bool = False,
        reference_grads: bool = False,
    ):
        self.teacher, self.cfg, self.targets = teacher, cfg, targets
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        for p in teacher.parameters():
            p.requires_grad_(reference_grads)
        # named_modules() is modules()'s order: the reference's, the stem's BatchNorm first.
        self.names, self.hooks = [], []
        for name, m in teacher.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                self.names.append(name)
                self.hooks.append(BNStatsHook(m))
        self.inputs = inputs.contiguous(memory_format=self.memory_format).requires_grad_(True)
        self.optimizer = torch.optim.Adam(
            [self.inputs], lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"]
        )
        self.criterion = nn.CrossEntropyLoss()
        self.iteration = 0

    def step(self) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        lr = cosine_lr(
            cfg["lr"], cfg["warmup_iterations"], cfg["schedule_iterations"], self.iteration
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        lim = cfg["jitter"]
        off1, off2 = random.randint(-lim, lim), random.randint(-lim, lim)
        x = torch.roll(self.inputs, shifts=(off1, off2), dims=(2, 3))
        if random.random() > 0.5 and cfg["flip"]:
            x = torch.flip(x, dims=(3,))
        self.optimizer.zero_grad()
        self.teacher.zero_grad()
        logits = self.teacher(x)
        main = self.criterion(logits, self.targets)
        tv_l1, tv_l2, l2 = image_priors(x)
        rescale = [cfg["first_bn_multiplier"]] + [1.0] * (len(self.hooks) - 1)
        bn = sum(h.r_feature * s for h, s in zip(self.hooks, rescale, strict=True))
        total = (
            cfg["main_scale"] * main
            + cfg["tv_l2"] * tv_l2
            + cfg["tv_l1"] * tv_l1
            + cfg["bn_scale"] * bn
            + cfg["l2"] * l2
        )
        total.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.inputs.clamp_(-1.0, 1.0)
        self.iteration += 1
        parts = dict(total=total, main=main, bn=bn, tv_l1=tv_l1, tv_l2=tv_l2, l2=l2)
        return {k: v.detach() for k, v in parts.items()}

    def images(self) -> np.ndarray:
        """``[N,H,W,3]`` float32, our layout."""
        return self.inputs.detach().permute(0, 2, 3, 1).cpu().numpy()


# ----------------------------------------------------------------------------- modes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


VARIANTS = {  # name -> (channels_last, reference_grads)
    "nchw": (False, False),
    "channels_last": (True, False),
    "reference_grads": (False, True),
}


def make_variant(teacher: nn.Module, cfg: Mapping, device: torch.device, name: str):
    """A warmed-up ``DeepInversion`` of variant ``name`` on its own copy of the teacher (each
    copy carries only its own hooks) from a seeded random start; ``(loop, warmup_s)``."""
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; valid: {sorted(VARIANTS)}")
    channels_last, reference_grads = VARIANTS[name]
    model = copy.deepcopy(teacher)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(cfg["seed"])
    n, s = cfg["batch"], cfg["image_size"]
    inputs = torch.randn((n, 3, s, s), generator=gen).to(device)
    targets = (torch.arange(n) % cfg["num_classes"]).to(device)
    di = DeepInversion(
        model, cfg, targets, inputs, channels_last=channels_last, reference_grads=reference_grads
    )
    t0 = time.perf_counter()
    for _ in range(cfg["warmup"]):
        di.step()
    _sync(device)
    return di, time.perf_counter() - t0


def timed_steps(di: DeepInversion, n: int, device: torch.device) -> list[float]:
    """Seconds of each of ``n`` iterations (the step, the clip, a device sync)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        di.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def serve(loops: dict, device: torch.device) -> None:
    """Interleaved timing driven by ``bench_w4.py``: each stdin line ``VARIANT N`` runs N
    iterations of that variant and answers one JSON line of their seconds; ``quit`` ends."""
    for line in sys.stdin:
        if line.strip() == "quit":
            return
        name, n = line.split()
        print(json.dumps(timed_steps(loops[name], int(n), device)), flush=True)


def run_check(teacher, cfg, device, init: np.ndarray, targets: np.ndarray) -> dict:
    """``cfg["iterations"]`` iterations from ``init``: each one's loss parts, the final images."""
    random.seed(cfg["seed"])
    inputs = torch.from_numpy(np.ascontiguousarray(init.transpose(0, 3, 1, 2))).to(device)
    di = DeepInversion(teacher, cfg, torch.from_numpy(targets).long().to(device), inputs)
    with torch.no_grad():  # the teacher on the start itself: logits, each layer's distance
        logits = teacher(di.inputs)
    bn_layers = {n: float(h.r_feature) for n, h in zip(di.names, di.hooks, strict=True)}
    history = [di.step() for _ in range(cfg["iterations"])]
    for h in di.hooks:
        h.close()
    return {
        "logits": logits.cpu().numpy().tolist(),
        "bn_layers": bn_layers,
        "bn_order": di.names,
        "parts": {k: [float(h[k]) for h in history] for k in history[0]},
        "images": di.images().tolist(),
    }


def versions(device: torch.device) -> dict:
    out = {name: metadata.version(name) for name in ("torch", "torchvision", "numpy")}
    out["python"] = platform.python_version()
    out["torch_threads"] = torch.get_num_threads()
    out["mkldnn"] = torch.backends.mkldnn.is_available()
    if device.type == "cuda":
        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", required=True, help="our .npz (ResNet-18, small input)")
    parser.add_argument("--config", required=True, help="JSON: hyperparameters and sizes")
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=("time", "serve", "check"), default="time")
    parser.add_argument("--init", help="check mode: .npz with images [N,H,W,3] and targets [N]")
    parser.add_argument("--variants", default="nchw,channels_last,reference_grads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    with open(args.config) as f:
        cfg = json.load(f)
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the reference's scripts
    teacher = load_teacher(args.weights, cfg["num_classes"]).to(device)

    if args.mode == "check":
        with np.load(args.init) as f:
            out = run_check(teacher, cfg, device, f["images"], f["targets"])
    else:
        out = {"variants": {}}
        loops = {}
        for name in args.variants.split(","):
            loops[name], warmup_s = make_variant(teacher, cfg, device, name)
            channels_last, reference_grads = VARIANTS[name]
            out["variants"][name] = {
                "warmup_s": warmup_s,
                "channels_last": channels_last,
                "reference_grads": reference_grads,
            }
        if args.mode == "serve":
            print("ready", flush=True)
            serve(loops, device)
        else:
            for name, di in loops.items():
                times = timed_steps(di, cfg["iterations"], device)
                med = statistics.median(times)
                out["variants"][name].update(
                    iteration_s_median=med,
                    iteration_s_all=times,
                    iterations_per_s=1.0 / med,
                    images_per_s=cfg["batch"] / med,
                )
                print(f"torch {name:16s} {med:7.3f} s/iteration", file=sys.stderr, flush=True)
    out["versions"] = versions(device)
    out["device"] = str(device)
    with open(args.out, "w") as f:
        json.dump(out, f)
    return out


if __name__ == "__main__":
    main()
