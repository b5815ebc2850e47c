"""Builds the oneDNN convolution kernel: ``python -m clseg_jax.kernels.build [--require]``.

Needs a C++17 compiler and oneDNN 3.x headers and library, which ``pip install '.[onednn]'``
puts into this environment (``include/``, ``lib/``); XLA's FFI headers come with jaxlib. Without
them it says so in one line and exits 0 (``model.conv_impl=auto`` then means XLA), or 1 with
``--require`` (CI, where the kernel must be tested).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import jax

from clseg_jax.kernels import onednn

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conv_onednn.cc")


def command(out: str) -> list[str]:
    include = os.path.join(sys.prefix, "include")
    lib = onednn.dnnl_lib_dir()
    return [
        os.environ.get("CXX", "g++"),
        "-O3",
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-fopenmp",
        f"-I{jax.ffi.include_dir()}",
        f"-I{include}",
        SOURCE,
        f"-L{lib}",
        "-ldnnl",
        f"-Wl,-rpath,{lib}",
        "-o",
        out,
    ]


def problem() -> str | None:
    """Why the kernel cannot be built here, or None."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx})"
    header = os.path.join(sys.prefix, "include", "oneapi", "dnnl", "dnnl.hpp")
    if not os.path.exists(header):
        return f"no oneDNN headers ({header}); pip install '.[onednn]'"
    return None


def build(out: str) -> str | None:
    """Compiles into ``out`` (atomically: a half-written library never loads); returns None, or
    why it failed."""
    why = problem()
    if why:
        return why
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(out))
    os.close(fd)
    try:
        proc = subprocess.run(command(tmp), capture_output=True, text=True)
        if proc.returncode:
            return "the compiler failed: " + proc.stderr.strip().splitlines()[-1]
        os.replace(tmp, out)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require", action="store_true", help="fail if it cannot be built")
    parser.add_argument("--out", default=onednn.lib_path())
    args = parser.parse_args()
    why = build(args.out)
    if why:
        print(f"clseg_jax: oneDNN kernel not built: {why}; conv_impl=auto uses XLA")
        return 1 if args.require else 0
    print(f"clseg_jax: built {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
