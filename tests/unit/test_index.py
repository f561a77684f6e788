"""The index without Ray: exactness, IVF recall, reuse / rebuild / repair, duplicates, bad input, CLI."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrack.data.corpus import encode_image, write_shards
from retrack.data.forget import read_forget_ids
from retrack.data.neighbours import read_neighbours, write_neighbours
from retrack.errors import CorpusError, ForgetSetError, InputError, StorageError
from retrack.index import (
    DuplicatesFound,
    EncoderSpec,
    IndexParams,
    VectorIndex,
    build_index,
    find_duplicates,
    find_neighbours,
    open_index,
)
from retrack.index.exact import exact_knn
from retrack.storage.location import Location, S3Options
from tests.fixtures.corpora import clustered_images, write_corpus
from tests.fixtures.index import assert_same_neighbours, brute_force, recall_at, run_failing_in_its_last_chunk


@pytest.fixture(scope="module")
def bench_index(bench, tmp_path_factory):
    """The digits benchmark in a flat index of 4 shards."""
    out = tmp_path_factory.mktemp("idx")
    res = build_index(bench.corpus, out, rows_per_chunk=500)
    return out, res


# --------------------------------------------------------------------------------------------
# Exactness and recall
# --------------------------------------------------------------------------------------------


def test_built_index_is_sharded_flat_and_complete(bench_corpus, bench_index):
    corpus = bench_corpus
    out, res = bench_index
    m = res.manifest
    assert res.status == "built" and m.index_type == "flat"
    assert m.count == len(corpus) and len(m.shards) == 4 and m.dim == 64
    assert m.corpus["digest"] and m.encoder["digest"] and m.created_at
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["count"] == len(corpus) and all(s["faiss"]["sha256"] for s in saved["shards"])
    idx = open_index(out)
    assert idx.ids.to_pylist() == corpus.ids  # index order is corpus order
    np.testing.assert_array_equal(idx.vectors(np.array([0, 700, len(corpus) - 1])),
                                  corpus.images[[0, 700, len(corpus) - 1]].reshape(3, -1))


@pytest.mark.parametrize("which", ["all_copies", "random_items"])
@pytest.mark.parametrize("serve", ["merged", "shards"])
def test_neighbours_equal_exact_brute_force(bench_corpus, bench_forget, bench_index, which, serve):
    corpus, forget_all = bench_corpus, bench_forget
    forget = forget_all if which == "all_copies" else [corpus.ids[i] for i in (3, 99, 512, 1200, 1600)]
    idx = open_index(bench_index[0], serve=serve)
    nb = find_neighbours(idx, forget, k=7)
    d_ref, ids_ref = brute_force(corpus, forget, 7)
    assert_same_neighbours(nb, d_ref, ids_ref)
    assert not set(sum(nb.ids, [])) & set(forget)
    np.testing.assert_array_equal(nb.vectors, corpus.images[[corpus.index_of(r) for r in nb.ids]].reshape(len(forget), 7, -1))
    np.testing.assert_array_equal(nb.forget_vectors, corpus.images[corpus.index_of(forget)].reshape(len(forget), -1))


def test_in_memory_index_gives_the_same_neighbours(bench_corpus, bench_forget):
    corpus, forget = bench_corpus, bench_forget
    nb = find_neighbours(VectorIndex.from_arrays(corpus.ids, corpus.images), forget, k=5)
    assert_same_neighbours(nb, *brute_force(corpus, forget, 5))


def test_one_copy_listed_widens_the_search_past_the_other_forget_items(bench_corpus, bench_forget):
    """49 exact copies of the item are retained: with all 50 in the forget set, no copy comes back."""
    corpus, forget = bench_corpus, bench_forget
    idx = VectorIndex.from_arrays(corpus.ids, corpus.images)
    nb = find_neighbours(idx, forget[:1], k=3, margin=0)
    assert np.allclose(nb.distances, 0)  # the other copies ARE its nearest neighbours
    nb = find_neighbours(idx, forget, k=3, margin=0)  # K + 0 candidates are all forget items at first
    assert nb.distances.min() > 1.0 and not set(sum(nb.ids, [])) & set(forget)


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    root = tmp_path_factory.mktemp("clustered")
    images = clustered_images(6000, size=8, seed=1)
    ids = write_corpus(root / "corpus", images, shard_size=1000)
    return root, images, ids


@pytest.mark.parametrize("kind,min_recall", [("ivf", 0.95), ("ivfpq", 0.9)])
def test_ivf_recall_at_10_against_exact_search(clustered, kind, min_recall):
    root, images, ids = clustered
    res = build_index(root / "corpus", root / kind, params=IndexParams(type=kind, nlist=32, nprobe=6, pq_m=16),
                      rows_per_chunk=2000)
    assert res.manifest.index_type == kind and len(res.manifest.shards) == 3 and res.manifest.quantizer
    idx = open_index(root / kind)
    rng = np.random.default_rng(0)
    forget = [ids[i] for i in rng.choice(len(ids), 40, replace=False)]
    nb = find_neighbours(idx, forget, k=10)
    x = images.reshape(len(images), -1).astype(np.float32) / 127.5 - 1
    fr = np.array([ids.index(f) for f in forget])
    keep = np.setdiff1d(np.arange(len(ids)), fr)
    d_ref, ix = exact_knn(x[fr], x[keep], 10)
    recall = recall_at(nb.ids, [[ids[keep[j]] for j in row] for row in ix])
    assert recall >= min_recall, recall
    if kind == "ivf":  # IVF-Flat is searched exactly (`ExactIVF`), whatever nprobe
        assert recall == 1.0
    # Re-ranked on full vectors: every distance returned is the exact one, sorted.
    np.testing.assert_allclose(nb.distances, np.linalg.norm(nb.vectors - x[fr][:, None, :], axis=2), rtol=1e-5)
    assert (np.diff(nb.distances, axis=1) >= 0).all()
    # Every list probed: PQ's candidates improve; IVF-Flat's answer, exact already, stays the same.
    idx.set_nprobe(32)
    exact = find_neighbours(idx, forget, k=10)
    if kind == "ivf":
        assert exact.ids == nb.ids
    else:
        assert recall_at(exact.ids, [[ids[keep[j]] for j in row] for row in ix]) >= min_recall


def test_an_ivf_flat_index_answers_outliers_exactly_where_its_nprobe_misses_them():
    """Queries far from the corpus (a planted picture) have neighbours spread over lists that a
    small nprobe never reaches: the plain search misses them, `ExactIVF` finds exactly what a flat
    search finds, for them and for queries like the corpus's items."""
    import faiss

    from retrack.index.exact_ivf import ExactIVF, exact_search

    rng = np.random.default_rng(3)
    centres = rng.normal(0, 4, (40, 32))
    x = (centres[rng.integers(0, 40, 20_000)] + rng.normal(0, 1, (20_000, 32))).astype(np.float32)
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(32), 32, 64)
    index.train(x)
    index.add(x)
    index.nprobe = 2
    inliers = x[rng.choice(len(x), 50, replace=False)] + rng.normal(0, 0.1, (50, 32)).astype(np.float32)
    outliers = rng.normal(0, 12, (50, 32)).astype(np.float32)
    q = np.concatenate([inliers, outliers])
    flat = faiss.IndexFlatL2(32)
    flat.add(x)
    d_true, i_true = flat.search(q, 10)
    _, i_plain = index.search(q, 10)
    assert recall_at(i_plain[50:].tolist(), i_true[50:].tolist()) < 0.9  # what nprobe 2 misses
    assert ExactIVF.applies(index) and exact_search(index) != index.search
    d, i = ExactIVF(index).search(q, 10)
    np.testing.assert_array_equal(i, i_true)
    np.testing.assert_allclose(d, d_true, rtol=1e-4, atol=1e-3)
    assert index.nprobe == 2  # left as it was
    assert not ExactIVF.applies(flat) and exact_search(flat) == flat.search


