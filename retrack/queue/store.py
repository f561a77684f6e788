"""Where the queue's files live: a local directory or an S3 prefix, with the two atomic writes
a claim needs (create-if-absent, replace-if-unchanged); see `retrack.queue` for why."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from retrack.errors import StorageError
from retrack.storage.location import Location, S3Options


@dataclass(frozen=True)
class Versioned:
    data: bytes
    version: str  # an opaque token: the S3 ETag, or a digest of a local file's content


class Store:
    """The few operations the queue needs; keys are '/'-separated paths under the queue root."""

    def get(self, key: str) -> Versioned | None:
        raise NotImplementedError

    def create(self, key: str, data: bytes) -> str | None:
        """Write `key` only if it does not exist; its version, or None when it exists."""
        raise NotImplementedError

    def replace(self, key: str, data: bytes, version: str) -> str | None:
        """Overwrite `key` only if it still has `version`; the new version, or None."""
        raise NotImplementedError

    def put(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def delete(self, key: str, version: str | None = None) -> bool:
        """Delete `key` (only if it still has `version`, when given); False if it did not."""
        raise NotImplementedError

    def list(self, folder: str) -> list[str]:
        """Names of the files directly in `folder`, sorted."""
        raise NotImplementedError

    def check_atomic(self) -> None:
        """Raise StorageError when create/replace cannot be trusted to be atomic here."""

    def describe(self) -> str:
        raise NotImplementedError


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class LocalStore(Store):
    """A directory on a local (POSIX) filesystem."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the queue directory {self.root}: {exc.strerror}") from None

    def describe(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _temp(self, target: Path, data: bytes) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return Path(tmp)

    def get(self, key: str) -> Versioned | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self._path(key)}: {exc.strerror}") from None
        return Versioned(data, _digest(data))

    def create(self, key: str, data: bytes) -> str | None:
        target = self._path(key)
        tmp = self._temp(target, data)
        try:
            os.link(tmp, target)  # atomic, and fails if the name exists: the file appears complete
        except FileExistsError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):  # no hard links here
                with self._locked():
                    if target.exists():
                        return None
                    os.replace(tmp, target)
                    return _digest(data)
            raise StorageError(f"cannot create {target}: {exc.strerror}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return _digest(data)

    def replace(self, key: str, data: bytes, version: str) -> str | None:
        target = self._path(key)
        with self._locked():
            current = self.get(key)
            if current is None or current.version != version:
                return None
            os.replace(self._temp(target, data), target)
        return _digest(data)

    def put(self, key: str, data: bytes) -> None:
        target = self._path(key)
        try:
            os.replace(self._temp(target, data), target)
        except OSError as exc:
            raise StorageError(f"cannot write {target}: {exc.strerror}") from None

    def delete(self, key: str, version: str | None = None) -> bool:
        target = self._path(key)
        with self._locked():
            if version is not None:
                current = self.get(key)
                if current is None or current.version != version:
                    return False
            try:
                target.unlink()
            except FileNotFoundError:
                return False
        return True

    def list(self, folder: str) -> list[str]:
        d = self._path(folder)
        try:
            return sorted(p.name for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot list {d}: {exc.strerror}") from None


class S3Store(Store):
    """A prefix in an S3 bucket, through boto3 (pyarrow has no conditional writes)."""

    def __init__(self, location: Location):
        import boto3
        from botocore.config import Config

        opts: S3Options = location.s3.resolved()
        endpoint = opts.endpoint
        if endpoint and "://" not in endpoint:
            endpoint = "https://" + endpoint
        self.bucket = location.bucket
        self.prefix = location.path.split("/", 1)[1].strip("/") if "/" in location.path else ""
        self.uri = location.uri
        self.endpoint = opts.describe()
        os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=opts.access_key,
            aws_secret_access_key=opts.secret_key,
            region_name=opts.region,
            config=Config(
                connect_timeout=opts.connect_timeout,
                read_timeout=opts.request_timeout,
                retries={"max_attempts": opts.retries, "mode": "standard"},
            ),
        )

    def describe(self) -> str:
        return f"{self.uri} (at {self.endpoint})"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @staticmethod
    def _code(exc: Exception) -> str:
        return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))

    def _fail(self, action: str, key: str, exc: Exception) -> StorageError:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return StorageError(f"cannot {action} s3://{self.bucket}/{self._key(key)} (at {self.endpoint}): {msg}")

    def _call(self, action: str, key: str, fn: Callable[[], Any], refused: tuple[str, ...] = ()) -> Any:
        """`fn()`, None when the server answers one of the `refused` codes, else StorageError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as exc:
            if self._code(exc) in refused:
                return None
            raise self._fail(action, key, exc) from None
        except BotoCoreError as exc:
            raise self._fail(action, key, exc) from None

    def get(self, key: str) -> Versioned | None:
        def fetch():
            r = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return Versioned(r["Body"].read(), r["ETag"])

        return self._call("read", key, fetch, refused=("NoSuchKey", "404"))

    def create(self, key: str, data: bytes) -> str | None:
        r = self._call(
            "create", key,
            lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*"),
            refused=("PreconditionFailed", "412", "ConditionalRequestConflict", "409"),
        )
        return None if r is None else r["ETag"]

    def replace(self, key: str, data: bytes, version: str) -> str | None:
        r = self._call(
            "replace", key,
            lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfMatch=version),
            refused=("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"),
        )
        return None if r is None else r["ETag"]

    def put(self, key: str, data: bytes) -> None:
        self._call("write", key, lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data))

    def delete(self, key: str, version: str | None = None) -> bool:
        kwargs = {"IfMatch": version} if version is not None else {}
        r = self._call(
            "delete", key,
            lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key), **kwargs),
            refused=("PreconditionFailed", "412", "NoSuchKey", "404"),
        )
        return r is not None

    def list(self, folder: str) -> list[str]:
        base = self._key(folder).rstrip("/") + "/"

        def names():
            out = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base, Delimiter="/"):
                out += [o["Key"][len(base):] for o in page.get("Contents", [])]
            return out

        return sorted(n for n in self._call("list", folder, names) if n and not n.startswith("."))

    def check_atomic(self) -> None:
        """Conditional writes are what make claims exclusive: refuse a server that ignores them."""
        key = f"_probe/{uuid.uuid4().hex}"
        first = self.create(key, b"1")
        second = self.create(key, b"2") if first is not None else None
        stale = self.replace(key, b"3", '"0123456789abcdef0123456789abcdef"') if first is not None else None
        self._call("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)), refused=("NoSuchKey", "404"))
        if first is None or second is not None or stale is not None:
            raise StorageError(
                f"the S3 server at {self.endpoint} does not honour conditional writes (If-None-Match / If-Match on PutObject): "
                "two overlapping queue runs could process a request twice, so the queue refuses to run there"
            )


def open_store(uri: str, endpoint: str | None = None) -> Store:
    loc = Location.parse(uri, endpoint=endpoint)
    return S3Store(loc) if loc.is_s3 else LocalStore(loc.path)
