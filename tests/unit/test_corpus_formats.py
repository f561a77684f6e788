"""The three corpus formats (parquet, imagefolder, webdataset): the same rows for the same corpus,
captions, and a specific refusal of each kind of bad input, at the scan where it can be."""

from __future__ import annotations

import json
import re
import tarfile

import numpy as np
import pyarrow as pa
import pytest

from retrack.data.corpus import encode_image
from retrack.data.source import FORMATS, iter_file_batches, require_captions, scan_corpus
from retrack.errors import CaptionsMissingError, CorpusError, InputError, StorageError
from retrack.index import build_index, open_index
from retrack.storage.location import Location
from tests.fixtures.corpora import (
    WRITERS, add_member, clustered_images, corpus_rows, write_formats, write_imagefolder, write_webdataset,
)


def all_rows(plan, batch_size: int = 100) -> list[tuple[str, bytes | None, str | None]]:
    return [row for f in plan.files for b in iter_file_batches(plan, f, batch_size) for row in zip(b.ids, b.images, b.captions)]


def all_labels(plan) -> dict[str, int | None]:
    return {i: lab for f in plan.files for b in iter_file_batches(plan, f, 100) for i, lab in zip(b.ids, b.labels)}


@pytest.fixture(scope="module")
def captioned(bench, tmp_path_factory):
    """The embedded benchmark corpus, captioned, in all three formats (shards of 300 rows)."""
    rows = list(corpus_rows(bench.corpus, captions=True))
    return rows, write_formats(rows, tmp_path_factory.mktemp("formats"), shard_size=300)


def test_the_three_formats_give_the_same_rows(captioned):
    rows, dirs = captioned
    want = [(r["id"], r["image"], r["caption"]) for r in rows]
    plans = {name: scan_corpus(d, name) for name, d in dirs.items()}
    for name, plan in plans.items():
        assert plan.format == name and plan.count == len(rows) and plan.has_captions
        assert plan.image_shape == (8, 8, 1)
        got = all_rows(plan)
        assert sorted(got) == sorted(want), name
        assert all_labels(plan) == {r["id"]: r["label"] for r in rows}, name  # class labels for the pixel evaluation
    # Shards keep the corpus order; an image folder lists its files by path (here: the id order).
    assert all_rows(plans["parquet"]) == all_rows(plans["webdataset"]) == want
    assert [len(p.files) for p in plans.values()] == [6, len(rows), 6]
    assert plans["parquet"].digest() != plans["webdataset"].digest()


def test_the_same_index_from_every_format(captioned, tmp_path):
    """One job, three formats: the same ids and vectors in the index."""
    rows, dirs = captioned
    built = {name: build_index(d, tmp_path / name, rows_per_chunk=600, format=name) for name, d in dirs.items()}
    assert {b.manifest.corpus["format"] for b in built.values()} == set(FORMATS)
    indexes = {name: open_index(tmp_path / name) for name in dirs}
    ids = {name: idx.ids.to_pylist() for name, idx in indexes.items()}
    assert sorted(ids["parquet"]) == sorted(ids["imagefolder"]) == sorted(ids["webdataset"]) == sorted(r["id"] for r in rows)
    ref = indexes["parquet"].vectors(np.arange(len(rows)))
    for name in ("imagefolder", "webdataset"):
        pos = {i: n for n, i in enumerate(ids[name])}
        np.testing.assert_array_equal(indexes[name].vectors(np.array([pos[i] for i in ids["parquet"]])), ref)


def test_webdataset_batches_and_json_captions(tmp_path):
    rows = [{"id": f"s{n:03d}", "image": encode_image(im), "caption": f"caption {n}"} for n, im in enumerate(clustered_images(23))]
    write_webdataset(rows, tmp_path / "wds", shard_size=10, caption_in="json")
    plan = scan_corpus(tmp_path / "wds", "webdataset")
    assert [f.rows for f in plan.files] == [10, 10, 3] and plan.has_captions
    sizes = [len(b.ids) for f in plan.files for b in iter_file_batches(plan, f, 4)]
    assert sizes == [4, 4, 2, 4, 4, 2, 3]
    assert all_rows(plan) == [(r["id"], r["image"], r["caption"]) for r in rows]