def test_nprobe_is_calibrated_at_build_time_to_the_target_recall(clustered):
    root, images, ids = clustered
    res = build_index(root / "corpus", root / "calibrated", params=IndexParams(type="ivf", nlist=64, target_recall=0.99),
                      rows_per_chunk=3000)
    nprobe = res.manifest.params["nprobe"]
    assert 1 <= nprobe <= 64
    idx = open_index(root / "calibrated")
    forget = ids[:30]
    x = images.reshape(len(images), -1).astype(np.float32) / 127.5 - 1
    keep = np.arange(30, len(ids))
    _, ix = exact_knn(x[:30], x[keep], 10)
    assert recall_at(find_neighbours(idx, forget, k=10).ids, [[ids[keep[j]] for j in row] for row in ix]) >= 0.97
    # An explicit nprobe at search time overrides the calibrated one.
    assert build_index(root / "corpus", root / "calibrated", params=IndexParams(type="ivf", nlist=64, nprobe=3),
                       rows_per_chunk=3000).status == "reused"


def test_a_projected_ivfpq_index_calibrates_nprobe_in_its_projected_space(clustered):
    """64-d vectors projected to 32 before IVF-PQ: nprobe is calibrated against exact search in
    the projected space, where probing more lists can reach the target (against the full space
    it never would, and calibration would probe every list); the re-rank on the full vectors
    makes up for the projection."""
    root, images, ids = clustered
    res = build_index(root / "corpus", root / "projected", params=IndexParams(type="ivfpq", nlist=64, pq_m=16, pca=32),
                      rows_per_chunk=3000)
    p = res.manifest.params
    assert p["pca"] == 32 and p["nprobe"] < 64 and p["calibrated_recall"] >= 0.99
    assert res.manifest.dim == EncoderSpec().vector_dim(res.manifest.corpus["image_shape"]) == 64
    x = images.reshape(len(images), -1).astype(np.float32) / 127.5 - 1
    keep = np.arange(30, len(ids))
    _, ix = exact_knn(x[:30], x[keep], 10)
    # These clusters' noise is isotropic, half of it outside any 32 dimensions: the re-rank wants a
    # deep candidate list (measured recall 0.92 at the default margin of 64, 0.99 at 128).
    nb = find_neighbours(open_index(root / "projected"), ids[:30], k=10, margin=128)
    assert recall_at(nb.ids, [[ids[keep[j]] for j in row] for row in ix]) >= 0.97
    np.testing.assert_allclose(nb.distances, np.linalg.norm(nb.vectors - x[:30][:, None, :], axis=2), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Reuse, rebuild, repair
# --------------------------------------------------------------------------------------------


def test_reuse_rebuild_after_change_and_repair_of_a_truncated_shard(tmp_path):
    images = clustered_images(900, seed=2)
    corpus = tmp_path / "corpus"
    ids = write_corpus(corpus, images, shard_size=300)
    out = tmp_path / "idx"
    first = build_index(corpus, out, rows_per_chunk=300)
    assert first.status == "built" and first.encoded_chunks == 3 and first.built_shards == 3

    again = build_index(corpus, out, rows_per_chunk=300)
    assert again.status == "reused" and again.encoded_chunks == 0 and again.built_shards == 0
    assert again.manifest.created_at == first.manifest.created_at

    # A crash left shard 1 half-written: detected from its recorded size, only it is redone.
    shard = out / "shards" / "shard-00001.faiss"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(StorageError, match="damaged"):
        open_index(out)
    fixed = build_index(corpus, out, rows_per_chunk=300)
    assert fixed.status == "repaired" and fixed.built_shards == 1 and fixed.encoded_chunks == 0
    assert len(open_index(out)) == 900

    # A half-written embedding chunk (no _SUCCESS) is encoded again.
    vec = out / "shards" / "shard-00002.vec"
    vec.write_bytes(vec.read_bytes()[:100])
    chunk = out / "embeddings" / fixed.manifest.shards[2].chunk_key
    (chunk / "_SUCCESS.json").unlink()
    fixed = build_index(corpus, out, rows_per_chunk=300)
    assert fixed.status == "repaired" and fixed.encoded_chunks == 1 and fixed.built_shards == 1

    # The corpus changes (one shard rewritten): only its chunk is encoded again, the rest reused.
    time.sleep(0.01)
    changed = images[300:600].copy()
    changed[0] = 255 - changed[0]
    write_shards(tmp_path / "tmp", ({"id": i, "image": encode_image(im)} for i, im in zip(ids[300:600], changed)), 300)
    (tmp_path / "tmp" / "part-00000.parquet").replace(corpus / "part-00001.parquet")
    rebuilt = build_index(corpus, out, rows_per_chunk=300)
    assert rebuilt.status == "repaired" and rebuilt.encoded_chunks == 1 and rebuilt.built_shards == 1
    assert rebuilt.manifest.corpus["digest"] != first.manifest.corpus["digest"]
    idx = open_index(out)
    np.testing.assert_allclose(idx.vectors(np.array([300]))[0], changed[0].reshape(-1) / 127.5 - 1, atol=1e-6)
    # Stale embedding folders are removed.
    assert len(list((out / "embeddings").iterdir())) == 3

    # Another index type for the same corpus is a rebuild, not a reuse.
    ivf = build_index(corpus, out, params=IndexParams(type="ivf", nlist=8), rows_per_chunk=300)
    assert ivf.status == "built" and ivf.manifest.index_type == "ivf" and ivf.encoded_chunks == 0


def test_a_failed_run_keeps_the_chunks_it_finished(tmp_path):
    # Each chunk is marked complete as it finishes, not after the whole encode stage.
    assert run_failing_in_its_last_chunk(tmp_path, build_index) == (5, 1)


def test_ray_encode_tasks_group_small_files_but_keep_tasks_for_every_cpu():
    from pipelines.index import files_per_task  # imports no Ray

    mib = 1 << 20
    assert files_per_task([24 * mib] * 20, cpus=2) == 2  # 64 MiB a task: 10 tasks for 2 CPUs
    assert files_per_task([mib] * 20, cpus=2) == 2  # 4 tasks a CPU at least
    assert files_per_task([mib] * 1000, cpus=2) == 64  # up to 64 MiB a task
    assert files_per_task([200 * mib] * 100, cpus=2) == 1  # a big file is a task of its own
    assert files_per_task([mib] * 3, cpus=64) == 1
    assert files_per_task([], cpus=2) == 1


def test_corrupt_shard_of_the_right_size_is_caught_by_its_checksum(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, clustered_images(200, seed=3), shard_size=100)
    build_index(corpus, tmp_path / "idx")
    ids = tmp_path / "idx" / "shards" / "shard-00000.ids.parquet"
    data = bytearray(ids.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ids.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="sha256"):
        open_index(tmp_path / "idx")


# --------------------------------------------------------------------------------------------
# Near-duplicates
# --------------------------------------------------------------------------------------------


def test_duplicates_fail_warn_add_on_the_planted_copies(bench_info, bench_forget, bench_index, caplog):
    info, forget = bench_info, bench_forget
    idx = open_index(bench_index[0])
    threshold = 2 * info.forget_threshold  # [0, 1] pixels -> model space [-1, 1]
    one = forget[:1]
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(DuplicatesFound) as err:
            find_duplicates(idx, one, threshold, "fail")
        assert err.value.report.count == len(forget) - 1
        assert one[0] not in str(err.value)
        warned = find_duplicates(idx, one, threshold, "warn")
        assert warned.forget_ids == one and set(warned.duplicate_ids) == set(forget[1:])
        added = find_duplicates(idx, one, threshold, "add")
        assert added.forget_ids[0] == one[0] and sorted(added.forget_ids) == sorted(forget)
        assert added.distances == pytest.approx([0.0] * (len(forget) - 1), abs=1e-5)
        # Once every copy is in the forget set, nothing retained is that close.
        assert find_duplicates(idx, forget, threshold, "fail").count == 0
    for rec in caplog.records:  # the data to forget never reaches the logs
        assert not any(f in rec.getMessage() for f in forget)


def test_duplicates_on_an_ivfpq_index_are_exact(clustered):
    root, images, ids = clustered
    if not (root / "ivfpq" / "manifest.json").exists():
        build_index(root / "corpus", root / "ivfpq", params=IndexParams(type="ivfpq", nlist=32, nprobe=6, pq_m=16), rows_per_chunk=2000)
    idx = open_index(root / "ivfpq")
    x = images.reshape(len(images), -1).astype(np.float32) / 127.5 - 1
    d = np.linalg.norm(x - x[5], axis=1)
    threshold = float(np.sort(d)[12])  # 12 items within the threshold, the query excluded
    rep = find_duplicates(idx, [ids[5]], threshold, "warn")
    truth = {ids[i] for i in np.flatnonzero(d <= threshold) if i != 5}
    assert len(truth & set(rep.duplicate_ids)) >= len(truth) - 1 and set(rep.duplicate_ids) <= truth


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def _rows(images, ids):
    return ({"id": i, "image": encode_image(im)} for i, im in zip(ids, images))


def test_duplicate_ids_across_shards_are_refused_before_encoding(tmp_path):
    images = clustered_images(20)
    ids = [f"a{i}" for i in range(20)]
    ids[17] = ids[3]
    write_shards(tmp_path / "c", _rows(images, ids), shard_size=10)
    with pytest.raises(CorpusError, match="1 id\\(s\\) occur more than once"):
        build_index(tmp_path / "c", tmp_path / "idx")
    assert not (tmp_path / "idx" / "embeddings").exists()


@pytest.mark.parametrize("bad_id", [None, ""])
def test_missing_ids_are_refused(tmp_path, bad_id):
    images = clustered_images(4)
    table = pa.table({"id": pa.array(["a", bad_id, "c", "d"], pa.string()),
                      "image": pa.array([encode_image(i) for i in images], pa.binary())})
    (tmp_path / "c").mkdir()
    pq.write_table(table, tmp_path / "c" / "part-0.parquet")
    with pytest.raises(CorpusError, match="no id|empty id"):
        build_index(tmp_path / "c", tmp_path / "idx")


def test_missing_image_column_and_garbage_shard_are_refused(tmp_path):
    (tmp_path / "c").mkdir()
    pq.write_table(pa.table({"id": ["a"], "pixels": [b"x"]}), tmp_path / "c" / "part-0.parquet")
    with pytest.raises(CorpusError, match="lacks column"):
        build_index(tmp_path / "c", tmp_path / "idx")
    (tmp_path / "c" / "part-0.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(CorpusError, match="part-0.parquet cannot be read as parquet"):
        build_index(tmp_path / "c", tmp_path / "idx")
    with pytest.raises(CorpusError, match="does not exist"):
        build_index(tmp_path / "nothing", tmp_path / "idx")


def test_an_image_of_another_size_is_fitted_and_a_bad_one_fails_or_is_skipped_and_reported(tmp_path):
    from retrack.data.corpus import FIT_RULE, fit_image, to_model_space

    images = list(clustered_images(30))
    images[11] = np.kron(images[11], np.ones((2, 3), np.uint8))  # 16x24: resized and centre-cropped to 8x8
    ids = [f"m{i}" for i in range(30)]
    rows = list(_rows(images, ids))
    rows[12]["image"] = b"\x89PNG broken"
    write_shards(tmp_path / "c", rows, shard_size=10)
    with pytest.raises(CorpusError, match="item 'm12': image bytes cannot be decoded"):
        build_index(tmp_path / "c", tmp_path / "idx")
    res = build_index(tmp_path / "c", tmp_path / "idx", on_bad="skip")
    assert res.manifest.count == 29 and res.manifest.skipped == 1
    assert res.manifest.corpus["image_shape"] == [8, 8, 1] and res.manifest.corpus["fit"] == FIT_RULE
    report = [json.loads(line) for line in (tmp_path / "idx" / "bad_rows.jsonl").read_text().splitlines()]
    assert [r["id"] for r in report] == ["m12"] and "cannot be decoded" in report[0]["reason"]
    idx = open_index(tmp_path / "idx")
    assert "m12" not in idx.ids.to_pylist()
    fitted = to_model_space(fit_image(images[11][:, :, None], (8, 8, 1))[None]).reshape(-1)
    np.testing.assert_allclose(idx.vectors(np.array([idx.ids.to_pylist().index("m11")]))[0], fitted, atol=1e-6)


def test_unreadable_image_bytes_in_parquet(tmp_path):
    images = clustered_images(6)
    rows = list(_rows(images, [f"u{i}" for i in range(6)]))
    rows[4]["image"] = b"\x89PNG broken"
    write_shards(tmp_path / "c", rows)
    with pytest.raises(CorpusError, match="item 'u4'.*cannot be decoded"):
        build_index(tmp_path / "c", tmp_path / "idx")


def test_image_folder_with_an_unreadable_file(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    images = clustered_images(12, seed=4)
    for n, im in enumerate(images):
        Image.fromarray(im).save(folder / f"i{n:02d}.png")
    (folder / "i99.png").write_bytes(b"not an image")
    with pytest.raises(CorpusError, match="item 'sub/i99'.*cannot be decoded"):
        build_index(tmp_path / "imgs", tmp_path / "idx", format="imagefolder")
    res = build_index(tmp_path / "imgs", tmp_path / "idx", on_bad="skip", format="imagefolder")
    assert res.manifest.count == 12 and res.manifest.skipped == 1
    idx = open_index(tmp_path / "idx")
    assert idx.ids.to_pylist()[:2] == ["sub/i00", "sub/i01"]
    np.testing.assert_allclose(idx.vectors(np.array([3]))[0], images[3].reshape(-1) / 127.5 - 1, atol=1e-6)
    (folder / "i00.jpg").write_bytes((folder / "i00.png").read_bytes())
    with pytest.raises(CorpusError, match="more than once"):
        build_index(tmp_path / "imgs", tmp_path / "idx2", format="imagefolder")


def test_unreachable_bucket_is_a_quick_storage_error(tmp_path):
    from tests.fixtures.services import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    with pytest.raises(StorageError, match=f"bucket 'nowhere' at {endpoint}"):
        build_index("s3://nowhere/corpus", tmp_path / "idx", endpoint=endpoint)
    with pytest.raises(StorageError, match="nowhere"):
        open_index("s3://nowhere/idx", endpoint=endpoint)
    assert time.perf_counter() - start < 20
    opts = S3Options(endpoint=endpoint, access_key="k", secret_key="s3cret")
    assert "s3cret" not in repr(Location.parse("s3://b/x", s3=opts))


def test_forget_set_errors_name_positions_not_ids(bench_corpus, bench_forget, bench_index):
    corpus, forget = bench_corpus, bench_forget
    idx = open_index(bench_index[0])
    with pytest.raises(ForgetSetError, match="empty"):
        find_neighbours(idx, [], k=3)
    with pytest.raises(ForgetSetError, match=r"entries \[1, 3\]") as err:
        find_neighbours(idx, [forget[0], forget[1], forget[0]], k=3)
    assert forget[0] not in str(err.value)
    with pytest.raises(ForgetSetError, match=r"1 of 2 forget id\(s\) are not in the index \(entries \[2\]\)") as err:
        find_neighbours(idx, [forget[0], "secret-person-42"], k=3)
    assert "secret-person-42" not in str(err.value)
    with pytest.raises(InputError, match="larger than the retained set"):
        find_neighbours(idx, forget, k=len(corpus))
    with pytest.raises(InputError, match="policy"):
        find_duplicates(idx, forget, 1.0, "ignore")


# --------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16)
    out = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(out)
    return out


def test_vae_encoder_samples_each_item_from_its_own_seed_at_the_model_resolution(tiny_vae_dir):
    import torch

    from retrack.models.encoders import build_encoder
    from retrack.models.latents import item_seed
    from retrack.models.sd import load_vae

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 12, 12, 1), dtype=np.uint8)  # grey, smaller than the model's 16
    ids = [f"v{i}" for i in range(5)]
    spec = EncoderSpec(kind="vae", model_dir=str(tiny_vae_dir), resolution=16)
    enc = build_encoder(spec)
    z = enc(images, ids)
    assert z.shape == (5, 4 * 8 * 8)
    np.testing.assert_allclose(enc(images[::-1], ids[::-1])[::-1], z, rtol=1e-5, atol=1e-5)  # order does not matter
    np.testing.assert_allclose(enc(images[2:3], ids[2:3]), z[2:3], rtol=1e-5, atol=1e-5)  # nor the batch
    # The rule written out: RGB at 16x16 in [-1, 1], mean + std * N(0, 1) from the item's seed, times the scale.
    from PIL import Image

    rgb = np.stack([np.asarray(Image.fromarray(im[:, :, 0]).convert("RGB").resize((16, 16), Image.BICUBIC)) for im in images])
    x = torch.from_numpy(rgb.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    vae = load_vae(tiny_vae_dir)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        eps = torch.stack([torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(item_seed(i))) for i in ids])
        want = (dist.mean + dist.std * eps) * vae.config.scaling_factor
    np.testing.assert_allclose(z, want.reshape(5, -1).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="not a Stable Diffusion pipeline folder"):
        EncoderSpec(kind="vae", model_dir=str(tiny_vae_dir)).digest()  # a bare VAE does not know the resolution
    assert spec.digest() != EncoderSpec(kind="vae", model_dir=str(tiny_vae_dir), resolution=32).digest()


def test_vae_index_build_and_encoder_change_triggers_rebuild(tmp_path, tiny_vae_dir):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(40, 16, 16, 3), dtype=np.uint8)
    write_corpus(tmp_path / "c", images, shard_size=20)
    spec = EncoderSpec(kind="vae", model_dir=str(tiny_vae_dir), resolution=16)
    res = build_index(tmp_path / "c", tmp_path / "idx", encoder=spec)
    assert res.manifest.dim == 256 and res.manifest.encoder["spec"]["kind"] == "vae"
    assert build_index(tmp_path / "c", tmp_path / "idx", encoder=spec).status == "reused"
    pixels = build_index(tmp_path / "c", tmp_path / "idx")  # another encoder: encode and build again
    assert pixels.status == "built" and pixels.encoded_chunks == 1 and pixels.manifest.dim == 16 * 16 * 3


