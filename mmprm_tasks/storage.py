"""Object store: one small interface, two implementations, one URI scheme.

``LocalStore`` keeps objects under a directory (the embedded default); ``S3Store`` talks to MinIO
or any S3 server through the ``minio`` SDK.  Objects are addressed by key inside the configured
bucket/root, and by URI across stores: ``s3://bucket/key`` or ``file:///abs/path``.
Content-addressed puts (images, datasets) make re-runs idempotent: the same bytes land once.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

from .settings import Settings, TimeoutConfig


class ObjectNotFound(KeyError):
    """The key is not in the store."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ObjectStore(ABC):
    """Byte objects under string keys (``a/b/c.json``)."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """Store ``data`` under ``key`` (overwriting) and return the object's URI."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; :class:`ObjectNotFound` when absent."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def iter_keys(self, prefix: str = "") -> Iterator[str]: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; absent keys are not an error (deletes are idempotent)."""

    @abstractmethod
    def uri(self, key: str) -> str: ...

    # Everything below is built on the five primitives, so both stores behave identically.

    def list_keys(self, prefix: str = "") -> list[str]:
        return sorted(self.iter_keys(prefix))

    def put_json(self, key: str, obj: Any) -> str:
        data = json.dumps(obj, ensure_ascii=False, sort_keys=False).encode()
        return self.put_bytes(key, data, "application/json")

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def iter_lines(self, key: str) -> Iterator[str]:
        """The object's non-blank lines (paths, candidates); the stores read them as a stream."""
        yield from (line for line in self.get_bytes(key).decode().splitlines() if line.strip())

    def get_jsonl(self, key: str) -> list[Any]:
        """The object's non-blank lines, each parsed as JSON (paths, candidates)."""
        return [json.loads(line) for line in self.get_bytes(key).decode().splitlines() if line.strip()]

    def put_file(self, key: str, path: str | os.PathLike[str], content_type: str = "application/octet-stream") -> str:
        return self.put_bytes(key, Path(path).read_bytes(), content_type)

    def get_file(self, key: str, path: str | os.PathLike[str]) -> Path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.get_bytes(key))
        return target

    def put_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> str:
        """Upload every file under ``local_dir`` to ``prefix/<relative path>``; returns the prefix URI."""
        root = Path(local_dir)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            self.put_file(f"{prefix.rstrip('/')}/{path.relative_to(root).as_posix()}", path)
        return self.uri(prefix.rstrip("/") + "/")

    def get_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> Path:
        """Download every object under ``prefix/`` into ``local_dir`` (inverse of :meth:`put_dir`)."""
        root = Path(local_dir)
        base = prefix.rstrip("/") + "/"
        keys = self.list_keys(base)
        if not keys:
            raise ObjectNotFound(f"no objects under {self.uri(base)}")
        for key in keys:
            self.get_file(key, root / key[len(base):])
        return root

    def put_content_addressed(self, prefix: str, data: bytes, suffix: str = "", content_type: str = "application/octet-stream") -> str:
        """Store ``data`` at ``prefix/<sha256><suffix>`` unless already there; return the key."""
        key = f"{prefix.rstrip('/')}/{sha256_hex(data)}{suffix}"
        if not self.exists(key):
            self.put_bytes(key, data, content_type)
        return key


# S3 limits a key to 1,024 bytes.
MAX_KEY_BYTES = 1024


def check_key(key: str) -> str:
    """``key`` when it names an object the same way in both stores: relative ``a/b/c`` parts,
    none empty, ``.`` or ``..``, no backslash (a Windows separator S3 servers read differently),
    no control character; ValueError naming the key otherwise."""
    from .validation import escape_text, text_problem

    parts = key.rstrip("/").split("/")
    if (not key or key.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\\" in key
            or text_problem(key) or len(key.encode(errors="surrogatepass")) > MAX_KEY_BYTES):
        raise ValueError(f"invalid object key {escape_text(key)}: use relative 'a/b/c' keys without empty, '.' "
                         f"or '..' parts, backslashes or control characters, at most {MAX_KEY_BYTES} bytes")
    return key


