"""The per-node model cache: a model given as an s3:// URI is copied once per node into a local
folder named by the digest of the URI and its object listing (keys, sizes, modification times),
and every process on the node reuses that copy; a model rewritten at the same URI is copied anew.

Processes that want the same model at once (the Ray workers of one node) take an exclusive
`fcntl` lock on the copy's lock file: the first copies, the others wait and find the copy
complete. A copy is built under a temporary name and renamed into place with its completion
marker inside, so a reader never sees a partial model. The lock dies with its process, so a copy
killed midway leaves only a temporary folder, which the next holder of the lock removes.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from retrack.errors import InputError, StorageError

COMPLETE_MARKER = ".complete"


def default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "retrack-models"


def cache_path(uri: str, cache_dir: str | Path | None = None, endpoint: str | None = None, s3=None) -> Path:
    """Where this node keeps its copy of the model now at `uri` (one LIST request)."""
    listing = _listing_digest(uri, endpoint, s3)
    return Path(cache_dir or default_cache_dir()) / hashlib.sha256(f"{uri}\n{listing}".encode()).hexdigest()[:16]


def _listing_digest(uri: str, endpoint: str | None, s3) -> str:
    """One LIST request: what the model folder holds now."""
    from retrack.digest import config_digest
    from retrack.storage.location import Location

    root = Location.parse(uri, endpoint=endpoint, s3=s3)
    entries = [(e.location.relative_to(root), e.size, e.mtime_ns) for e in root.list(hidden=True)]
    if not entries:
        raise InputError(f"model directory {uri} is empty or does not exist ({root.where()})")
    return config_digest(entries)


def local_model_dir(uri: str | Path, cache_dir: str | Path | None = None, endpoint: str | None = None, s3=None) -> Path:
    """A local directory for a model given as a local path or an s3:// URI (endpoint and
    credentials from `endpoint` / `s3` / the AWS_* environment, see retrack.storage.location).
    A remote directory is copied once per node into `cache_dir` and reused."""
    text = str(uri)
    if "://" not in text:
        return Path(text)
    if not text.startswith("s3://"):
        raise InputError(f"model directory {text}: only local paths and s3:// URIs are supported")
    dest = cache_path(text, cache_dir, endpoint, s3)
    if (dest / COMPLETE_MARKER).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f"{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when its process dies
        if (dest / COMPLETE_MARKER).is_file():  # another process copied it while this one waited
            return dest
        for stale in dest.parent.glob(f".{dest.name}.download.*"):  # left by a process killed mid-copy
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.download.", dir=dest.parent))
        try:
            _copy(text, tmp, endpoint, s3)
            (tmp / COMPLETE_MARKER).write_text(text)
            if dest.exists():  # a folder without the marker: not written by this module, replace it
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def _copy(uri: str, out: Path, endpoint: str | None, s3) -> None:
    import pyarrow.fs as pafs

    from retrack.storage.location import Location

    try:
        loc = Location.parse(uri, endpoint=endpoint, s3=s3)
        pafs.copy_files(loc.path, str(out), source_filesystem=loc.fs, destination_filesystem=pafs.LocalFileSystem())
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot copy model directory {uri}: {exc}") from None