def test_pooled_latents_never_lengthen_a_distance():
    from retrack.models.encoders import pool_latents

    z = np.random.default_rng(0).normal(size=(200, 4, 8, 8)).astype(np.float32)
    full = np.linalg.norm(z[:100].reshape(100, -1) - z[100:].reshape(100, -1), axis=1)
    for pool in (2, 4, 8):
        pooled = pool_latents(z, pool)
        assert pooled.shape == (200, 4 * (8 // pool) ** 2)
        assert (np.linalg.norm(pooled[:100] - pooled[100:], axis=1) <= full * (1 + 1e-5)).all()
    block = np.zeros((1, 1, 4, 4), np.float32)
    block[0, 0, :2, :2] = 1.0  # one 2x2 block of ones: its coordinate is 4 / 2, its norm kept
    assert pool_latents(block, 2)[0].tolist() == [2.0, 0.0, 0.0, 0.0]


def smooth_latent_corpus(tmp_path, tiny_vae_dir) -> tuple[np.ndarray, list[str], str]:
    """90 smooth pictures (4x4 patterns scaled up: as in real images, most of a latent's energy is
    in its coarse structure) in a corpus, and a tiny VAE with a trained VAE's tight posterior
    (latents near their means, as SD's are): (images, ids, vae folder)."""
    import torch

    from retrack.models.sd import load_vae

    vae = load_vae(tiny_vae_dir)
    with torch.no_grad():
        vae.quant_conv.weight[4:] = 0.0
        vae.quant_conv.bias[4:] = -12.0
    vae.save_pretrained(tmp_path / "vae")
    coarse = np.kron(clustered_images(90, size=4, clusters=6, noise=30.0, seed=3).astype(np.float32), np.ones((4, 4), np.float32))
    grey = np.clip(coarse + np.random.default_rng(4).normal(0, 3, coarse.shape), 0, 255).astype(np.uint8)
    images = np.repeat(grey[:, :, :, None], 3, axis=3)
    return images, write_corpus(tmp_path / "c", images, shard_size=30), str(tmp_path / "vae")


def assert_exact_neighbours_and_duplicates(compact, exact, ids: list[str], margin: int, rtol: float) -> None:
    forget = [ids[4], ids[40], ids[77]]
    want, got = find_neighbours(exact, forget, 8), find_neighbours(compact, forget, 8, margin=margin)
    assert got.ids == want.ids
    np.testing.assert_allclose(got.distances, want.distances, rtol=rtol)
    threshold = float(want.distances[:, 2].max())  # each forget item has 3 retained items or more within it
    dup = find_duplicates(compact, forget, threshold=threshold * 0.999, policy="warn")
    assert dup.count >= 3 and dup.duplicate_ids == find_duplicates(exact, forget, threshold=threshold * 0.999, policy="warn").duplicate_ids


def test_a_compact_latent_index_finds_the_exact_full_latent_neighbours(tmp_path, tiny_vae_dir):
    """Latents pooled 2x2 (a quarter of a full latent's bytes) are searched; the candidates are
    re-ranked on the full latents stored beside the index (fp16): the neighbours and the
    near-duplicates of exact search on the full latents."""
    from retrack.index import VectorIndex
    from retrack.models.encoders import build_encoder

    images, ids, vae = smooth_latent_corpus(tmp_path, tiny_vae_dir)
    spec = EncoderSpec(kind="vae", model_dir=vae, resolution=16, pool=2)
    assert spec.digest() != EncoderSpec(kind="vae", model_dir=vae, resolution=16).digest()
    with pytest.raises(InputError, match="does not divide the latent side 8"):
        EncoderSpec(kind="vae", model_dir=vae, resolution=16, pool=3).digest()
    m = build_index(tmp_path / "c", tmp_path / "idx", encoder=spec, rows_per_chunk=30).manifest
    full = build_encoder(spec).indexed_and_full(images, ids)[1]
    assert m.latent_pool == 2 and m.dim * 4 == full.shape[1] == 256 and spec.vector_dim((16, 16, 3)) == m.dim
    for s in m.shards:  # the indexed vectors a quarter of the full latents; the latents apart, in fp16
        assert s.vectors.size == s.count * full.shape[1] * 4 // 4 and s.latents.size == s.count * full.shape[1] * 2
    assert_exact_neighbours_and_duplicates(open_index(tmp_path / "idx"), VectorIndex.from_arrays(ids, full), ids, 24, 2e-3)  # fp16 latents


def test_a_projected_latent_index_finds_the_exact_full_latent_neighbours(tmp_path, tiny_vae_dir):
    """The full latents projected to 16 of their 256 dimensions by a PCA trained with the index:
    the index holds 16 floats per item; its candidates, re-ranked on the full latents, give the
    neighbours and near-duplicates of exact search."""
    from retrack.index import VectorIndex
    from retrack.models.encoders import build_encoder

    images, ids, vae = smooth_latent_corpus(tmp_path, tiny_vae_dir)
    spec = EncoderSpec(kind="vae", model_dir=vae, resolution=16)
    assert spec.vector_dim((16, 16, 3)) == 256  # known before encoding
    with pytest.raises(InputError, match="pca = 256 must be below the vectors' dimension 256"):
        build_index(tmp_path / "c", tmp_path / "bad", encoder=spec, params=IndexParams(pca=256), rows_per_chunk=30)
    assert not (tmp_path / "bad" / "embeddings").exists()  # refused before anything was encoded
    m = build_index(tmp_path / "c", tmp_path / "idx", encoder=spec, params=IndexParams(pca=16), rows_per_chunk=30).manifest
    assert m.index_params.pca == 16 and m.index_type == "flat" and m.dim == 256 and m.quantizer is not None
    for s in m.shards:  # the faiss shard: 16 floats per item; the projection (16 x 256), mean and eigenvalues beside them
        assert s.faiss.size < s.count * 16 * 4 + (16 * 256 + 256 + 256 + 16) * 4 + 1024
    full = build_encoder(spec).indexed_and_full(images, ids)[1]
    compact = open_index(tmp_path / "idx")
    assert_exact_neighbours_and_duplicates(compact, VectorIndex.from_arrays(ids, full), ids, 24, 1e-5)
    assert build_index(tmp_path / "c", tmp_path / "idx", encoder=spec, params=IndexParams(pca=16), rows_per_chunk=30).status == "reused"


# --------------------------------------------------------------------------------------------
# Storage and CLI
# --------------------------------------------------------------------------------------------


def test_local_location_atomic_write_list_and_remove(tmp_path):
    root = Location.parse(tmp_path / "store")
    (root / "a" / "x.bin").write_bytes(b"12345")
    (root / "a" / "_hidden.json").write_json({"k": 1})
    assert (root / "a" / "x.bin").size() == 5 and (root / "a" / "_hidden.json").read_json() == {"k": 1}
    assert [e.name for e in root.list()] == ["x.bin"]
    assert sorted(e.name for e in root.list(hidden=True)) == ["_hidden.json", "x.bin"]
    assert not list((tmp_path / "store" / "a").glob(".*"))  # no temporary file left behind
    with (root / "a" / "x.bin").open_input() as f:
        assert f.read_at(2, 1) == b"23"
    (root / "a").remove()
    assert not (root / "a").exists()
    with pytest.raises(StorageError, match="does not exist"):
        (root / "missing").read_bytes()


def test_cli_build_neighbours_duplicates(bench_info, bench, bench_corpus, bench_forget, tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli.index import cli

    info, paths, corpus, forget = bench_info, bench, bench_corpus, bench_forget
    run = CliRunner().invoke
    res = run(cli, ["build", str(paths.corpus), str(tmp_path / "idx"), "--local", "--rows-per-chunk", "600"])
    assert res.exit_code == 0, res.output
    assert "built" in res.output and "1666 vectors" in res.output
    res = run(cli, ["build", str(paths.corpus), str(tmp_path / "idx"), "--local", "--rows-per-chunk", "600"])
    assert res.exit_code == 0 and "reused" in res.output
    (tmp_path / "forget.txt").write_text(forget[0] + "\n")
    res = run(cli, ["neighbours", str(tmp_path / "idx"), "--forget", str(paths.forget_ids), "-k", "4",
                    "--out", str(tmp_path / "nb.json"), "--vectors-out", str(tmp_path / "nb.npy")])
    assert res.exit_code == 0, res.output
    # The file is the one neighbours format: it reads back as the search's mapping.
    nb = read_neighbours(tmp_path / "nb.json", forget, 4)
    found = find_neighbours(open_index(tmp_path / "idx"), forget, 4)
    assert nb == dict(zip(found.forget_ids, found.ids)) and list(nb) == forget
    _, ids_ref = brute_force(corpus, forget, 4)
    assert nb[forget[0]] == ids_ref[0] and np.load(tmp_path / "nb.npy").shape == (50, 4, 64)
    thr = str(2 * info.forget_threshold)
    res = run(cli, ["duplicates", str(tmp_path / "idx"), "--forget", str(tmp_path / "forget.txt"), "--threshold", thr,
                    "--out", str(tmp_path / "dup.json")])
    assert res.exit_code == 2 and "49 retained item(s)" in res.output
    assert json.loads((tmp_path / "dup.json").read_text())["duplicates"][0]["distance"] == 0
    res = run(cli, ["duplicates", str(tmp_path / "idx"), "--forget", str(tmp_path / "forget.txt"), "--threshold", thr,
                    "--policy", "add", "--forget-out", str(tmp_path / "forget2.txt")])
    assert res.exit_code == 0, res.output
    assert sorted(read_forget_ids(tmp_path / "forget2.txt")) == sorted(forget)
    for out in (res.output,):
        assert forget[0] not in out
    res = run(cli, ["neighbours", str(tmp_path / "nowhere"), "--forget", str(tmp_path / "forget.txt"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no index" in res.output


def test_neighbours_file_round_trips_and_refuses_what_training_cannot_use(tmp_path):
    mapping = {"f1": ["r1", "r2", "r3"], "f2": ["r2", "r4", "r5"]}
    write_neighbours(tmp_path / "nb.json", mapping)
    assert (tmp_path / "nb.json").read_text() == json.dumps(mapping)  # the bytes a job's neighbours stage wrote
    assert read_neighbours(tmp_path / "nb.json", ["f2", "f1"], 3) == {"f2": ["r2", "r4", "r5"], "f1": ["r1", "r2", "r3"]}
    assert read_neighbours(str(tmp_path / "nb.json"), ["f1"], 2) == {"f1": ["r1", "r2"]}  # the first k
    assert list(tmp_path.iterdir()) == [tmp_path / "nb.json"]  # written atomically: no temporary left
    with pytest.raises(InputError, match="no entry for forget item 2 of 2"):
        read_neighbours(tmp_path / "nb.json", ["f1", "secret-person-42"], 3)
    with pytest.raises(InputError, match="forget item 1 has 3 neighbour\\(s\\), k = 4 are needed"):
        read_neighbours(tmp_path / "nb.json", ["f1", "f2"], 4)
    write_neighbours(tmp_path / "bad.json", {"f1": ["r1", "f2"], "f2": ["r1", "r2"]})
    with pytest.raises(InputError, match="forget item 1 has a forget item among its neighbours"):
        read_neighbours(tmp_path / "bad.json", ["f1", "f2"], 2)
    (tmp_path / "old.json").write_text(json.dumps({"k": 2, "neighbours": [{"forget_position": 0, "ids": ["r1", "r2"]}]}))
    with pytest.raises(InputError, match="must be a JSON object mapping each forget id to a list of retained ids"):
        read_neighbours(tmp_path / "old.json", ["f1"], 2)
    (tmp_path / "text.json").write_text("f1 r1 r2")
    with pytest.raises(InputError, match="is not JSON"):
        read_neighbours(tmp_path / "text.json", ["f1"], 2)
    with pytest.raises(InputError, match="does not exist"):
        read_neighbours(tmp_path / "missing.json", ["f1"], 2)


def test_a_sharded_index_answers_as_the_merged_one(bench, bench_corpus, bench_index):
    """The shards searched apart and merged give the merged index's rows, neighbours, copies and ids."""
    from retrack.index import Shard, ShardedIndex, index_manifest, shard_vectors

    out, _ = bench_index
    merged = open_index(out)
    loc, manifest = index_manifest(out)
    sharded = ShardedIndex([Shard(loc, rec) for rec in manifest.shards], manifest, shard_vectors(loc, manifest))
    assert len(manifest.shards) == 4 and len(sharded) == len(merged)
    ids = bench_corpus.ids
    forget = [ids[1200], ids[3], ids[-1]]
    assert np.array_equal(sharded.rows_of(forget), merged.rows_of(forget))
    a, b = find_neighbours(sharded, forget, 7), find_neighbours(merged, forget, 7)
    assert a.ids == b.ids and np.allclose(a.distances, b.distances)
    d, rows = sharded.search(merged.vectors(np.array([10, 900])), 25)
    d2, rows2 = merged.search(merged.vectors(np.array([10, 900])), 25)
    assert np.allclose(d, d2) and set(rows[0]) == set(rows2[0])
    one_copy = read_forget_ids(bench.forget_ids)[:1]  # its planted copies sit in every shard
    added = find_duplicates(sharded, one_copy, 0.5, policy="add")
    assert added.count > 1 and added.forget_ids == find_duplicates(merged, one_copy, 0.5, policy="add").forget_ids
    assert sharded.ids_of(np.array([len(ids) - 1, 0, 700])) == [ids[-1], ids[0], ids[700]]
    with pytest.raises(ForgetSetError, match="1 of 2 forget id"):
        sharded.rows_of([ids[1], "nope"])


def test_the_training_sample_is_read_by_chunk_and_is_a_uniform_draw_over_every_part(tmp_path):
    """The sample's plan names, for each chunk, only its parts' drawn rows; read back (as the Ray
    build does, one chunk per task) they are exactly the rows of one uniform draw over the corpus,
    in corpus order."""
    from retrack.data.source import vectors_table
    from retrack.index.shards import finish_chunk, read_sample, sample_plan, sample_vectors

    root, row, chunks = Location.parse(str(tmp_path)), 0, []
    for c, part_rows in enumerate([(300, 5), (0,), (120, 80, 410)]):  # an empty part, a part of 5
        dest = root / f"embeddings/chunk-{c}"
        (tmp_path / f"embeddings/chunk-{c}").mkdir(parents=True)
        for n, rows in enumerate(part_rows):
            values = np.arange(row, row + rows, dtype=np.float32)[:, None].repeat(3, axis=1)  # each vector holds its global row
            pq.write_table(vectors_table([f"i{r}" for r in range(row, row + rows)], values), str(tmp_path / f"embeddings/chunk-{c}/part-{n:06d}.parquet"))
            row += rows
        chunks.append((dest, finish_chunk(dest)))
    size, seed = 200, 3
    want = np.sort(np.random.default_rng(seed).choice(row, size=size, replace=False))
    plan = sample_plan(chunks, size, seed)
    assert len(plan) == 2  # the chunk with nothing in it is no task
    got = np.concatenate([read_sample(chunk) for chunk in plan])
    np.testing.assert_array_equal(got[:, 0], want)
    np.testing.assert_array_equal(sample_vectors(chunks, size, seed), got)
    assert len(sample_vectors(chunks, 10 * row, seed)) == row  # a sample larger than the corpus is the corpus
