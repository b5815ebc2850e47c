"""clseg_jax.serve.store against a local folder and a real S3 server (SeaweedFS ``weed mini``),
plus smoke tests of the redis and postgres fixtures the other serve tests use."""

# ruff: noqa: F811  (fixture arguments shadow the fixtures imported from tests.serve_servers)

from __future__ import annotations

import hashlib
import os
import uuid

import pytest

from clseg_jax.serve import store as st
from clseg_jax.serve.store import (
    LocalStore,
    S3Store,
    StoredObject,
    StoreError,
    check_key,
    make_store,
    sha256_file,
)
from tests.serve_servers import postgres_url, redis_url, s3_store_env  # noqa: F401


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> st.ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "objects")
    return S3Store(**request.getfixturevalue("s3_store_env"))


def _key(name: str) -> str:  # tests share one bucket: keys must not collide
    return f"t/{uuid.uuid4().hex}/{name}"


def _raw_s3(env: dict):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=env["endpoint_url"],
        region_name="us-east-1",
        aws_access_key_id=env["access_key"],
        aws_secret_access_key=env["secret_key"],
        config=Config(s3={"addressing_style": "path"}),
    )


def _leftovers(d) -> list[str]:
    return sorted(os.listdir(d))


def test_round_trip_bytes(store, tmp_path):
    key, data = _key("a.bin"), b"hello \x00 world" * 1000
    obj = store.put_bytes(key, data)
    assert obj == StoredObject(key, len(data), hashlib.sha256(data).hexdigest())
    assert store.stat(key) == len(data)
    assert store.get_bytes(key, expect=obj) == data
    assert store.get_bytes(key) == data
    out = tmp_path / "out" / "a.bin"  # parent dir is created
    store.get_file(key, out, expect=obj)
    assert out.read_bytes() == data
    assert _leftovers(out.parent) == ["a.bin"]  # no temp files left behind
    store.put_bytes(key, b"")  # overwrite; empty objects are legal
    assert store.stat(key) == 0 and store.get_bytes(key) == b""
    store.delete(key)
    assert store.stat(key) is None
    store.delete(key)  # absent is fine
    with pytest.raises(StoreError, match="not found"):
        store.get_bytes(key)
    with pytest.raises(StoreError, match="not found"):
        store.get_file(key, tmp_path / "missing.bin")
    assert not (tmp_path / "missing.bin").exists()


def test_big_file_round_trip(store, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(20 << 20))  # above boto3's 8 MB multipart threshold
    key = _key("big.bin")
    obj = store.put_file(key, src)
    assert obj.size == 20 << 20 and obj.sha256 == sha256_file(src)
    assert obj.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "back.bin"
    store.get_file(key, dest, expect=obj)
    assert sha256_file(dest) == obj.sha256
    store.delete(key)


def test_get_with_wrong_expectation_raises_and_writes_nothing(store, tmp_path):
    key = _key("x")
    obj = store.put_bytes(key, b"0123456789")
    wrong_sha = StoredObject(key, obj.size, hashlib.sha256(b"other").hexdigest())
    wrong_size = StoredObject(key, obj.size + 1, obj.sha256)
    (tmp_path / "dl").mkdir()
    for bad in (wrong_sha, wrong_size):
        with pytest.raises(StoreError, match="does not verify"):
            store.get_bytes(key, expect=bad)
        with pytest.raises(StoreError, match="does not verify"):
            store.get_file(key, tmp_path / "dl" / "x", expect=bad)
        assert _leftovers(tmp_path / "dl") == []


def test_get_keeps_old_file_when_verification_fails(store, tmp_path):
    key = _key("x")
    obj = store.put_bytes(key, b"new")
    dest = tmp_path / "x"
    dest.write_bytes(b"old")
    with pytest.raises(StoreError):
        store.get_file(key, dest, expect=StoredObject(key, obj.size, "0" * 64))
    assert dest.read_bytes() == b"old"


def test_local_corruption_behind_the_store_is_caught(tmp_path):
    s = LocalStore(tmp_path / "objects")
    obj = s.put_bytes("m/w.bin", b"A" * 100)
    path = tmp_path / "objects" / "m" / "w.bin"
    path.write_bytes(b"A" * 99 + b"B")  # same size, one byte flipped
    with pytest.raises(StoreError, match="does not verify"):
        s.get_bytes("m/w.bin", expect=obj)
    with pytest.raises(StoreError, match="does not verify"):
        s.get_file("m/w.bin", tmp_path / "w.bin", expect=obj)
    assert not (tmp_path / "w.bin").exists()
    path.write_bytes(b"A" * 50)  # truncated
    with pytest.raises(StoreError, match="50 bytes"):
        s.get_bytes("m/w.bin", expect=obj)


def test_s3_bucket_creation_and_missing_bucket(s3_store_env):
    env = dict(s3_store_env, bucket="made-" + uuid.uuid4().hex[:8])
    with pytest.raises(StoreError, match="NoSuchBucket"):
        S3Store(**env).put_bytes("k", b"x")  # a put into no bucket must not look like success
    s = S3Store(**env, create_bucket=True)
    assert s.get_bytes("k", expect=s.put_bytes("k", b"x")) == b"x"
    S3Store(**env, create_bucket=True)  # existing bucket is fine


