"""The three corpus formats read from a real S3 server (SeaweedFS), the WebDataset reader against
`ray.data.read_webdataset`, and the index stage on Ray from WebDataset shards on S3."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from retrack.data.source import iter_file_batches, scan_corpus
from retrack.errors import CorpusError
from retrack.index import build_index, open_index
from retrack.storage.location import Location
from tests.fixtures.corpora import corpus_rows, write_formats, write_webdataset

pytestmark = pytest.mark.integration


def all_rows(plan) -> list[tuple[str, bytes | None, str | None]]:
    return [row for f in plan.files for b in iter_file_batches(plan, f, 128) for row in zip(b.ids, b.images, b.captions)]


@pytest.fixture(scope="module")
def formats(bench, tmp_path_factory):
    """400 captioned benchmark items in the three formats (an image folder is a PUT and a GET per item)."""
    rows = list(corpus_rows(bench.corpus, captions=True))[:400]
    return rows, write_formats(rows, tmp_path_factory.mktemp("formats"), shard_size=100)


def test_the_three_formats_on_s3_give_the_local_rows(s3_env, formats):
    rows, dirs = formats
    run = uuid.uuid4().hex[:8]
    want = sorted((r["id"], r["image"], r["caption"]) for r in rows)
    for name, local in dirs.items():
        uri = s3_env.upload_dir(local, f"{run}/{name}")
        plan = scan_corpus(uri, name)
        assert plan.root.is_s3 and plan.count == len(rows) and plan.has_captions
        assert sorted(all_rows(plan)) == want, name
        assert plan.digest() != scan_corpus(local, name).digest()  # the S3 copy's own mtimes
    bad = s3_env.upload_dir(dirs["webdataset"], f"{run}/bad")
    Location.parse(bad + "/shard-00002.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(CorpusError, match="shard shard-00002.tar is not a readable tar archive"):
        scan_corpus(bad, "webdataset")


def ray_rows(ray, uri: str) -> list[tuple[str, bytes | None, str | None]]:
    """(id, image, caption) of each sample as `ray.data.read_webdataset` groups it (no decoding)."""
    loc = Location.parse(uri)
    ds = ray.data.read_webdataset(loc.path, filesystem=loc.fs, decoder=None)
    out = []
    for r in ds.take_all():
        image = next((r[e] for e in ("jpg", "jpeg", "png", "webp") if isinstance(r.get(e), bytes)), None)
        caption = r["txt"].decode() if isinstance(r.get("txt"), bytes) else None
        if caption is None and isinstance(r.get("json"), bytes):
            record = json.loads(r["json"])
            caption = record.get("caption", record.get("text"))
        out.append((r["__key__"], image, caption))
    return out


@pytest.mark.parametrize("caption_in", ["txt", "json"])
def test_the_webdataset_reader_gives_read_webdataset_rows(ray_local, s3_env, bench, tmp_path, caption_in):
    rows = list(corpus_rows(bench.corpus, captions=True))[:700]
    local = write_webdataset(rows, tmp_path / "wds", shard_size=250, caption_in=caption_in)
    uri = s3_env.upload_dir(local, f"{uuid.uuid4().hex[:8]}/wds")
    ours = all_rows(scan_corpus(uri, "webdataset"))
    assert len(ours) == 700
    assert sorted(ray_rows(ray_local, uri)) == sorted(ours)


def test_the_ray_index_from_webdataset_on_s3_matches_the_local_loop(ray_local, s3_env, formats, tmp_path):
    from pipelines.index import build

    rows, dirs = formats
    run = uuid.uuid4().hex[:8]
    uri = s3_env.upload_dir(dirs["webdataset"], f"{run}/wds")
    on_ray = build(uri, s3_env.uri(f"{run}/idx"), rows_per_chunk=200, format="webdataset")
    local = build_index(dirs["parquet"], tmp_path / "idx", rows_per_chunk=200)
    assert on_ray.manifest.count == local.manifest.count == len(rows)
    a, b = open_index(s3_env.uri(f"{run}/idx")), open_index(tmp_path / "idx")
    pos = {i: n for n, i in enumerate(b.ids.to_pylist())}
    order = np.array([pos[i] for i in a.ids.to_pylist()])
    np.testing.assert_array_equal(a.vectors(np.arange(len(rows))), b.vectors(order))


def test_a_corpus_of_many_shards_has_its_id_table_written_by_ray_as_in_one_process(ray_local, s3_env, tmp_path, monkeypatch):
    """40 parquet shards on S3 (3 groups of files), the id table in 4 buckets: the table Ray tasks and
    Ray Data write equals the in-process one (every id at its file and row), as do the listing
    digest and the file starts; a duplicate id across two groups and an unreadable shard are
    refused as in one process, naming the id and the shard, and leave no complete table. (The
    Ray path is the same for every format; WebDataset shards take it in `tests/e2e/test_cluster.py`.)"""
    layout = "parquet"
    import retrack.data.id_table as id_table
    from pipelines.corpus_ids import RayScan
    from retrack.data.source import SCAN_GROUPS_FROM
    from retrack.training.prepare import read_corpus_index
    from tests.fixtures.corpora import write_corpus

    monkeypatch.setattr(id_table, "BUCKET_IDS", 40)  # 160 ids: 4 buckets
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (160, 8, 8), dtype=np.uint8)
    ids = write_corpus(tmp_path / "c", images, shard_size=4, layout=layout)
    uri = s3_env.upload_dir(tmp_path / "c", f"{uuid.uuid4().hex[:8]}/c")
    roots = {m: Location.parse(s3_env.uri(f"{uuid.uuid4().hex[:8]}/ids")) for m in ("here", "there")}
    here = read_corpus_index(uri, layout, None, (8, 8, 1), roots["here"])
    there = read_corpus_index(uri, layout, None, (8, 8, 1), roots["there"], RayScan())
    assert len(there.source.files) == 40 >= SCAN_GROUPS_FROM and there.ids.buckets == 4
    assert list(there.starts) == list(here.starts) and there.source.digest() == here.source.digest()
    for corpus in (here, there):
        assert corpus.positions(ids[::-1] + ["no-such-id"]).tolist() == list(range(159, -1, -1)) + [-1]
    assert [there.ids.bucket(b).read_bytes() for b in range(4)] == [here.ids.bucket(b).read_bytes() for b in range(4)]

    ids[150] = ids[2]  # the first group's id again in the last group
    write_corpus(tmp_path / "dup", images, ids=ids, shard_size=4, layout=layout)
    dup = s3_env.upload_dir(tmp_path / "dup", f"{uuid.uuid4().hex[:8]}/dup")
    with pytest.raises(CorpusError, match=f"occur more than once.*{ids[2]}"):
        read_corpus_index(dup, layout, None, (8, 8, 1), roots["there"], RayScan())
    completes = [e.location.uri for e in roots["there"].list(hidden=True) if e.location.name == "_complete.json"]
    assert completes == [(there.ids.root / "_complete.json").uri]  # the refused corpus's table is not complete
    bad = sorted((e.location for e in Location.parse(dup).list() if e.location.name.endswith((".parquet", ".tar"))), key=lambda loc: loc.name)[-1]
    bad.write_bytes(b"not a shard")  # in the last group
    with pytest.raises(CorpusError, match=bad.name):
        read_corpus_index(dup, layout, None, (8, 8, 1), roots["there"], RayScan())
