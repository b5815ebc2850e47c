"""Object storage for the service: a local folder or an S3-compatible bucket, behind one protocol.

Every put verifies before it returns: the size and SHA-256 of what the store *now holds* must
equal those of what was sent, else ``StoreError``. Callers insert the database row describing an
object only after ``put_*`` returned its ``StoredObject``, so a crash (or a failed verify) leaves
at most an orphan object that no row points to (harmless, collectable), never a row pointing at a
missing or different object. Gets verify against the row's ``StoredObject`` (``expect``) for the
same reason from the other side: a row is a claim about bytes, checked before the bytes are used.

Keys are relative '/'-separated paths (see ``check_key``) so one key means the same object in a
folder and in a bucket. Hashes are streamed in 1 MiB chunks; files may be hundreds of MB.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

_CHUNK = 1 << 20
_KEY_RE = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int  # bytes
    sha256: str  # lowercase hex digest of the whole object


class StoreError(RuntimeError):
    """A store operation failed or an object did not verify. One line; never holds secrets."""


class ObjectStore(Protocol):
    def put_file(self, key: str, path: str | os.PathLike) -> StoredObject: ...
    def put_bytes(self, key: str, data: bytes) -> StoredObject: ...
    def get_file(
        self, key: str, path: str | os.PathLike, expect: StoredObject | None = None
    ) -> None: ...
    def get_bytes(self, key: str, expect: StoredObject | None = None) -> bytes: ...
    def stat(self, key: str) -> int | None: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str = "") -> Iterator[tuple[str, float]]: ...
    def describe(self) -> str: ...


def check_key(key: str) -> str:
    """Returns ``key`` if it is a safe object key, else raises a one-line ``ValueError``."""
    if not isinstance(key, str) or not 0 < len(key) <= 512 or not _KEY_RE.fullmatch(key):
        raise ValueError(
            f"invalid object key {str(key)[:80]!r}: want 1-512 chars of [A-Za-z0-9._-] segments "
            "joined by '/'"
        )
    if any(seg in (".", "..") for seg in key.split("/")):
        raise ValueError(f"invalid object key {key[:80]!r}: '.' and '..' segments not allowed")
    return key


def _hash_stream(chunks: Iterable[bytes], out: BinaryIO | None = None) -> tuple[int, str]:
    """(size, sha256 hex) of the concatenated chunks, copying them to ``out`` on the way."""
    h, n = hashlib.sha256(), 0
    for chunk in chunks:
        h.update(chunk)
        n += len(chunk)
        if out is not None:
            out.write(chunk)
    return n, h.hexdigest()


def _file_chunks(f: BinaryIO) -> Iterator[bytes]:
    return iter(lambda: f.read(_CHUNK), b"")


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return _hash_stream(_file_chunks(f))[1]


def _check(key: str, size: int, sha: str, expect: StoredObject | None, where: str) -> None:
    if expect is not None and (size, sha) != (expect.size, expect.sha256):
        raise StoreError(
            f"object {key} in {where} does not verify: got {size} bytes sha256 {sha[:12]}, "
            f"expected {expect.size} bytes sha256 {expect.sha256[:12]}"
        )


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(
    path: str, chunks: Iterable[bytes], key: str, expect: StoredObject | None, where: str
) -> tuple[int, str]:
    """Writes chunks to ``path`` via temp file + fsync + os.replace, after checking ``expect``;
    returns (size, sha256) of what was written.

    On mismatch or error the temp file is removed, so readers see the old file or none, never a
    partial or unverified one. The directory is fsynced too: until then a power loss may undo
    the rename, and a row committed after put must never outlive its object.
    """
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            size, sha = _hash_stream(chunks, f)
            f.flush()
            os.fsync(f.fileno())
        _check(key, size, sha, expect, where)
        os.replace(tmp, path)
        _fsync_dir(d)
        return size, sha
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class LocalStore:
    """Objects as files under ``root``; key ``a/b`` is ``root/a/b``."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.path.abspath(os.fspath(root))
        os.makedirs(self.root, exist_ok=True)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, check_key(key))

    def describe(self) -> str:
        return f"local folder {self.root}"

    def _put(self, key: str, chunks: Iterable[bytes]) -> StoredObject:
        dest = self._path(key)
        want = StoredObject(key, *_atomic_write(dest, chunks, key, None, self.describe()))
        d = os.path.dirname(dest)
        while d != self.root:  # dirs makedirs may just have created: their entries must stick
            d = os.path.dirname(d)
            _fsync_dir(d)
        # Re-read the stored file rather than trusting the write path: this is what gets served.
        with open(dest, "rb") as f:
            _check(key, *_hash_stream(_file_chunks(f)), want, self.describe())
        return want

    def put_file(self, key: str, path: str | os.PathLike) -> StoredObject:
        with open(path, "rb") as f:
            return self._put(key, _file_chunks(f))

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        return self._put(key, [bytes(data)])

    def _open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise StoreError(f"object {key} not found in {self.describe()}") from None

    def get_file(
        self, key: str, path: str | os.PathLike, expect: StoredObject | None = None
    ) -> None:
        with self._open(key) as f:
            _atomic_write(os.fspath(path), _file_chunks(f), key, expect, self.describe())

    def get_bytes(self, key: str, expect: StoredObject | None = None) -> bytes:
        with self._open(key) as f:
            data = f.read()
        _check(key, len(data), hashlib.sha256(data).hexdigest(), expect, self.describe())
        return data

    def stat(self, key: str) -> int | None:
        p = self._path(key)
        return os.path.getsize(p) if os.path.isfile(p) else None

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def list(self, prefix: str = "") -> Iterator[tuple[str, float]]:
        """``(key, modified UNIX seconds)`` of every object whose key starts with ``prefix``
        (temporary files of writes in flight are not objects)."""
        for d, _, files in os.walk(self.root):
            for name in files:
                if name.startswith("."):  # _atomic_write's temporary files
                    continue
                path = os.path.join(d, name)
                key = os.path.relpath(path, self.root).replace(os.sep, "/")
                if key.startswith(prefix):
                    try:
                        yield key, os.path.getmtime(path)
                    except FileNotFoundError:  # deleted meanwhile
                        continue


