"""Load on the embedded service over loopback: status and predict requests, idle and while a job
trains in the same process (the in-process worker). Writes throughput and latency percentiles.

  PYTHONPATH=. .venv/bin/python experiments/serve_load.py --out experiments/results/serve_load.json

The API runs as ``python -m clseg_jax.serve serve`` in a fresh ``CLSEG_HOME``; the client is
httpx with ``--threads`` concurrent connections. Predict runs the model on every request (one
compiled program per lineage image size, cached per version).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from PIL import Image

from clseg_jax.serve import example


def _wait_job(client: httpx.Client, job_id: str, states=("succeeded", "failed")) -> dict:
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.2)


def _load(
    client: httpx.Client, requests: int, threads: int, job_id: str, version: str, png: bytes
) -> dict:
    latencies: dict[str, list[float]] = {"status": [], "predict": []}
    errors = []

    def hit(i: int) -> None:
        t0 = time.perf_counter()
        if i % 2:
            kind, r = "status", client.get(f"/jobs/{job_id}")
        else:
            kind = "predict"
            r = client.post(f"/versions/{version}/predict", files={"image": ("x.png", png)})
        latencies[kind].append(time.perf_counter() - t0)
        if r.status_code != 200:
            errors.append(r.status_code)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(hit, range(requests)))
    wall = time.perf_counter() - t0
    out = {
        "requests": requests,
        "threads": threads,
        "errors": len(errors),
        "throughput_rps": requests / wall,
    }
    for kind, values in latencies.items():
        ms = np.array(values) * 1e3
        out[kind] = {
            "n": len(ms),
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="experiments/results/serve_load.json")
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--port", type=int, default=8791)
    args = parser.parse_args()

    home = tempfile.mkdtemp(prefix="clseg-load-")
    env = {**os.environ, "CLSEG_HOME": home, "JAX_PLATFORMS": "cpu"}
    token = subprocess.run(
        [sys.executable, "-m", "clseg_jax.serve", "token", "--owner", "load"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    server = subprocess.Popen(
        [sys.executable, "-m", "clseg_jax.serve", "serve", "--port", str(args.port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(300):
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=120,
            limits=httpx.Limits(max_connections=args.threads),
        )
        exps = example.experiences(2, size=64, n_train=256, n_test=32)
        ds = [
            client.post(
                "/datasets?num_classes=2", files={"file": (f"e{i}.zip", example.zip_bytes(e))}
            ).json()["id"]
            for i, e in enumerate(exps)
        ]
        lid = client.post(
            "/lineages", json={"name": "load", "image_size": [64, 64], "epochs": 12}
        ).json()["id"]
        j1 = client.post("/jobs", json={"lineage_id": lid, "dataset_id": ds[0]}).json()
        _wait_job(client, j1["id"])
        version = client.get(f"/lineages/{lid}").json()["latest_version"]
        buf = io.BytesIO()
        Image.fromarray(exps[0]["x_test"][0]).save(buf, "PNG")
        png = buf.getvalue()
        client.post(f"/versions/{version}/predict", files={"image": ("x.png", png)})  # compile
        idle = _load(client, args.requests, args.threads, j1["id"], version, png)
        j2 = client.post("/jobs", json={"lineage_id": lid, "dataset_id": ds[1]}).json()
        while not client.get(f"/jobs/{j2['id']}").json()["progress"]:  # past compilation
            time.sleep(0.1)
        training = _load(client, args.requests, args.threads, j2["id"], version, png)
        still = client.get(f"/jobs/{j2['id']}").json()["state"]
        _wait_job(client, j2["id"])
    finally:
        server.terminate()
        server.wait(30)
    result = {
        "what": "embedded service on loopback: status + predict (64x64 UNet 8-16-32), half each",
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "idle": idle,
        "while_training": {**training, "job_state_after": still},
        "command": "PYTHONPATH=. .venv/bin/python experiments/serve_load.py",
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
