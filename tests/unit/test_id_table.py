"""The id table's lookup: the row groups it reads are the ones that can hold the ids asked for."""

from __future__ import annotations

import pyarrow.parquet as pq

from retrack.data.id_table import ROW_GROUP, IdTable, _row_groups, id_rows
from retrack.storage.location import Location


def test_a_lookup_finds_ids_at_every_row_group_edge_and_reads_only_their_groups(tmp_path):
    ids = [f"item-{i:06d}" for i in range(5 * ROW_GROUP)]
    table = IdTable(Location.parse(tmp_path), 1, len(ids))
    table.write_bucket(0, id_rows([("a.parquet", ids[: 2 * ROW_GROUP]), ("b.parquet", ids[2 * ROW_GROUP :])]), "corpus")
    meta = pq.ParquetFile(table.bucket(0).path).metadata
    assert meta.num_row_groups == 5
    edges = [ids[0], ids[ROW_GROUP - 1], ids[ROW_GROUP], ids[3 * ROW_GROUP - 1], ids[-1]]
    absent = ["a", "item-000000x", "zzz"]  # before the first id, between two, after the last
    found = {r["id"]: (r["file"], r["row"]) for r in table.find(edges + absent).to_pylist()}
    assert found == {ids[0]: ("a.parquet", 0), ids[ROW_GROUP - 1]: ("a.parquet", ROW_GROUP - 1), ids[ROW_GROUP]: ("a.parquet", ROW_GROUP),
                     ids[3 * ROW_GROUP - 1]: ("b.parquet", ROW_GROUP - 1), ids[-1]: ("b.parquet", 3 * ROW_GROUP - 1)}
    assert _row_groups(meta, [ids[ROW_GROUP + 5], ids[4 * ROW_GROUP]]) == [1, 4]
    assert _row_groups(meta, ["a"]) == []