def _no_userinfo(url: str | None) -> str:
    if not url:
        return "the default AWS endpoint"
    u = urlsplit(url)
    return u._replace(netloc=u.netloc.rpartition("@")[2]).geturl()


class S3Store:
    """Objects in one bucket of an S3-compatible server (AWS, SeaweedFS, MinIO...), via boto3.

    Credentials: ``access_key``/``secret_key`` if given, else boto3's chain (env
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, config files...).
    """

    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        create_bucket: bool = False,
    ):
        import boto3  # lazy: only S3 users need boto3 installed
        from botocore.config import Config

        self.bucket, self.endpoint_url, self.region = bucket, endpoint_url, region
        cfg = Config(
            s3={"addressing_style": "path"},  # bucket-in-hostname needs DNS that local servers lack
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=120,
            # botocore's default CRC trailers break some S3-compatible servers; our own
            # end-to-end sha256 check below is stronger anyway.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=cfg,
        )
        if create_bucket and self._call("head bucket", "", self._client.head_bucket) is None:
            loc = {} if region == "us-east-1" else {"LocationConstraint": region}
            kw = {"CreateBucketConfiguration": loc} if loc else {}
            self._call("create bucket", "", self._client.create_bucket, **kw)

    def describe(self) -> str:
        return f"s3 bucket {self.bucket} at {_no_userinfo(self.endpoint_url)}"

    def _call(self, op: str, key: str, fn, /, **kw):
        """Runs a boto3 call; None on 404, StoreError (code only: messages may echo request
        details) on any other failure."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **({"Key": key} if key else {}), **kw)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "?")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404 and code != "NoSuchBucket":
                return None
            raise StoreError(
                f"s3 {op} {key or '(bucket)'} in {self.describe()} failed: {code} (HTTP {status})"
            ) from None
        except (BotoCoreError, Boto3Error) as e:  # Boto3Error: upload_file's S3UploadFailedError
            raise StoreError(
                f"s3 {op} {key or '(bucket)'} in {self.describe()} failed: {type(e).__name__}"
            ) from None

    def _chunks(self, key: str) -> Iterator[bytes]:
        """GETs now (so a missing key raises before any temp file exists); streams the body."""
        from botocore.exceptions import BotoCoreError

        r = self._call("get", check_key(key), self._client.get_object)
        if r is None:
            raise StoreError(f"object {key} not found in {self.describe()}")

        def body() -> Iterator[bytes]:
            try:
                yield from _file_chunks(r["Body"])
            except BotoCoreError as e:  # connection dropped, or body shorter than its length
                raise StoreError(
                    f"s3 get {key} in {self.describe()} failed mid-body: {type(e).__name__}"
                ) from None

        return body()

    def _verify(self, want: StoredObject) -> StoredObject:
        # Verification streams the object back and hashes it. Server-side ChecksumSHA256 is not
        # usable: SeaweedFS (like AWS) reports a COMPOSITE checksum ("<b64>-<parts>", a hash of
        # part hashes) for multipart uploads, which upload_file uses above 8 MB, and it only
        # exists when the client sent one. Reading back checks the bytes that will be served;
        # it costs one extra download (20 MB ~0.05 s on loopback).
        size = self.stat(want.key)
        if size != want.size:  # cheap HEAD first: a wrong size needs no download
            raise StoreError(
                f"object {want.key} in {self.describe()} does not verify: store holds "
                f"{'no object' if size is None else f'{size} bytes'}, sent {want.size} bytes"
            )
        _check(want.key, *_hash_stream(self._chunks(want.key)), want, self.describe())
        return want

    def put_file(self, key: str, path: str | os.PathLike) -> StoredObject:
        check_key(key)
        with open(path, "rb") as f:
            size, sha = _hash_stream(_file_chunks(f))
        # A file changing after hashing shows up as a verify failure, not silent corruption.
        self._call("upload", key, self._client.upload_file, Filename=os.fspath(path))
        return self._verify(StoredObject(key, size, sha))

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        check_key(key)
        data = bytes(data)
        self._call("put", key, self._client.put_object, Body=data)
        return self._verify(StoredObject(key, len(data), hashlib.sha256(data).hexdigest()))

    def get_file(
        self, key: str, path: str | os.PathLike, expect: StoredObject | None = None
    ) -> None:
        _atomic_write(os.fspath(path), self._chunks(key), key, expect, self.describe())

    def get_bytes(self, key: str, expect: StoredObject | None = None) -> bytes:
        data = b"".join(self._chunks(key))
        _check(key, len(data), hashlib.sha256(data).hexdigest(), expect, self.describe())
        return data

    def stat(self, key: str) -> int | None:
        r = self._call("head", check_key(key), self._client.head_object)
        return None if r is None else int(r["ContentLength"])

    def delete(self, key: str) -> None:
        self._call("delete", check_key(key), self._client.delete_object)

    def list(self, prefix: str = "") -> Iterator[tuple[str, float]]:
        """``(key, modified UNIX seconds)`` of every object whose key starts with ``prefix``."""
        pages = self._call(
            "list",
            "",
            lambda **kw: self._client.get_paginator("list_objects_v2").paginate(**kw),
            Prefix=prefix,
        )
        try:
            for page in pages or ():
                for o in page.get("Contents", ()):
                    yield o["Key"], o["LastModified"].timestamp()
        except Exception as e:  # the paginator's requests happen while iterating
            raise StoreError(
                f"s3 list {prefix or '(bucket)'} in {self.describe()} failed: {type(e).__name__}"
            ) from None


def make_store(url: str) -> ObjectStore:
    """``file:///abs/path`` or a plain path -> LocalStore;
    ``s3://bucket?endpoint=http://host:port&region=r`` -> S3Store (credentials: boto3's chain)."""
    forms = "use file:///abs/path, a plain path, or s3://bucket?endpoint=URL&region=NAME"
    if not isinstance(url, str) or not url:
        raise ValueError(f"empty store url; {forms}")
    if "://" not in url:
        return LocalStore(url)
    u = urlsplit(url)  # never echo the url itself: it may carry credentials
    if u.scheme == "file" and u.netloc in ("", "localhost") and u.path.startswith("/"):
        if u.query or u.fragment:
            raise ValueError(f"file store url takes no query or fragment; {forms}")
        return LocalStore(unquote(u.path))
    if u.scheme == "s3" and u.netloc and "@" not in u.netloc and u.path in ("", "/"):
        q = parse_qs(u.query, keep_blank_values=True)
        if set(q) - {"endpoint", "region"} or any(len(v) != 1 for v in q.values()):
            raise ValueError(f"s3 store url takes one endpoint= and one region= at most; {forms}")
        return S3Store(
            u.netloc,
            endpoint_url=q.get("endpoint", [None])[0] or None,
            region=q.get("region", ["us-east-1"])[0] or "us-east-1",
        )
    raise ValueError(f"unsupported store url (scheme {u.scheme!r}); {forms}")
