"""The index stage on a real local Ray instance and a real SeaweedFS S3 server (started by fixtures)."""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pyarrow.fs as pafs
import pytest

from retrack.data.corpus import encode_image, write_shards
from retrack.data.neighbours import read_neighbours
from retrack.errors import CorpusError, StorageError
from retrack.index import IndexParams, find_duplicates, find_neighbours, open_index
from retrack.storage.location import Location
from tests.fixtures.corpora import clustered_images, write_corpus
from tests.fixtures.index import assert_same_neighbours, brute_force, run_failing_in_its_last_chunk

pytestmark = pytest.mark.integration


def upload(local_dir, s3, prefix: str) -> str:
    uri = s3.uri(prefix)
    fs = Location.parse(uri).fs
    pafs.copy_files(str(local_dir), Location.parse(uri).path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return uri


def test_build_from_s3_reuse_change_and_truncated_shard(ray_local, s3_env, bench_info, bench, bench_corpus, bench_forget, tmp_path):
    from pipelines.index import build

    info, paths, corpus, forget = bench_info, bench, bench_corpus, bench_forget
    run = uuid.uuid4().hex[:8]
    corpus_uri = upload(paths.corpus, s3_env, f"{run}/corpus")
    index_uri = s3_env.uri(f"{run}/index")

    import ray.data

    reservation = ray.data.DataContext.get_current().op_resource_reservation_enabled
    first = build(corpus_uri, index_uri, rows_per_chunk=500)
    assert first.status == "built" and first.manifest.count == len(corpus) and len(first.manifest.shards) == 4
    # The per-file encode turns Ray Data's CPU reservation off for its own dataset only.
    assert ray.data.DataContext.get_current().op_resource_reservation_enabled == reservation
    assert first.manifest.corpus["uri"] == corpus_uri
    idx = open_index(index_uri)
    nb = find_neighbours(idx, forget, k=6)
    assert_same_neighbours(nb, *brute_force(corpus, forget, 6))
    rep = find_duplicates(idx, forget[:1], 2 * info.forget_threshold, "add")
    assert sorted(rep.forget_ids) == sorted(forget)

    again = build(corpus_uri, index_uri, rows_per_chunk=500)
    assert again.status == "reused" and again.manifest.created_at == first.manifest.created_at

    # A shard object left truncated by a crash: detected and redone, alone.
    shard = Location.parse(index_uri) / "shards" / "shard-00002.faiss"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(StorageError, match="damaged"):
        open_index(index_uri)
    fixed = build(corpus_uri, index_uri, rows_per_chunk=500)
    assert fixed.status == "repaired" and fixed.built_shards == 1 and fixed.encoded_chunks == 0
    assert_same_neighbours(find_neighbours(open_index(index_uri), forget, k=6), *brute_force(corpus, forget, 6))

    # The corpus changes: one shard is rewritten with an altered image; only its chunk is re-encoded.
    rows = [{"id": i, "image": encode_image(np.zeros((8, 8), np.uint8))} for i in corpus.ids[512:1024]]
    write_shards(tmp_path / "changed", rows, shard_size=512)
    time.sleep(1.1)  # S3 modification times have one-second resolution
    (Location.parse(corpus_uri) / "part-00001.parquet").write_bytes((tmp_path / "changed" / "part-00000.parquet").read_bytes())
    rebuilt = build(corpus_uri, index_uri, rows_per_chunk=500)
    assert rebuilt.encoded_chunks == 1 and rebuilt.built_shards == 1
    assert rebuilt.manifest.corpus["digest"] != first.manifest.corpus["digest"]
    assert np.abs(open_index(index_uri).vectors(np.array([600]))).max() == 1.0  # all -1: the new black image

    # The same corpus as an IVF index: the quantizer is trained once, shards added in parallel tasks.
    ivf = build(corpus_uri, s3_env.uri(f"{run}/ivf"), params=IndexParams(type="ivf", nlist=16, nprobe=16), rows_per_chunk=500)
    assert ivf.manifest.index_type == "ivf" and len(ivf.manifest.shards) == 4
    assert len(open_index(s3_env.uri(f"{run}/ivf"))) == len(corpus)


def test_image_folder_on_s3_and_bad_input_through_ray(ray_local, s3_env, tmp_path):
    from PIL import Image

    from pipelines.index import build

    run = uuid.uuid4().hex[:8]
    folder = tmp_path / "imgs"
    folder.mkdir()
    images = clustered_images(30, seed=5)
    for n, im in enumerate(images):
        Image.fromarray(im).save(folder / f"p{n:03d}.png")
    (folder / "p999.png").write_bytes(b"\x89PNG broken")
    uri = upload(folder, s3_env, f"{run}/imgs")
    with pytest.raises(CorpusError, match="item 'p999': image bytes cannot be decoded") as caught:
        build(uri, s3_env.uri(f"{run}/idx"), format="imagefolder")
    # The map task's own error (found by cause), with retrack's message alone: no Ray traceback or hints.
    assert type(caught.value) is CorpusError and "\n" not in str(caught.value)
    res = build(uri, s3_env.uri(f"{run}/idx"), on_bad="skip", format="imagefolder")
    assert res.manifest.count == 30 and res.manifest.skipped == 1
    report = (Location.parse(s3_env.uri(f"{run}/idx")) / "bad_rows.jsonl").read_text()
    assert json.loads(report.splitlines()[0])["id"] == "p999"
    idx = open_index(s3_env.uri(f"{run}/idx"))
    row = idx.ids.to_pylist().index("p007")
    np.testing.assert_allclose(idx.vectors(np.array([row]))[0], images[7].reshape(-1) / 127.5 - 1, atol=1e-6)

    # Unreadable image bytes inside a parquet corpus, found by a Ray Data task.
    local = tmp_path / "c"
    ids = write_corpus(local, clustered_images(20, seed=6), shard_size=10)
    rows = [{"id": i, "image": encode_image(im)} for i, im in zip(ids, clustered_images(20, seed=6))]
    rows[13]["image"] = b"garbage"
    write_shards(local, rows, shard_size=10)
    bad_uri = upload(local, s3_env, f"{run}/bad")
    with pytest.raises(CorpusError, match="item 'item-000013'.*cannot be decoded") as caught:
        build(bad_uri, s3_env.uri(f"{run}/idx-bad"))
    assert type(caught.value) is CorpusError and "\n" not in str(caught.value)
    skipped = build(bad_uri, s3_env.uri(f"{run}/idx-bad"), on_bad="skip")
    assert skipped.manifest.count == 19 and skipped.manifest.skipped == 1
    report = (Location.parse(s3_env.uri(f"{run}/idx-bad")) / "bad_rows.jsonl").read_text().splitlines()
    assert [json.loads(r)["id"] for r in report] == ["item-000013"]

    with pytest.raises(StorageError, match=f"bucket 'no-such-bucket-{run}' does not exist"):
        build(f"s3://no-such-bucket-{run}/corpus", s3_env.uri(f"{run}/idx-x"))


def test_a_failed_ray_run_keeps_the_chunks_it_finished(ray_local, tmp_path):
    from pipelines.index import build

    # One dataset streams all six chunks; with 2 CPUs the bad last file starts after 4 are written.
    finished, encoded = run_failing_in_its_last_chunk(tmp_path, build)
    assert finished >= 4 and encoded == 6 - finished


def test_cli_build_on_ray_from_s3(ray_local, s3_env, bench, bench_corpus, bench_forget, tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli.index import cli

    paths, corpus, forget = bench, bench_corpus, bench_forget
    run = uuid.uuid4().hex[:8]
    corpus_uri = upload(paths.corpus, s3_env, f"{run}/corpus")
    res = CliRunner().invoke(cli, ["build", corpus_uri, s3_env.uri(f"{run}/index"), "--rows-per-chunk", "900"])
    assert res.exit_code == 0, res.output
    assert "index built: 1666 vectors" in res.output
    (tmp_path / "f.txt").write_text("\n".join(forget) + "\n")
    res = CliRunner().invoke(cli, ["neighbours", s3_env.uri(f"{run}/index"), "--forget", str(tmp_path / "f.txt"),
                                   "-k", "3", "--out", s3_env.uri(f"{run}/nb.json")])
    assert res.exit_code == 0, res.output
    nb = read_neighbours(s3_env.uri(f"{run}/nb.json"), forget, 3)
    assert list(nb.values()) == brute_force(corpus, forget, 3)[1]


@pytest.mark.slow  # 38 s per layout
@pytest.mark.parametrize("layout", ["parquet", "webdataset"])
def test_vae_latents_through_a_ray_actor_pool_match_the_local_loop(ray_local, tmp_path, layout):
    """The VAE runs in Ray Data actors (fractional CPUs, no GPU here): same vectors as in-process.
    Parquet shards are read by Ray Data's reader, WebDataset shards by retrack's in Ray tasks."""
    import torch
    from diffusers import AutoencoderKL

    from pipelines.index import build
    from retrack.index import EncoderSpec, build_index

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    images = np.random.default_rng(2).integers(0, 256, size=(24, 16, 16, 3), dtype=np.uint8)
    write_corpus(tmp_path / "c", images, shard_size=8, layout=layout)
    spec = EncoderSpec(kind="vae", model_dir=str(tmp_path / "vae"), resolution=16, device="cuda")
    seen = []
    on_ray = build(str(tmp_path / "c"), str(tmp_path / "ray-idx"), encoder=spec, rows_per_chunk=8, format=layout,
                   progress=lambda phase, done, total: seen.append((done, total)) if phase == "encode" else None)
    assert seen == [(0, 24), (8, 24), (16, 24), (24, 24)]  # rows, chunk by chunk, as every executor counts them
    local = build_index(tmp_path / "c", tmp_path / "local-idx", encoder=spec, rows_per_chunk=8, format=layout)
    assert on_ray.manifest.dim == local.manifest.dim == 256
    a, b = open_index(tmp_path / "ray-idx"), open_index(tmp_path / "local-idx")
    rows_b = {i: n for n, i in enumerate(b.ids.to_pylist())}
    order = np.array([rows_b[i] for i in a.ids.to_pylist()])
    np.testing.assert_allclose(a.vectors(np.arange(24)), b.vectors(order), rtol=1e-4, atol=1e-5)