def test_imagefolder_metadata_in_subfolders(tmp_path):
    """ids with '/' land in subfolders, each with its own metadata.jsonl; a root metadata file
    may also describe an image in a subfolder (file_name relative to the metadata file)."""
    images = clustered_images(6)
    rows = [{"id": i, "image": encode_image(im), "caption": f"c{n}"} for n, (i, im) in enumerate(zip(
        ["a/x0", "a/x1", "b/deep/x2", "b/deep/x3", "top4", "top5"], images))]
    root = write_imagefolder(rows, tmp_path / "imgs")
    assert (root / "b" / "deep" / "metadata.jsonl").is_file()
    # Move the caption of b/deep/x3 into the root metadata (named relative to the root).
    deep = (root / "b" / "deep" / "metadata.jsonl").read_text().splitlines()
    (root / "b" / "deep" / "metadata.jsonl").write_text(deep[0] + "\n")
    with (root / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "b/deep/x3.png", "caption": "c3"}) + "\n")
    plan = scan_corpus(root, "imagefolder")
    assert sorted(all_rows(plan)) == sorted((r["id"], r["image"], r["caption"]) for r in rows)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def test_require_captions_refuses_a_corpus_without_them(bench, tmp_path):
    rows = list(corpus_rows(bench.corpus, captions=False))[:40]
    dirs = write_formats(rows, tmp_path, captions=False, shard_size=20)
    for name, d in dirs.items():
        plan = scan_corpus(d, name)
        assert not plan.has_captions and plan.captioned == 0
        assert all(c is None for _, _, c in all_rows(plan))
        with pytest.raises(CaptionsMissingError, match="40 of 40 item\\(s\\) have no caption") as err:
            require_captions(plan)
        assert err.value.code == "input.corpus.captions"
    with pytest.raises(CaptionsMissingError, match="an image folder.*metadata.jsonl line for every image"):
        require_captions(scan_corpus(dirs["imagefolder"], "imagefolder"))


def test_one_image_without_a_caption_is_counted(tmp_path):
    rows = [{"id": f"p{n}", "image": encode_image(im), "caption": f"c{n}"} for n, im in enumerate(clustered_images(5))]
    root = write_imagefolder(rows, tmp_path / "imgs")
    meta = root / "metadata.jsonl"
    meta.write_text("".join(line + "\n" for line in meta.read_text().splitlines() if '"p3.png"' not in line))
    plan = scan_corpus(root, "imagefolder")
    assert plan.captioned == 4 and not plan.has_captions
    assert dict((i, c) for i, _, c in all_rows(plan))["p3"] is None
    with pytest.raises(CaptionsMissingError, match="1 of 5 item"):
        require_captions(plan, "evaluation.holdout_uri")


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def small_rows(n: int = 6, prefix: str = "k") -> list[dict]:
    return [{"id": f"{prefix}{i:02d}", "image": encode_image(im), "caption": f"c{i}"} for i, im in enumerate(clustered_images(n))]


def write_tar(path, members: list[tuple[str, bytes]]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)


def test_webdataset_sample_without_an_image_fails_or_is_reported(tmp_path):
    rows = small_rows()
    root = write_webdataset(rows, tmp_path / "wds", shard_size=3)
    png = rows[0]["image"]
    write_tar(root / "shard-00001.tar", [("k03.png", png), ("k04.txt", b"no image here"), ("k05.png", png), ("k05.txt", b"x")])
    with pytest.raises(CorpusError, match="shard shard-00001.tar: sample 'k04' has no image"):
        scan_corpus(root, "webdataset")
    plan = scan_corpus(root, "webdataset", on_bad="skip")
    assert plan.count == 6 and plan.captioned == 5  # k03 has no caption, k04 no image
    res = build_index(root, tmp_path / "idx", on_bad="skip", format="webdataset")
    assert res.manifest.count == 5 and res.manifest.skipped == 1
    report = [json.loads(line) for line in (tmp_path / "idx" / "bad_rows.jsonl").read_text().splitlines()]
    assert [(r["id"], r["source"]) for r in report] == [("k04", "shard-00001.tar")] and "no image bytes" in report[0]["reason"]


