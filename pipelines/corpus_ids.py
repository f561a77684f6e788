"""The corpus scan on Ray (`retrack.data.source.scan_corpus_ids`' runner): each group of files is
scanned by a task that returns the files' metadata to the driver and leaves its rows of the id
table in the object store; Ray Data then groups those rows by bucket and writes each bucket where
it is grouped, checking it for repeated ids. The driver holds the files' metadata and one object
reference per group, never an id."""

from __future__ import annotations

from typing import Callable, Iterable

import pyarrow as pa

from pipelines.items import materialized
from pipelines.progress import ray_data_progress
from pipelines.runtime import ensure_ray, get
from retrack.data.id_table import IdTable, with_bucket
from retrack.data.source import ScanGroup


class RayScan:
    def __init__(self, address: str | None = None, retries: int = 3):
        self.address, self.retries = address, retries

    def scan(self, fn: ScanGroup, groups: list) -> Iterable[tuple[list, object]]:
        ray = ensure_ray(self.address)
        task = ray.remote(num_cpus=1, max_retries=self.retries, num_returns=2)(_scan_group)
        for files, rows in [task.remote(fn, g) for g in groups]:
            yield get(files), rows

    def write_ids(self, table: IdTable, handles: list, corpus: str) -> None:
        import ray

        ray_data_progress(ray.data.DataContext.get_current())
        ds = ray.data.from_arrow_refs(handles).map_batches(with_bucket, batch_format="pyarrow", fn_kwargs={"buckets": table.buckets})
        materialized(ds.groupby("bucket").map_groups(_write_bucket, batch_format="pyarrow",
                                                      fn_kwargs={"table": table, "corpus": corpus}))


def _scan_group(fn: Callable, group: list) -> tuple:
    return fn(group)


def _write_bucket(rows: pa.Table, table: IdTable, corpus: str) -> pa.Table:
    b = rows.column("bucket")[0].as_py()
    table.write_bucket(b, rows, corpus)
    return pa.table({"bucket": [b], "ids": [rows.num_rows]})
