"""Issue 17: W1-W4 at their accelerator presets, in one command, for a GPU or TPU machine.

    make bench-accel PY=python3        # the machine's own Python, no venv
    python experiments/bench_accel.py --preset cpu --out /tmp/bench_accel_cpu.json  # smoke

Made for BENCHMARKS.md's GPU machine: Python 3.12 with a newer JAX, flax, optax and orbax already
installed, no network, and none of grain, ml-collections, clu (nor their small dependencies).
Before importing the library this script looks for those modules; what is missing it installs
from the wheels in ``--wheels`` (``wheels/accel``) into ``.accel-site`` (``pip --target
--no-deps``: the machine's JAX is never touched), or stops with one line naming the wheels to
fetch. ``make wheels-accel`` downloads them on a machine with network (CPython 3.12, manylinux
x86_64); they are well under the 64 MiB that travels with a checkout.

Workloads, each the library's own compiled program with ``precision=auto`` (bf16 convolutions
and matmuls on a GPU/TPU), on fixed synthetic batches:

- W1: the ``unet64`` train step (UNet 16-128, 64x64, batch 32, SGD) through ``naive``.
- W2: the same model's step for each of W2's strategies (the state's shapes are fixed, so an
  untrained state costs what an active one does).
- W3: DeepLab-v3 ResNet-101, OS16, crop 512, batch 24, 21 classes, MiB and PLOP
  (``bench_w3.bench``, a second-phase state).
- W4: DeepInversion, ResNet-18 teacher at 32x32, 256 images, one compiled ``lax.scan`` of
  ``--w4-iters`` Adam iterations (``(t(k) - t(0)) / k`` per iteration, as ``bench_w4``).

Per workload: images/s (W4: synthetic images x iterations / s), compile seconds, XLA's FLOPs per
step and MFU: achieved FLOP/s over a bf16 matmul's FLOP/s timed in the same run (what the device
reaches in practice; the data-sheet peak is recorded too where known). The ``accel`` preset is
sized to finish in about 8 minutes on one H100 (not run yet: no accelerator was lent to the
sessions that wrote it); ``cpu`` shrinks every shape to check the script in a minute here.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = os.path.join(ROOT, ".accel-site")
# module -> its wheel: what the library imports that the GPU machine lacks.
NEEDS = {
    "grain": "grain",
    "array_record": "array-record",
    "cloudpickle": "cloudpickle",
    "portpicker": "portpicker",
    "ml_collections": "ml-collections",
    "clu": "clu",
    "wrapt": "wrapt",
    "tqdm": "tqdm",
    "yaml": "PyYAML",
    "PIL": "pillow",
}


def _pins() -> dict[str, str]:
    """``name==version`` of requirements.txt (the versions the suite runs with)."""
    out = {}
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        for line in f:
            m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line)
            if m:
                out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def _specs(names: list[str]) -> list[str]:
    pins = _pins()
    return [f"{n}=={pins[n.lower()]}" if n.lower() in pins else n for n in names]


def _missing() -> list[str]:
    return [wheel for module, wheel in NEEDS.items() if importlib.util.find_spec(module) is None]


def download(dest: str, python: str = "3.12") -> None:
    """Every wheel of ``NEEDS`` for CPython ``python`` on x86_64 Linux into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--dest", dest, "--no-deps"]
    cmd += ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for tag in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"):
        cmd += ["--platform", tag]
    subprocess.check_call([*cmd, *_specs(list(NEEDS.values()))])
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(dest, "*.whl")))
    print(f"{dest}: {size / 2**20:.1f} MiB of wheels; bring the folder with the checkout")


def ensure_deps(wheels: str) -> None:
    """Installs what this Python lacks from ``wheels`` into ``SITE`` (module docstring)."""
    if os.path.isdir(SITE):
        sys.path.insert(0, SITE)
    gone = _missing()
    if not gone:
        return
    if not glob.glob(os.path.join(wheels, "*.whl")):
        sys.exit(
            f"error: this Python lacks {' '.join(_specs(gone))} and {wheels}/ holds no wheels; "
            f"on a machine with network run `make wheels-accel` and bring {wheels}/ along"
        )
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    subprocess.check_call([*pip, "--find-links", wheels, "--target", SITE, *_specs(gone)])
    importlib.invalidate_caches()
    if SITE not in sys.path:
        sys.path.insert(0, SITE)
    if _missing():
        sys.exit(f"error: still missing after installing from {wheels}/: {_missing()}")


PRESETS = {
    "accel": {
        "w1": {"size": 64, "batch": 32, "widths": (16, 32, 64, 128)},
        "w2": ("naive", "ewc", "si", "mas", "lfl", "lwf", "replay", "gem", "agem"),
        "w3": "gpu",
        "w4": {"batch": 256, "size": 32, "iters": 50},
        "steps": 20,
        "matmul": 8192,
    },
    "cpu": {
        "w1": {"size": 32, "batch": 8, "widths": (8, 16)},
        "w2": ("naive", "ewc", "replay"),
        "w3": "cpu",
        "w4": {"batch": 8, "size": 32, "iters": 2},
        "steps": 3,
        "matmul": 1024,
    },
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="accel")
    p.add_argument("--workloads", default="w1,w2,w3,w4")
    p.add_argument("--wheels", default=os.path.join(ROOT, "wheels", "accel"))
    p.add_argument("--download", metavar="DIR", help="fetch the wheels into DIR and stop")
    p.add_argument("--wheel-python", default="3.12", help="the Python the wheels are for")
    p.add_argument("--out", default="experiments/results/bench_accel.json")
    args = p.parse_args()
    if args.download:
        return download(args.download, args.wheel_python)
    ensure_deps(args.wheels)
    sys.path.insert(0, ROOT)
    from experiments import accel_workloads  # the library and JAX, once the deps are there

    accel_workloads.run(PRESETS[args.preset], args.preset, args.workloads.split(","), args.out)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"bench_accel: {time.perf_counter() - t0:.0f} s in all")
