"""Where artifacts live: a local path or `s3://bucket/prefix` on any S3-compatible server.

`Location` names a file or folder and does the few things the stages need (exists, list, read,
atomic write, ranged reads, remove). Object stores go through `pyarrow.fs.S3FileSystem`, whose
endpoint comes from the `endpoint` argument, else `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`;
credentials and region from the usual `AWS_*` variables. Connect and request timeouts are short
and retries few, so an unreachable or refusing server is reported within seconds as a
`StorageError` that names the endpoint and the bucket (never the credentials).

A `Location` pickles without its live filesystem (it is rebuilt lazily in a Ray task); it carries
the S3 options it was created with, so credentials given as arguments reach the workers.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from retrack.errors import InputError, StorageError, redact

CONNECT_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 30.0
RETRY_ATTEMPTS = 2


@dataclass(frozen=True)
class S3Options:
    """How to reach an S3-compatible server. Unset fields fall back to the AWS_* environment."""

    endpoint: str | None = None  # "http://127.0.0.1:8333" or "host:port" (https assumed)
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    region: str | None = None
    connect_timeout: float = CONNECT_TIMEOUT_S
    request_timeout: float = REQUEST_TIMEOUT_S
    retries: int = RETRY_ATTEMPTS

    def resolved(self) -> "S3Options":
        env = os.environ
        return S3Options(
            endpoint=self.endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            access_key=self.access_key or env.get("AWS_ACCESS_KEY_ID"),
            secret_key=self.secret_key or env.get("AWS_SECRET_ACCESS_KEY"),
            region=self.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            connect_timeout=self.connect_timeout,
            request_timeout=self.request_timeout,
            retries=self.retries,
        )

    def describe(self) -> str:
        return self.endpoint or "the default AWS endpoint"

    def filesystem(self) -> pafs.S3FileSystem:
        o = self.resolved()
        kwargs: dict[str, Any] = dict(
            region=o.region,
            connect_timeout=o.connect_timeout,
            request_timeout=o.request_timeout,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=o.retries),
        )
        if o.endpoint:
            scheme, _, host = o.endpoint.rpartition("://")
            kwargs["endpoint_override"] = host.rstrip("/")
            kwargs["scheme"] = scheme or "https"
        if o.access_key and o.secret_key:
            kwargs["access_key"], kwargs["secret_key"] = o.access_key, o.secret_key
        # Without credentials the AWS SDK probes the EC2 metadata service (seconds of timeouts).
        os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
        return pafs.S3FileSystem(**kwargs)


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


@dataclass(frozen=True)
class FileEntry:
    location: "Location"
    size: int
    mtime_ns: int

    @property
    def name(self) -> str:
        return self.location.name


@dataclass(frozen=True)
class Location:
    """A file or folder, local or on S3. `loc / "name"` descends; methods raise StorageError."""

    uri: str
    s3: S3Options = field(default_factory=S3Options)

    @classmethod
    def parse(cls, uri: "str | os.PathLike | Location", endpoint: str | None = None, s3: S3Options | None = None) -> "Location":
        if isinstance(uri, Location):
            return uri
        text = str(uri)
        opts = s3 or S3Options(endpoint=endpoint)
        if is_s3(text):
            bucket = text[5:].split("/", 1)[0]
            if not bucket:
                raise StorageError(f"{text!r} names no bucket (expected s3://bucket/prefix)")
            return cls(text.rstrip("/") if text.count("/") > 2 else text, opts)
        return cls(str(Path(text).expanduser().absolute()), opts)

    # -- naming ----------------------------------------------------------------------------
    @property
    def is_s3(self) -> bool:
        return is_s3(self.uri)

    @property
    def bucket(self) -> str | None:
        return self.uri[5:].split("/", 1)[0] if self.is_s3 else None

    @property
    def path(self) -> str:
        """The path inside the filesystem (`bucket/key` for S3)."""
        return self.uri[5:] if self.is_s3 else self.uri

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def __truediv__(self, part: str) -> "Location":
        if ".." in part.split("/"):  # a name from a request must not climb out of its root
            raise InputError(f"storage path {part!r} under {self.uri} contains '..'")
        return Location(self.uri.rstrip("/") + "/" + part.strip("/"), self.s3)

    def __str__(self) -> str:
        return self.uri

    def relative_to(self, other: "Location") -> str:
        base = other.uri.rstrip("/") + "/"
        if not self.uri.startswith(base):
            raise ValueError(f"{self.uri} is not under {other.uri}")
        return self.uri[len(base):]

    def __getstate__(self):
        return {"uri": self.uri, "s3": self.s3}

    def __setstate__(self, state):
        object.__setattr__(self, "uri", state["uri"])
        object.__setattr__(self, "s3", state["s3"])

    # -- filesystem ------------------------------------------------------------------------
    @property
    def fs(self) -> pafs.FileSystem:
        cached = self.__dict__.get("_fs")
        if cached is None:
            cached = self.s3.filesystem() if self.is_s3 else pafs.LocalFileSystem()
            object.__setattr__(self, "_fs", cached)
        return cached

    def where(self) -> str:
        if self.is_s3:
            return f"bucket {self.bucket!r} at {self.s3.resolved().describe()}"
        return "the local filesystem"

    def storage_error(self, action: str, exc: BaseException) -> StorageError:
        """The StorageError of `action` on this location failing with `exc` (credentials redacted)."""
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return StorageError(redact(f"cannot {action} {self.uri} ({self.where()}): {msg}"))

    def info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path)
        except (OSError, pa.ArrowException) as exc:
            raise self.storage_error("look up", exc) from None

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def size(self) -> int:
        info = self.info()
        if info.type != pafs.FileType.File:
            raise StorageError(f"{self.uri} ({self.where()}) is not a file")
        return int(info.size)

    def check_reachable(self) -> None:
        """Raise StorageError now if the bucket (or local parent) cannot be reached or is refused."""
        if not self.is_s3:
            return
        root = Location(f"s3://{self.bucket}", self.s3)
        info = root.info()
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"bucket {self.bucket!r} does not exist at {self.s3.resolved().describe()}")

    def list(self, suffixes: tuple[str, ...] | None = None, recursive: bool = True, hidden: bool = False) -> list[FileEntry]:
        """Files under this folder (sorted by path); hidden names ('.', '_') are skipped unless `hidden`."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True))
        except (OSError, pa.ArrowException) as exc:
            raise self.storage_error("list", exc) from None
        out = []
        base = self.path.rstrip("/") + "/"
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            rel = info.path[len(base):] if info.path.startswith(base) else info.base_name
            if not hidden and any(part.startswith((".", "_")) for part in rel.split("/")):
                continue
            if suffixes and not rel.lower().endswith(tuple(s.lower() for s in suffixes)):
                continue
            loc = Location(("s3://" + info.path) if self.is_s3 else info.path, self.s3)
            out.append(FileEntry(loc, int(info.size), int(info.mtime_ns or 0)))
        return sorted(out, key=lambda e: e.location.uri)

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError:
            raise StorageError(f"{self.uri} ({self.where()}) does not exist") from None
        except (OSError, pa.ArrowException) as exc:
            raise self.storage_error("read", exc) from None

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_json(self) -> Any:
        return json.loads(self.read_text())

    def open_input(self) -> pa.NativeFile:
        """A random-access file (ranged GETs on S3)."""
        try:
            return self.fs.open_input_file(self.path)
        except FileNotFoundError:
            raise StorageError(f"{self.uri} ({self.where()}) does not exist") from None
        except (OSError, pa.ArrowException) as exc:
            raise self.storage_error("open", exc) from None

    def write_bytes(self, data: bytes) -> None:
        """Atomic: readers see the old object or the whole new one, never a part.

        Local files are written to a temporary name in the same folder and renamed; an S3 PUT is
        atomic by itself (the object appears only when the upload completes).
        """
        if self.is_s3:
            try:
                with self.fs.open_output_stream(self.path) as f:
                    f.write(data)
            except (OSError, pa.ArrowException) as exc:
                raise self.storage_error("write", exc) from None
            return
        target = Path(self.path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise self.storage_error("write", exc) from None

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def write_json(self, obj: Any) -> None:
        self.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))

    def open_output(self) -> pa.NativeFile:
        """A plain (non-atomic) output stream; pair it with a completion marker written after."""
        try:
            if not self.is_s3:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            return self.fs.open_output_stream(self.path)
        except (OSError, pa.ArrowException) as exc:
            raise self.storage_error("write", exc) from None

    def makedirs(self) -> None:
        if self.is_s3:
            return  # prefixes need not be created
        try:
            Path(self.path).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self.storage_error("create", exc) from None

    def remove(self, missing_ok: bool = True) -> None:
        """Delete this file, or this folder and everything under it."""
        try:
            info = self.fs.get_file_info(self.path)
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(self.path)
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(self.path)
            elif self.is_s3:  # a "folder" on S3 may exist only through its keys
                self.fs.delete_dir_contents(self.path, missing_dir_ok=True)
            elif not missing_ok:
                raise StorageError(f"{self.uri} does not exist")
        except (OSError, pa.ArrowException) as exc:
            raise self.storage_error("delete", exc) from None

    def iter_chunks(self, chunk: int = 1 << 20) -> Iterator[bytes]:
        try:
            with self.fs.open_input_stream(self.path) as f:
                while True:
                    data = f.read(chunk)
                    if not data:
                        return
                    yield data
        except FileNotFoundError:
            raise StorageError(f"{self.uri} ({self.where()}) does not exist") from None
        except (OSError, pa.ArrowException) as exc:
            raise self.storage_error("read", exc) from None


def location(uri: "str | os.PathLike | Location", endpoint: str | None = None) -> Location:
    return Location.parse(uri, endpoint=endpoint)


def unique_suffix() -> str:
    return uuid.uuid4().hex[:12]
