"""Parquet shards (`*.parquet`): columns `id` (string), `image` (encoded bytes), optional `caption`
and `label` (an integer class). The scan reads each footer and the `id` and
`caption` columns only, never the images."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrack.data.formats.base import RowBatch, Scanned, SourceFile
from retrack.errors import CorpusError
from retrack.storage.location import FileEntry, Location

NAME = "parquet"
WHAT = "parquet shards (*.parquet)"
SCANS_BY_FILE = True  # each shard's ids are its own: shards scan independently


def _unreadable(rel: str, exc: BaseException) -> CorpusError:
    return CorpusError(f"shard {rel} cannot be read as parquet: {str(exc).splitlines()[0]}")


def _read_columns(loc: Location, rel: str) -> tuple[list[str], int, int]:
    """(ids, rows with a caption, rows with a label) of one shard, after checking its columns and ids."""
    try:
        with loc.open_input() as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            missing = {"id", "image"} - names
            if missing:
                raise CorpusError(f"shard {rel} lacks column(s) {sorted(missing)}; a corpus needs 'id' and 'image'")
            table = pf.read(columns=[c for c in ("id", "caption", "label") if c in names])
    except CorpusError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _unreadable(rel, exc) from None
    ids = table.column("id")
    if ids.null_count:
        raise CorpusError(f"shard {rel}: {ids.null_count} row(s) have no id")
    values = ids.to_pylist()
    empty = sum(1 for v in values if not v)
    if empty:
        raise CorpusError(f"shard {rel}: {empty} row(s) have an empty id")
    if not values:
        raise CorpusError(f"shard {rel} is empty")
    present = {c: len(values) - table.column(c).null_count if c in table.column_names else 0 for c in ("caption", "label")}
    return values, present["caption"], present["label"]


def scan(root: Location, entries: list[FileEntry], on_bad: str) -> Iterator[Scanned]:
    for e in entries:
        if not e.location.name.endswith(".parquet"):
            continue
        rel = e.location.relative_to(root)
        ids, captioned, labelled = _read_columns(e.location, rel)
        yield Scanned(SourceFile(e.location.uri, rel, e.size, e.mtime_ns, len(ids), captioned, labelled=labelled), ids)


def ids(loc: Location, f: SourceFile) -> list[str]:
    return _read_columns(loc, f.rel)[0]


def _row_batch(batch: pa.RecordBatch | pa.Table, columns: list[str]) -> RowBatch:
    ids = batch.column("id").to_pylist()
    col = {c: batch.column(c).to_pylist() if c in columns else [None] * len(ids) for c in ("image", "caption", "label")}
    return RowBatch(ids, col["image"], col["caption"], col["label"])


def _columns(pf: pq.ParquetFile, images: bool) -> list[str]:
    """The columns read: without `images`, the image column's pages are never fetched."""
    return [c for c in ("id", *(["image"] if images else []), "caption", "label") if c in pf.schema_arrow.names]


def read(loc: Location, f: SourceFile, batch_size: int, images: bool = True) -> Iterator[RowBatch]:
    try:
        with loc.open_input() as fh:
            pf = pq.ParquetFile(fh)
            columns = _columns(pf, images)
            for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
                yield _row_batch(batch, columns)
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(f.rel, exc) from None


def read_rows(loc: Location, f: SourceFile, rows: Sequence[int], images: bool = True) -> Iterator[RowBatch]:
    """The given rows of one shard (positions, ascending): only the row groups holding them are
    fetched (ranged reads on S3), so a few rows of a large shard cost a few row groups."""
    rows = np.asarray(rows, dtype=np.int64)
    try:
        with loc.open_input() as fh:
            pf = pq.ParquetFile(fh)
            columns = _columns(pf, images)
            start = 0
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                local = rows[(rows >= start) & (rows < start + n)] - start
                if len(local):
                    yield _row_batch(pf.read_row_group(g, columns=columns).take(local), columns)
                start += n
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(f.rel, exc) from None