def is_request_error(exc: Exception) -> bool:
    """An S3 error about the request itself (a key or argument the server refuses), which no retry
    can fix, as opposed to the server failing (5xx) or being unreachable."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status", None)
    return isinstance(status, int) and 400 <= status < 500 and getattr(exc, "code", None) not in (
        "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "RequestTimeTooSkewed")


TEMPORARY_PREFIX = ".tmp-"
# A temporary file this old was left by a writer that died (a live one renames it in seconds).
STALE_TEMPORARY_S = 3600.0


class LocalStore(ObjectStore):
    """Objects as files under a root directory; writes are atomic (temp file + rename).

    A writer killed between the two leaves its temporary file behind; the first write into a
    directory (per store object) removes the ones older than :data:`STALE_TEMPORARY_S`, so
    leftovers do not pile up and the scan costs one directory listing, not one per write."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True):
        self.root = Path(root).resolve()
        if create:  # a store opened to read what a URI names creates nothing
            self.root.mkdir(parents=True, exist_ok=True)
        self._swept: set[Path] = set()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _sweep_stale_temporaries(self, directory: Path) -> None:
        if directory in self._swept:
            return
        self._swept.add(directory)
        cutoff = time.time() - STALE_TEMPORARY_S
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith(TEMPORARY_PREFIX) and entry.is_file(follow_symlinks=False):
                    try:
                        if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                            os.unlink(entry.path)
                    except FileNotFoundError:
                        pass  # a peer swept it first

    def _write(self, key: str, fill: Callable[[BinaryIO], object]) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._sweep_stale_temporaries(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMPORARY_PREFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                fill(handle)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.uri(key)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        return self._write(key, lambda handle: handle.write(data))

    def put_file(self, key: str, path: str | os.PathLike[str], content_type: str = "application/octet-stream") -> str:
        def copy(handle: BinaryIO) -> None:
            with open(path, "rb") as source:
                shutil.copyfileobj(source, handle)

        return self._write(key, copy)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(self.uri(key)) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def iter_lines(self, key: str) -> Iterator[str]:
        try:
            handle = self._path(key).open(encoding="utf-8")
        except FileNotFoundError:
            raise ObjectNotFound(self.uri(key)) from None
        with handle:
            yield from (line.rstrip("\n") for line in handle if line.strip())

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        for path in self.root.rglob("*"):
            if path.is_file() and not path.name.startswith(TEMPORARY_PREFIX):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def uri(self, key: str) -> str:
        return (self.root / key).as_uri() if key else self.root.as_uri() + "/"


def s3_http_client(timeouts: TimeoutConfig) -> Any:
    """The S3 client's connection pool: a frozen or silent server fails a request after the
    configured time-outs instead of stalling the task; connection errors and 5xx answers are
    retried a bounded number of times with back-off.  (minio's default waits 5 minutes per try.)"""
    import urllib3

    retries = urllib3.Retry(total=timeouts.s3_retries, connect=timeouts.s3_retries, read=timeouts.s3_retries,
                            backoff_factor=0.2, status_forcelist=[500, 502, 503, 504], raise_on_status=False)
    return urllib3.PoolManager(timeout=urllib3.Timeout(connect=timeouts.s3_connect_s, read=timeouts.s3_read_s),
                               maxsize=16, retries=retries)


class S3Store(ObjectStore):
    """A bucket on MinIO or any S3-compatible server, through the ``minio`` SDK."""

    def __init__(self, client: Any, bucket: str, *, create_bucket: bool = True):
        self.client = client
        self.bucket = bucket
        if create_bucket and not client.bucket_exists(bucket_name=bucket):
            client.make_bucket(bucket_name=bucket)

    @classmethod
    def from_settings(cls, settings: Settings, *, create_bucket: bool = True) -> "S3Store":
        from minio import Minio

        cfg = settings.store
        if not cfg.access_key or cfg.secret_key is None or not cfg.secret_key.get_secret_value():
            raise ValueError("the s3 object store needs credentials: set MMPRM_STORE__ACCESS_KEY and "
                             "MMPRM_STORE__SECRET_KEY (there are no defaults)")
        client = Minio(
            endpoint=cfg.endpoint,
            access_key=cfg.access_key,
            secret_key=cfg.secret_key.get_secret_value(),
            secure=cfg.secure,
            region=cfg.region,
            http_client=s3_http_client(settings.timeouts),
        )
        return cls(client, cfg.bucket, create_bucket=create_bucket)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        self.client.put_object(
            bucket_name=self.bucket, object_name=check_key(key), data=io.BytesIO(data),
            length=len(data), content_type=content_type,
        )
        return self.uri(key)

    def put_file(self, key: str, path: str | os.PathLike[str], content_type: str = "application/octet-stream") -> str:
        # Streamed from disk; large files go up as a multipart upload.
        self.client.fput_object(bucket_name=self.bucket, object_name=check_key(key), file_path=str(path),
                                content_type=content_type)
        return self.uri(key)

    def _open(self, key: str) -> Any:
        """The object's response (read it, then close and release it); ObjectNotFound if absent."""
        from minio.error import S3Error

        try:
            return self.client.get_object(bucket_name=self.bucket, object_name=check_key(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise ObjectNotFound(self.uri(key)) from None
            raise

    def get_bytes(self, key: str) -> bytes:
        response = self._open(key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def iter_lines(self, key: str) -> Iterator[str]:
        response = self._open(key)
        try:
            rest = b""
            for chunk in response.stream(1 << 20):
                *lines, rest = (rest + chunk).split(b"\n")
                yield from (line.decode() for line in lines if line.strip())
            if rest.strip():
                yield rest.decode()
        finally:
            response.close()
            response.release_conn()

    def exists(self, key: str) -> bool:
        from minio.error import S3Error

        try:
            self.client.stat_object(bucket_name=self.bucket, object_name=check_key(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise
        return True

    def iter_keys(self, prefix: str = "") -> Iterator[str]:
        for obj in self.client.list_objects(bucket_name=self.bucket, prefix=prefix or None, recursive=True):
            if not obj.is_dir:
                yield obj.object_name

    def delete(self, key: str) -> None:
        self.client.remove_object(bucket_name=self.bucket, object_name=check_key(key))

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


def location(store: ObjectStore, key: str | None, uri: str | None) -> str:
    """Where a registered object is now.  The platform's own objects are recorded by their key in
    the store, never by the store's URI, so a home or a bucket can move (copy it, point the
    settings at the copy); an object registered from elsewhere keeps the path or URI it came with."""
    if key is not None:
        return store.uri(key)
    if uri is None:
        raise ValueError("a registered object needs a key or a URI")
    return uri


def open_store(settings: Settings) -> ObjectStore:
    """The store the settings describe."""
    if settings.store.kind == "s3":
        return S3Store.from_settings(settings)
    return LocalStore(settings.store_root)


def open_uri(uri: str, settings: Settings) -> tuple[ObjectStore, str]:
    """Resolve ``s3://bucket/key`` or ``file:///abs/path`` to a store and a key within it (for
    reading what a URI names: a bucket is never created here)."""
    from .settings import ConfigurationError

    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if settings.store.kind != "s3":
            raise ConfigurationError(f"{uri}: s3:// URI but the configured store is {settings.store.kind!r}")
        store = S3Store.from_settings(settings.with_overrides({"store.bucket": parsed.netloc}), create_bucket=False)
        return store, parsed.path.lstrip("/")
    if parsed.scheme == "file":
        path = Path(parsed.path)
        local = LocalStore(settings.store_root, create=False)
        try:
            return local, path.resolve().relative_to(local.root).as_posix()
        except ValueError:
            return LocalStore(path.parent, create=False), path.name
    raise ConfigurationError(f"unsupported object URI {uri!r}: expected s3://bucket/key or file:///path")
