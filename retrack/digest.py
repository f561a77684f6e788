"""Content digests used for lineage, cache keys and manifests (sha256, hex)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ids_digest(ids: Iterable[str]) -> str:
    """Order-independent digest of a set of ids: what lineage records instead of the ids themselves."""
    h = hashlib.sha256()
    for i in sorted(ids):
        h.update(i.encode())
        h.update(b"\n")
    return h.hexdigest()


def config_digest(obj: Any) -> str:
    """Digest of a JSON-able configuration, independent of key order."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def directory_digest(root: str | Path) -> str:
    """Digest of every file's relative path and content under `root`."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(b"\0")
        with path.open("rb") as f:
            hashlib.file_digest(f, lambda: h)  # the content goes into the running digest
    return h.hexdigest()