def test_s3_corruption_behind_the_store_is_caught(s3_store_env, tmp_path):
    s = S3Store(**s3_store_env)
    key = _key("w.bin")
    obj = s.put_bytes(key, b"A" * 100)
    _raw_s3(s3_store_env).put_object(Bucket=s.bucket, Key=key, Body=b"A" * 99 + b"B")
    assert s.stat(key) == 100  # size alone cannot tell
    with pytest.raises(StoreError, match="does not verify"):
        s.get_bytes(key, expect=obj)
    with pytest.raises(StoreError, match="does not verify"):
        s.get_file(key, tmp_path / "w.bin", expect=obj)
    assert not (tmp_path / "w.bin").exists()


def test_local_put_verifies_what_landed(tmp_path, monkeypatch):
    s = LocalStore(tmp_path / "objects")
    real_replace = os.replace

    def replace_then_corrupt(src, dst):  # e.g. a disk or a concurrent writer garbling the file
        real_replace(src, dst)
        with open(dst, "r+b") as f:
            f.write(b"Z")

    monkeypatch.setattr(os, "replace", replace_then_corrupt)
    with pytest.raises(StoreError, match="does not verify"):
        s.put_bytes("k", b"payload")


def test_s3_put_verifies_what_landed(s3_store_env, tmp_path):
    s = S3Store(**s3_store_env)
    key = _key("p.bin")
    real_upload = s._client.upload_file
    # Uploads a different file than asked for, as a broken proxy or a racing writer would.
    decoy = tmp_path / "decoy.bin"
    decoy.write_bytes(b"B" * 1000)
    s._client.upload_file = lambda Filename, **kw: real_upload(Filename=str(decoy), **kw)
    src = tmp_path / "src.bin"
    src.write_bytes(b"A" * 1000)
    with pytest.raises(StoreError, match="does not verify"):
        s.put_file(key, src)
    decoy.write_bytes(b"B" * 999)  # and a size mismatch is caught by HEAD
    with pytest.raises(StoreError, match="999 bytes"):
        s.put_file(key, src)


def test_s3_errors_carry_no_secrets(s3_store_env, tmp_path):
    bad = dict(s3_store_env, secret_key="wrong-" + s3_store_env["secret_key"])
    s = S3Store(**bad)
    (tmp_path / "f").write_bytes(b"x")
    puts = [lambda: s.put_bytes(_key("x"), b"x"), lambda: s.put_file(_key("x"), tmp_path / "f")]
    for put in puts:
        with pytest.raises(StoreError, match=r"SignatureDoesNotMatch|S3UploadFailedError") as e:
            put()
        msg = str(e.value)
        assert "\n" not in msg and s3_store_env["bucket"] in msg
        for secret in (bad["secret_key"], s3_store_env["secret_key"], s3_store_env["access_key"]):
            assert secret not in msg and secret not in s.describe()
    down = S3Store("nobucket", endpoint_url="http://127.0.0.1:9", access_key="a", secret_key="b")
    with pytest.raises(StoreError, match="EndpointConnectionError"):  # nothing listens on :9
        down.stat("x")


@pytest.mark.parametrize(
    "key", ["a", "a/b/c.npz", "runs/7/ckpt-00012.orbax", "A-Z_0.9", ".hidden", "x" * 512]
)
def test_check_key_accepts(key):
    assert check_key(key) == key


@pytest.mark.parametrize(
    "key",
    ["", "/abs", "a/../b", "..", ".", "a/./b", "a//b", "a/", "a b", "a\\b", "é", "a\nb",
     "x" * 513, "../../etc/passwd", None],
)  # fmt: skip
def test_check_key_rejects(key, tmp_path):
    with pytest.raises(ValueError, match="invalid object key"):
        check_key(key)
    s = LocalStore(tmp_path / "objects")
    with pytest.raises(ValueError):
        s.put_bytes(key, b"x")
    assert _leftovers(tmp_path) == ["objects"] and _leftovers(tmp_path / "objects") == []


def test_make_store_parses_both_forms(tmp_path, s3_store_env, monkeypatch):
    s = make_store(f"file://{tmp_path}/a")
    assert isinstance(s, LocalStore) and s.root == str(tmp_path / "a")
    s = make_store(str(tmp_path / "b"))
    assert isinstance(s, LocalStore) and s.describe() == f"local folder {tmp_path / 'b'}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_store_env["access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_store_env["secret_key"])
    ep = s3_store_env["endpoint_url"]
    s = make_store(f"s3://{s3_store_env['bucket']}?endpoint={ep}&region=us-east-1")
    assert isinstance(s, S3Store) and s.describe() == f"s3 bucket {s.bucket} at {ep}"
    key = _key("env.bin")
    assert s.get_bytes(key, expect=s.put_bytes(key, b"via env")) == b"via env"
    s = make_store("s3://other?region=eu-west-1")
    assert (s.bucket, s.endpoint_url, s.region) == ("other", None, "eu-west-1")


@pytest.mark.parametrize(
    "url",
    ["", "http://x/y", "ftp://h/p", "file://host/x", "file://rel", "s3://", "s3://b/prefix",
     "s3://b?foo=1", "s3://b?region=a&region=b", "s3://key:s3cr3t@b"],
)  # fmt: skip
def test_make_store_rejects(url):
    with pytest.raises(ValueError, match="file:///abs/path") as e:
        make_store(url)
    assert "s3cr3t" not in str(e.value)


def test_redis_fixture(redis_url):
    import redis

    r = redis.Redis.from_url(redis_url)
    assert r.ping() and r.set("k", "v") and r.get("k") == b"v"


def test_postgres_fixture(postgres_url):
    import sqlalchemy as sa

    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as c:
            assert c.execute(sa.text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()
