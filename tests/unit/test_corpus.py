"""The corpus format: round trip, atomic writes and the specific refusal of malformed corpora."""

from __future__ import annotations

from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrack.data.corpus import SCHEMA, encode_image, read_corpus, write_shards
from retrack.data.forget import check_forget_ids, positions_in, read_forget_ids
from retrack.errors import CorpusError, ForgetSetError


def rows(n, size=8, start=0):
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        yield {"id": f"x{i}", "image": encode_image(rng.integers(0, 256, (size, size), dtype=np.uint8)), "label": i % 10}


def test_round_trip_keeps_ids_pixels_and_labels(tmp_path):
    shards = write_shards(tmp_path / "c", rows(10), shard_size=4)
    assert [s.name for s in shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert (tmp_path / "c" / "_SUCCESS").is_file()
    c = read_corpus(tmp_path / "c")
    assert c.ids == [f"x{i}" for i in range(10)]
    assert c.images.shape == (10, 1, 8, 8) and c.images.min() >= -1 and c.images.max() <= 1
    expected = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    np.testing.assert_allclose(c.images[0, 0], expected / 127.5 - 1, atol=1e-6)
    assert c.labels.tolist() == [i % 10 for i in range(10)]


def test_failed_write_leaves_no_partial_corpus(tmp_path):
    def broken():
        yield from rows(5)
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError):
        write_shards(tmp_path / "c", broken(), shard_size=2)
    assert not (tmp_path / "c").exists()
    assert list(tmp_path.iterdir()) == []


def test_duplicate_ids_are_refused(tmp_path):
    write_shards(tmp_path / "c", list(rows(3)) + list(rows(2)))
    with pytest.raises(CorpusError, match="2 id\\(s\\) occur more than once"):
        read_corpus(tmp_path / "c")


def test_mixed_image_sizes_are_refused(tmp_path):
    write_shards(tmp_path / "c", list(rows(3)) + list(rows(1, size=9, start=3)))
    with pytest.raises(CorpusError, match="item 'x3': image is 9x9x1, the corpus is 8x8x1"):
        read_corpus(tmp_path / "c")


def test_fit_image_resizes_the_shorter_side_and_crops_the_centre():
    from retrack.data.corpus import fit_image

    same = np.zeros((8, 8, 1), np.uint8)
    assert fit_image(same, (8, 8, 1)) is same
    # Three vertical bands 32 wide: at 8x8 only the bright middle band survives the crop (a
    # stretch to 8x8 would keep all three).
    bands = np.zeros((32, 96, 1), np.uint8)
    bands[:, 32:64] = 255
    out = fit_image(bands, (8, 8, 1))
    assert out.shape == (8, 8, 1) and (out == 255).all()
    digit = np.arange(64, dtype=np.uint8).reshape(8, 8, 1) * 3
    assert np.array_equal(fit_image(np.kron(digit, np.ones((5, 5, 1), np.uint8)), (8, 8, 1)), digit)  # area averaging: exact
    assert fit_image(np.full((4, 6, 1), 90, np.uint8), (8, 8, 1)).tolist() == np.full((8, 8, 1), 90).tolist()  # enlarged
    assert fit_image(bands, (4, 4, 3)).shape == (4, 4, 3)  # grey to RGB
    rgba = np.full((10, 10, 4), 200, np.uint8)
    assert (fit_image(rgba, (5, 5, 3)) == 200).all()  # alpha dropped, a flat image stays flat
    tall = np.zeros((40, 8, 3), np.uint8)
    tall[16:24] = 255
    assert fit_image(tall, (8, 8, 1)).min() == 255  # the centre 8 rows of a tall image


def test_empty_shard_and_missing_column_are_refused(tmp_path):
    (tmp_path / "c").mkdir()
    pq.write_table(pa.Table.from_pylist([], schema=SCHEMA), tmp_path / "c" / "part-00000.parquet")
    with pytest.raises(CorpusError, match="part-00000.parquet is empty"):
        read_corpus(tmp_path / "c")
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "d" / "part-00000.parquet")
    with pytest.raises(CorpusError, match="lacks column\\(s\\) \\['image'\\]"):
        read_corpus(tmp_path / "d")


def test_missing_directory_and_non_parquet_shard(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus(tmp_path / "nope")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "part-00000.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(CorpusError, match="cannot be read as parquet"):
        read_corpus(tmp_path / "e")


def test_forget_id_checks(tmp_path):
    corpus_ids = ["a", "b", "c"]
    rows = partial(positions_in, corpus_ids)
    assert check_forget_ids(["c", "a"], rows).tolist() == [2, 0]
    with pytest.raises(ForgetSetError, match="empty"):
        check_forget_ids([], rows)
    with pytest.raises(ForgetSetError, match=r"1 forget id\(s\) are listed more than once \(entries \[1, 3\]\)"):
        check_forget_ids(["a", "b", "a"], rows)
    with pytest.raises(ForgetSetError, match=r"1 of 2 forget id\(s\) are not in the corpus \(entries \[2\]\)"):
        check_forget_ids(["a", "z"], rows)

def test_forget_id_file_one_id_a_line_comments_and_blanks_ignored(tmp_path):
    p = tmp_path / "ids.txt"
    p.write_text("# request 42\n a \n\n  # indented comment\r\nb\n")
    assert read_forget_ids(p) == ["a", "b"]
    assert read_forget_ids(str(p)) == ["a", "b"]
    with pytest.raises(ForgetSetError, match="forget-id file .*missing.txt does not exist"):
        read_forget_ids(tmp_path / "missing.txt")
