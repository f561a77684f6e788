"""The corpus's id table: each id's place (the file that holds it, its row there), kept on storage
in hash buckets, so that a corpus's ids never sit in one process. It is written as the corpus is
scanned (by Ray tasks for a corpus of many files: `pipelines.corpus_ids`), each bucket checked for
repeated ids as it is written; a lookup of a few ids (a forget set, a request's neighbours, the
items an evaluation names) reads only the buckets those ids hash to, and of those the footer and
the row groups of 1,024 ids that can hold them.

Layout: `<root>/bucket-NNNNN.parquet`, rows (id, file: its path relative to the corpus root,
row), sorted by id, then `<root>/_complete.json` (buckets, count, and what the scan found of each
file: a later scan of the same listing reads it instead of the files), written last: a table
without it is partial and is never read. A bucket no id hashes to has no file.
"""

from __future__ import annotations

import bisect
import hashlib
import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retrack.errors import CorpusError
from retrack.storage.location import Location

BUCKET_IDS = 1_000_000  # ids per bucket, on average
ROW_GROUP = 1024  # ids per row group: a lookup reads, of each bucket it needs, the footer and a row group per id
SCHEMA = pa.schema([("id", pa.string()), ("file", pa.string()), ("row", pa.int64())])
COMPLETE = "_complete.json"


def id_hash(ids: Sequence[str]) -> np.ndarray:
    """8 bytes of blake2b per id: stable across processes and Python versions (unlike `hash`)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids),
        dtype=np.uint64,
        count=len(ids),
    )


def bucket_count(count: int) -> int:
    return max(1, -(-count // BUCKET_IDS))


def id_rows(files: Sequence[tuple[str, Sequence[str]]]) -> pa.Table:
    """The id-table rows of corpus files: (path relative to the corpus root, its ids in row order)."""
    ids = [i for _, f in files for i in f]
    return pa.table({
        "id": pa.array(ids, pa.string()),
        "file": pa.array([rel for rel, f in files for _ in f], pa.string()),
        "row": pa.array(np.concatenate([np.arange(len(f), dtype=np.int64) for _, f in files]) if files else np.zeros(0, np.int64)),
    })


def with_bucket(table: pa.Table, buckets: int) -> pa.Table:
    """The rows with the bucket each id hashes to (column `bucket`)."""
    b = id_hash(table.column("id").to_pylist()) % np.uint64(buckets)
    return table.append_column("bucket", pa.array(b.astype(np.int64)))


@dataclass(frozen=True)
class IdTable:
    root: Location
    buckets: int
    count: int  # ids in the corpus

    def bucket(self, b: int) -> Location:
        return self.root / f"bucket-{b:05d}.parquet"

    def write_bucket(self, b: int, rows: pa.Table, corpus: str) -> None:
        """Write bucket `b` (rows with any extra columns, dropped); an id it holds twice is refused,
        naming a few (corpus ids, never a forget set's)."""
        rows = rows.select(SCHEMA.names).cast(SCHEMA)
        counts = rows.group_by("id").aggregate([("id", "count")])
        repeated = counts.filter(pc.greater(counts.column("id_count"), 1)).column("id").to_pylist()
        if repeated:
            raise CorpusError(f"{len(repeated)} id(s) occur more than once in the corpus {corpus}, e.g. {sorted(repeated)[:3]}")
        sink = io.BytesIO()
        pq.write_table(rows.sort_by("id"), sink, row_group_size=ROW_GROUP, write_statistics=["id"])
        self.bucket(b).write_bytes(sink.getvalue())

    def mark_complete(self, files: list[dict]) -> None:
        """Seal the table, with the scan's record of each corpus file (JSON-able)."""
        (self.root / COMPLETE).write_json({"buckets": self.buckets, "count": self.count, "files": files})

    @classmethod
    def open(cls, root: Location) -> "tuple[IdTable, list[dict]] | None":
        """The complete table at `root` and its files' record; None if there is none (or only a
        partial one)."""
        marker = root / COMPLETE
        if not marker.exists():
            return None
        meta = marker.read_json()
        return cls(root, int(meta["buckets"]), int(meta["count"])), meta["files"]

    def find(self, ids: Sequence[str]) -> pa.Table:
        """The rows (id, file, row) of those of the given ids the corpus holds, read from their
        buckets only, and of each only the row groups that can hold them (`_row_groups`)."""
        ids = list(ids)
        if not ids:
            return SCHEMA.empty_table()
        wanted = pa.array(ids, pa.string())
        of = id_hash(ids) % np.uint64(self.buckets)
        parts = []
        for b in np.unique(of):
            loc = self.bucket(int(b))
            if not loc.exists():
                continue
            want = pc.filter(wanted, pa.array(of == b))
            with loc.open_input() as f:
                pf = pq.ParquetFile(f)
                rows = pf.read_row_groups(_row_groups(pf.metadata, want.to_pylist()), columns=SCHEMA.names)
            parts.append(rows.filter(pc.is_in(rows.column("id"), value_set=want)))
        return pa.concat_tables(parts).cast(SCHEMA) if parts else SCHEMA.empty_table()


def _row_groups(meta: pq.FileMetaData, ids: list[str]) -> list[int]:
    """The row groups of a bucket (sorted by id) that can hold the given ids, by each group's
    smallest id; all of them where a group has no statistics."""
    column = meta.schema.names.index("id")
    stats = [meta.row_group(g).column(column).statistics for g in range(meta.num_row_groups)]
    if any(s is None or not s.has_min_max for s in stats):
        return list(range(meta.num_row_groups))
    firsts = [s.min for s in stats]
    return sorted({bisect.bisect_right(firsts, i) - 1 for i in ids} - {-1})


def write_id_table(table: IdTable, files: Sequence[pa.Table], corpus: str) -> None:
    """Write every bucket in this process (a corpus of few files) from its files' rows."""
    rows = with_bucket(pa.concat_tables(files) if files else SCHEMA.empty_table(), table.buckets)
    bucket = rows.column("bucket").to_numpy()
    for b in np.unique(bucket):
        table.write_bucket(int(b), rows.filter(pa.array(bucket == b)), corpus)