@pytest.mark.parametrize("members,message", [
    ([("a.png", b"1"), ("b.png", b"2"), ("a.txt", b"x")], "members of sample 'a' are not consecutive"),
    ([("a.png", b"1"), ("a.jpg", b"2")], "sample 'a' has 2 images \\(jpg, png\\)"),
    ([("a.png", b"1"), ("a.png", b"2")], "sample 'a' has two 'png' members"),
    ([("a.png", b"1"), ("a.txt", b"\xff\xfe")], "sample 'a': its caption is not UTF-8 text"),
    ([("a.png", b"1"), ("a.json", b"{oops")], "sample 'a': its json member is not valid JSON"),
    ([("a.png", b"1"), ("a.json", b'{"caption": 3}')], "field 'caption' is a int"),
    ([("README", b"no extension")], "shard bad.tar holds no samples"),
])
def test_malformed_webdataset_shards(tmp_path, members, message):
    write_tar(tmp_path / "wds" / "bad.tar", members)
    with pytest.raises(CorpusError, match=message):
        scan_corpus(tmp_path / "wds", "webdataset", on_bad="skip")


@pytest.mark.parametrize("content", [b"", b"this is not a tar archive" * 40, None], ids=["empty", "text", "truncated"])
def test_a_file_that_is_not_a_tar(tmp_path, content):
    root = write_webdataset(small_rows(), tmp_path / "wds", shard_size=3)
    shard = root / "shard-00001.tar"
    shard.write_bytes(shard.read_bytes()[:700] if content is None else content)
    with pytest.raises(CorpusError, match="shard shard-00001.tar is not a readable tar archive"):
        scan_corpus(root, "webdataset")


@pytest.mark.parametrize("line,message", [
    ('{"file_name": "gone.png", "text": "x"}', "metadata.jsonl line 7: file_name 'gone.png' does not exist"),
    ('{"file_name": "notes.txt", "text": "x"}', "line 7: file_name 'notes.txt' is not an image file"),
    ('{"file_name": "k01.png", "text": "again"}', "line 7: image k01.png is described again \\(first in metadata.jsonl line 2\\)"),
    ('{"file_name": "../k01.png"}', "line 7: file_name '../k01.png' must be a path inside the corpus root"),
    ('{"text": "no file"}', "metadata.jsonl line 7 has no 'file_name'"),
    ('{"file_name": "k01.png", "text": "unterminated', "metadata.jsonl line 7 is not valid JSON"),
])
def test_malformed_imagefolder_metadata(tmp_path, line, message):
    root = write_imagefolder(small_rows(), tmp_path / "imgs")
    (root / "notes.txt").write_text("not an image")
    with (root / "metadata.jsonl").open("a") as f:
        f.write(line + "\n")
    with pytest.raises(CorpusError, match=message):
        scan_corpus(root, "imagefolder")


def test_malformed_metadata_in_a_subfolder_is_named(tmp_path):
    root = write_imagefolder([{**r, "id": "sub/" + r["id"]} for r in small_rows()], tmp_path / "imgs")
    with (root / "sub" / "metadata.jsonl").open("a") as f:
        f.write('{"file_name": "k99.png"}\n')
    with pytest.raises(CorpusError, match="sub/metadata.jsonl line 7: file_name 'k99.png' does not exist"):
        scan_corpus(root, "imagefolder")


@pytest.mark.parametrize("name", list(FORMATS))
def test_duplicate_ids_across_files(tmp_path, name):
    rows = small_rows(8)
    if name == "imagefolder":  # one file per id: the same id from two image files
        root = write_imagefolder(rows, tmp_path / name, captions=False)
        (root / "k01.jpg").write_bytes((root / "k01.png").read_bytes())
    else:
        rows[5]["id"] = "k01"
        root = WRITERS[name](rows, tmp_path / name, shard_size=4)
    with pytest.raises(CorpusError, match="1 id\\(s\\) occur more than once in the corpus .*'k01'"):
        scan_corpus(root, name)


@pytest.mark.parametrize("name", list(FORMATS))
def test_an_empty_corpus_or_another_format(tmp_path, name):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match=f"holds no {re.escape(FORMATS[name].WHAT)}; .* the folder holds nothing"):
        scan_corpus(tmp_path / "empty", name)
    other = "webdataset" if name == "parquet" else "parquet"
    d = write_formats(small_rows(), tmp_path / "f", shard_size=3)[other]
    with pytest.raises(CorpusError, match=f"corpus.format is '{name}' and the folder holds 2 .{'tar' if other == 'webdataset' else 'parquet'}"):
        scan_corpus(d, name)
    with pytest.raises(CorpusError, match="does not exist"):
        scan_corpus(tmp_path / "nothing", name)


