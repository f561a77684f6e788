"""Folders moved between a process's local disk and storage (local path or s3://), for outputs a
process builds locally (a model, a report) and inputs it reads whole (a small file set). Files
are streamed (pyarrow's `copy_files`), never held whole in memory.

An upload writes `last` (a completion marker) after every other file, so a reader that checks
the marker never takes a partial folder for a complete one."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from retrack.storage.location import Location

_LOCAL = pafs.LocalFileSystem()


def _copy(src_path: str, src_fs: pafs.FileSystem, dest: Location, dest_path: str, dest_fs: pafs.FileSystem) -> None:
    try:
        pafs.copy_files(src_path, dest_path, source_filesystem=src_fs, destination_filesystem=dest_fs)
    except (OSError, pa.ArrowException) as exc:
        raise dest.storage_error("write", exc) from None


def upload_tree(src: str | Path, dest: Location, last: str | None = None) -> None:
    """Copy the files under `src` (or the file `src`) to `dest`; `last` (relative) goes last."""
    src = Path(src)
    if src.is_file():
        _copy(str(src), _LOCAL, dest, dest.path, dest.fs)
        return
    dest.makedirs()
    files = sorted(p for p in src.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.relative_to(src).as_posix() == last)  # stable: the marker moves to the end
    for f in files:
        to = dest / f.relative_to(src).as_posix()
        if not to.is_s3:
            Path(to.path).parent.mkdir(parents=True, exist_ok=True)
        _copy(str(f), _LOCAL, to, to.path, to.fs)


def download_tree(src: Location, dest: str | Path) -> Path:
    """Copy the file or folder at `src` to `dest` (hidden names included); returns `dest`."""
    dest = Path(dest)
    entries = [None] if src.is_file() else src.list(hidden=True)
    for e in entries:
        loc = src if e is None else e.location
        out = dest if e is None else dest / loc.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            pafs.copy_files(loc.path, str(out), source_filesystem=loc.fs, destination_filesystem=_LOCAL)
        except (OSError, pa.ArrowException) as exc:
            raise loc.storage_error("read", exc) from None
    return dest