@pytest.mark.parametrize("name", list(FORMATS))
def test_a_file_deleted_after_the_scan_is_a_storage_error_naming_it(tmp_path, name):
    plan = scan_corpus(write_formats(small_rows(), tmp_path, shard_size=3)[name], name)
    f = plan.files[1]
    plan.location_of(f).remove()
    with pytest.raises(StorageError, match=f"{re.escape(f.uri)} .*does not exist"):
        list(iter_file_batches(plan, f, 10))


def test_unknown_format_and_policy():
    with pytest.raises(InputError, match="unknown corpus format 'tfrecord'; known: parquet, imagefolder, webdataset"):
        scan_corpus("/nowhere", "tfrecord")
    with pytest.raises(InputError, match="on_bad must be one of"):
        scan_corpus("/nowhere", "parquet", on_bad="ignore")


def test_webdataset_keys_follow_the_convention(tmp_path):
    """key = the member path up to the first '.' of its base name; folders are part of the key."""
    png = encode_image(clustered_images(1)[0])
    write_tar(tmp_path / "wds" / "a.tar", [
        ("d.v1/x.png", png), ("d.v1/x.seg.txt", b"ignored"), ("d.v1/x.json", b'{"caption": "not this"}'), ("d.v1/x.TXT", b"hello"),
        ("./y.jpeg", png), ("./y.json", b'{"key": "other", "text": "from json"}'),
        ("z.webp", png),
    ])
    plan = scan_corpus(tmp_path / "wds", "webdataset")
    assert all_rows(plan) == [("d.v1/x", png, "hello"), ("./y", png, "from json"), ("z", png, None)]
    assert plan.captioned == 2


def test_cli_index_build_takes_the_format(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli.index import cli

    root = write_webdataset(small_rows(12), tmp_path / "wds", shard_size=5)
    run = CliRunner().invoke
    res = run(cli, ["build", str(root), str(tmp_path / "idx"), "--local", "--format", "webdataset"])
    assert res.exit_code == 0, res.output
    assert "index built: 12 vectors" in res.output
    res = run(cli, ["build", str(root), str(tmp_path / "idx2"), "--local"])
    out = " ".join(res.output.split())  # the console wraps long lines
    assert res.exit_code == 2 and "holds no parquet shards (*.parquet); corpus.format is 'parquet' and the folder holds 3 .tar" in out


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_the_scan_writes_each_ids_file_and_row_to_the_id_table(captioned, name, tmp_path):
    """`scan_corpus_ids` writes, for every id the rows carry, the file and the row it is at, and
    the corpus rows the job derives from them are the rows in corpus order. A second scan of the
    same listing reads no corpus file: one overwritten with bytes of its size and its mtime kept
    is not noticed, while one whose mtime moved is read again (and refused)."""
    import os
    import shutil

    from retrack.data.source import scan_corpus_ids
    from retrack.training.prepare import read_corpus_index

    src = shutil.copytree(captioned[1][name], tmp_path / "corpus")
    ids_root = Location.parse(tmp_path / "ids")
    plan, table = scan_corpus_ids(src, name, ids_root=ids_root)
    assert scan_corpus(src, name).digest() == plan.digest()
    every = [(i, f.rel, n) for f in plan.files for n, i in enumerate(b for batch in iter_file_batches(plan, f, 100) for b in batch.ids)]
    assert table.count == len(every) == plan.count
    found = table.find([i for i, _, _ in every] + ["no-such-id"]).to_pylist()
    assert sorted((r["id"], r["file"], r["row"]) for r in found) == sorted(every)

    # A file the scan reads: a shard, or an image folder's captions (its images are read later).
    victim = next(src.rglob("metadata.jsonl")) if name == "imagefolder" else src / plan.files[0].rel
    stat = victim.stat()
    victim.write_bytes(b"\0" * stat.st_size)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    corpus = read_corpus_index(src, name, None, plan.image_shape, ids_root)
    assert corpus.ids == table and corpus.source.files == plan.files and corpus.source.digest() == plan.digest()
    assert corpus.positions([every[-1][0], "no-such-id", every[0][0]]).tolist() == [len(every) - 1, -1, 0]
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(CorpusError):
        read_corpus_index(src, name, None, plan.image_shape, ids_root)


def test_rows_by_position_are_those_rows_in_every_format(captioned):
    """By position, with or without their image bytes (captions, labels and ids alike)."""
    from retrack.data.source import iter_file_rows

    _, dirs = captioned
    for name in ("parquet", "webdataset", "imagefolder"):
        plan = scan_corpus(dirs[name], name)
        f = plan.files[1]
        every = list(iter_file_rows(plan, f))
        at = [0] if name == "imagefolder" else [0, 7, 8, f.rows - 1]
        got = list(iter_file_rows(plan, f, rows=at))
        assert got == [every[n] for n in at], name
        assert all(r["image"] for r in got) and all(r["caption"] for r in got), name
        bare = list(iter_file_rows(plan, f, rows=at, images=False))
        assert bare == [{**every[n], "image": None} for n in at], name


@pytest.mark.parametrize("name", ["parquet", "imagefolder"])
def test_rows_read_without_images_never_fetch_the_image_bytes(captioned, tmp_path, name):
    """The image bytes are made unreadable after the scan: rows without images still come back,
    with them the read fails, so the first read never touched them."""
    import shutil

    import pyarrow.parquet as pq

    from retrack.data.source import iter_file_rows

    _, dirs = captioned
    root = shutil.copytree(dirs[name], tmp_path / name)
    plan = scan_corpus(root, name)
    f = plan.files[1]
    path = root / f.rel
    if name == "parquet":
        meta = pq.ParquetFile(path).metadata
        data = bytearray(path.read_bytes())
        for g in range(meta.num_row_groups):
            col = meta.row_group(g).column(meta.schema.names.index("image"))
            data[col.data_page_offset : col.data_page_offset + 64] = b"\xff" * 64
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    got = list(iter_file_rows(plan, f, rows=[0], images=False))
    assert len(got) == 1 and got[0]["image"] is None and got[0]["caption"]
    with pytest.raises((CorpusError, StorageError)):
        list(iter_file_rows(plan, f, rows=[0]))


def test_a_parquet_shard_is_read_only_in_the_row_groups_that_hold_the_rows(bench, tmp_path):
    """Row group 3 of 10 is made unreadable: rows in other groups still come back, so it was never read."""
    import pyarrow.parquet as pq

    from retrack.data.corpus import SCHEMA
    from retrack.data.source import iter_file_rows

    rows = list(corpus_rows(bench.corpus))[:100]
    path = tmp_path / "c" / "part-00000.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path, row_group_size=10)
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(3).column(1)  # the image column's chunk
    data = bytearray(path.read_bytes())
    data[col.data_page_offset : col.data_page_offset + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    plan = scan_corpus(path.parent, "parquet")
    got = list(iter_file_rows(plan, plan.files[0], rows=[2, 29, 40, 99]))
    assert [r["id"] for r in got] == [rows[n]["id"] for n in (2, 29, 40, 99)]
    assert [r["image"] for r in got] == [rows[n]["image"] for n in (2, 29, 40, 99)]
    with pytest.raises(CorpusError, match="cannot be read as parquet"):
        list(iter_file_rows(plan, plan.files[0], rows=[35]))


def test_items_of_an_unlabelled_image_folder_read_by_position(bench, tmp_path):
    """What a fetch task runs: the wanted rows of the listed files, an unlabelled item labelled -1."""
    from retrack.training.items import read_items

    rows = [{**r, "label": None} for r in list(corpus_rows(bench.corpus))[:3]]
    plan = scan_corpus(write_imagefolder(rows, tmp_path / "f"), "imagefolder")
    files = {"file": np.array([1]), "positions": [np.array([0])], "tags": [[(7, -1)]]}
    got = read_items(files, plan, (16, 16, 3))
    assert got["id"].tolist() == [rows[1]["id"]]
    assert got["row"].tolist() == [7] and got["label"].tolist() == [-1] and got["image"].shape == (1, 16, 16, 3)
    files = {"file": np.array([1]), "positions": [np.array([0, 1])], "tags": [[(7, -1), (8, -1)]]}
    with pytest.raises(CorpusError, match="changed under the job"):
        read_items(files, plan, (16, 16, 3))
