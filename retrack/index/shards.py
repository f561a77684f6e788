"""Embedding chunks and index shards on storage (faiss I/O only, never pickle).

Layout under an index root:

    embeddings/<chunk-key>/*.parquet     (id, vector) written by the encode stage
    embeddings/<chunk-key>/_SUCCESS.json  files with sizes and rows, skipped rows: written last
    quantizer.faiss                       the trained, empty IVF index (IVF types only)
    shards/shard-NNNNN.faiss              faiss.serialize_index of one chunk's vectors
    shards/shard-NNNNN.ids.parquet        the ids, in index order
    shards/shard-NNNNN.vec                the indexed vectors, raw float32 row-major (random access)
    shards/shard-NNNNN.lat                pooled-latent indexes only: the full latents, raw float16
                                          row-major, read by row for the re-rank (never loaded whole)
    shards/shard-NNNNN.json               the shard's record: written last, sizes and sha256
    manifest.json                         written last of all

A chunk folder without its `_SUCCESS.json`, or whose files differ in size from it, is unfinished
and encoded again; a shard whose record is missing or whose files differ in size is built again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrack.digest import config_digest, sha256_bytes
from retrack.errors import StorageError
from retrack.index.manifest import FileRecord, IndexParams, ShardRecord
from retrack.data.source import BadRow, table_vectors
from retrack.storage.location import Location

SUCCESS = "_SUCCESS.json"
BAD_DIR = "_bad"


def chunk_key(chunk_digest: str, encoder_digest: str, image_shape: Sequence[int], on_bad: str) -> str:
    return config_digest([chunk_digest, encoder_digest, list(image_shape), on_bad])[:24]


def embeddings_dir(root: Location, key: str) -> Location:
    return root / "embeddings" / key


# --------------------------------------------------------------------------------------------
# Embedding chunks
# --------------------------------------------------------------------------------------------


def write_bad_rows(dest: Location, name: str, bad: list[BadRow]) -> None:
    if bad:
        (dest / BAD_DIR / f"{name}.jsonl").write_text("".join(json.dumps(asdict(b)) + "\n" for b in bad))


def finish_chunk(dest: Location) -> dict:
    """Record a fully written chunk: its parquet parts (name, size, rows), dim and skipped rows."""
    parts = []
    dim, latents = None, False
    for e in dest.list(suffixes=(".parquet",)):
        with e.location.open_input() as f:
            meta = pq.ParquetFile(f)
            rows = meta.metadata.num_rows
            t = meta.schema_arrow.field("vector").type
            dim = t.list_size if dim is None else dim
            latents = "latent" in meta.schema_arrow.names
        parts.append({"name": e.location.relative_to(dest), "size": e.size, "rows": rows})
    bad: list[dict] = []
    for e in dest.list(hidden=True):
        if e.location.relative_to(dest).startswith(BAD_DIR + "/"):
            bad.extend(json.loads(line) for line in e.location.read_text().splitlines() if line)
    info = {"parts": parts, "rows": sum(p["rows"] for p in parts), "dim": dim, "latents": latents, "bad": bad}
    (dest / SUCCESS).write_json(info)
    return info


def chunk_info(dest: Location) -> dict | None:
    """The chunk's record if it is complete and its files are intact, else None."""
    marker = dest / SUCCESS
    if not marker.exists():
        return None
    try:
        info = marker.read_json()
        sizes = {e.location.relative_to(dest): e.size for e in dest.list(suffixes=(".parquet",))}
    except (StorageError, ValueError):
        return None
    if sizes != {p["name"]: p["size"] for p in info["parts"]}:
        return None
    return info


def iter_chunk_tables(dest: Location, info: dict, batch_size: int = 8192, latents: bool = False) -> Iterator[pa.Table]:
    columns = ["id", "vector", "latent"] if latents else ["id", "vector"]
    for p in sorted(info["parts"], key=lambda p: p["name"]):
        with (dest / p["name"]).open_input() as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns):
                yield pa.Table.from_batches([batch])


# --------------------------------------------------------------------------------------------
# Quantizer
# --------------------------------------------------------------------------------------------


def sample_plan(chunks: list[tuple[Location, dict]], size: int, seed: int) -> list[list[tuple[Location, np.ndarray]]]:
    """Where `size` rows drawn uniformly without replacement across the chunks fall: for each chunk
    with some, its parts' (location, rows drawn, ascending). Bounded by `size`, not by the corpus."""
    parts = [[(dest / p["name"], int(p["rows"])) for p in sorted(info["parts"], key=lambda p: p["name"])] for dest, info in chunks]
    starts = np.cumsum([0] + [n for chunk in parts for _, n in chunk])
    size = min(size, int(starts[-1]))
    wanted = np.sort(np.random.default_rng(seed).choice(int(starts[-1]), size=size, replace=False))
    cuts = np.searchsorted(wanted, starts)
    out, n = [], 0
    for chunk in parts:
        drawn = []
        for loc, _ in chunk:
            if cuts[n + 1] > cuts[n]:
                drawn.append((loc, wanted[cuts[n]:cuts[n + 1]] - starts[n]))
            n += 1
        if drawn:
            out.append(drawn)
    return out


def read_sample(parts: list[tuple[Location, np.ndarray]]) -> np.ndarray:
    """The vectors at the given rows of each embedding part, in order: the vector column alone,
    streamed (one chunk's share of the training sample, read wherever the caller runs it)."""
    out = []
    for loc, rows in parts:
        offset, w = 0, 0
        with loc.open_input() as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=8192, columns=["vector"]):
                hi = np.searchsorted(rows, offset + batch.num_rows, side="left")
                if hi > w:
                    out.append(table_vectors(pa.Table.from_batches([batch]))[rows[w:hi] - offset])
                    w = hi
                offset += batch.num_rows
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def sample_vectors(chunks: list[tuple[Location, dict]], size: int, seed: int) -> np.ndarray:
    """`size` rows drawn uniformly without replacement across the chunks, streamed."""
    parts = [read_sample(chunk) for chunk in sample_plan(chunks, size, seed)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def new_index(params: IndexParams, dim: int):
    import faiss

    if params.pca is not None:
        # faiss's Python constructor keeps the projection and the inner index alive with it.
        return faiss.IndexPreTransform(faiss.PCAMatrix(dim, params.pca), new_index(replace(params, pca=None), params.pca))
    if params.type == "flat":
        return faiss.IndexFlatL2(dim)
    quantizer = faiss.IndexFlatL2(dim)
    if params.type == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, params.nlist, faiss.METRIC_L2)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, params.nlist, params.pq_m, params.pq_bits)
    index.own_fields = True
    quantizer.this.disown()
    index.cp.seed = params.seed
    index.cp.niter = 16
    return index


def train_quantizer(params: IndexParams, sample: np.ndarray, threads: int | None = None) -> bytes:
    """An empty index trained on `sample` (its IVF lists, PQ codebooks, PCA), serialised with faiss."""
    import faiss

    if threads:
        faiss.omp_set_num_threads(threads)
    index = new_index(params, sample.shape[1])
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    if params.pca is not None:
        # The full eigenvector basis (d_in² floats, 1 GB for an SD latent at 512²) is training's;
        # the projection is A and b. Every shard carries a copy of this index.
        faiss.downcast_VectorTransform(index.chain.at(0)).PCAMat.clear()
    return faiss.serialize_index(index).tobytes()


def calibrate_nprobe(params: IndexParams, quantizer: bytes, sample: np.ndarray, k: int = 10, queries: int = 200) -> tuple[int, float]:
    """Smallest power-of-two nprobe whose recall@k on held-out sample queries reaches the target.

    The sample (already in memory for training) stands in for the corpus: its points are sparser,
    so neighbours are farther and the estimate errs on the side of more probes. For a projected
    index the truth is exact search in the projected space: nprobe decides which lists are
    searched, not what the projection loses (the re-rank's margin makes up for that).
    """
    import faiss

    rng = np.random.default_rng(params.seed + 1)
    perm = rng.permutation(len(sample))
    q, base = sample[perm[:queries]], np.ascontiguousarray(sample[perm[queries:]])
    index = faiss.deserialize_index(np.frombuffer(quantizer, dtype=np.uint8))
    index.add(base)
    space = (lambda x: x) if params.pca is None else faiss.downcast_VectorTransform(index.chain.at(0)).apply
    flat = faiss.IndexFlatL2(params.pca or base.shape[1])
    flat.add(space(base))
    _, truth = flat.search(space(q), k)
    # PQ's candidates are re-ranked on full vectors: what counts is the truth among K + margin.
    depth = k if params.type == "ivf" else k + max(4 * k, 64)
    nprobe, recall = 1, 0.0
    while True:
        faiss.extract_index_ivf(index).nprobe = nprobe
        _, got = index.search(q, depth)
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth)]))
        if recall >= params.target_recall or nprobe >= params.nlist:
            return nprobe, recall
        nprobe = min(2 * nprobe, params.nlist)


def train_index(root: Location, keys: list[str], infos: list[dict], params: IndexParams, threads: int | None = None,
                ) -> tuple[bytes, int | None, float]:
    """Draw the training sample from the encoded chunks and train on it (`train_on_sample`), in
    this process."""
    sample = sample_vectors([(embeddings_dir(root, k), i) for k, i in zip(keys, infos)], params.train_size, params.seed)
    return train_on_sample(params, threads, sample)


def train_on_sample(params: IndexParams, threads: int | None, *samples: np.ndarray) -> tuple[bytes, int | None, float]:
    """Train the empty index on the sample (given in parts) and, for IVF unless nprobe is given,
    calibrate nprobe: (serialised index, nprobe, recall@10)."""
    sample = np.concatenate(samples) if len(samples) > 1 else samples[0]
    data = train_quantizer(params, sample, threads)
    if params.nprobe is not None or params.type == "flat":
        return data, params.nprobe, float("nan")
    nprobe, recall = calibrate_nprobe(params, data, sample)
    return data, nprobe, recall


def shard_config(params: IndexParams, quantizer: FileRecord | None) -> str:
    return config_digest([params.build_digest(), quantizer.sha256 if quantizer else None])


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------


def shard_name(number: int) -> str:
    return f"shards/shard-{number:05d}"


def build_shard(
    root: Location,
    number: int,
    key: str,
    params: IndexParams,
    quantizer: FileRecord | None,
    threads: int = 1,
    dim: int | None = None,
) -> ShardRecord:
    """Add one encoded chunk to a copy of the trained quantizer (or a flat index) and write it.

    Streams the chunk: memory is the index's own (the full vectors for flat, codes for IVF-PQ) plus
    one batch. The record is written last, so a crash leaves a shard that the next build redoes.
    """
    import faiss

    faiss.omp_set_num_threads(max(1, int(threads)))
    dest = embeddings_dir(root, key)
    info = chunk_info(dest)
    if info is None:
        raise StorageError(f"embedding chunk {dest.uri} is incomplete; encode it before building shard {number}")
    dim = int(dim or info["dim"] or 0)
    if quantizer is not None:
        raw = (root / quantizer.name).read_bytes()
        if sha256_bytes(raw) != quantizer.sha256:
            raise StorageError(f"{(root / quantizer.name).uri} does not match its recorded sha256")
        index = faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8))
    else:
        index = new_index(params, dim)
    base = shard_name(number)
    (root / f"{base}.json").remove()
    latents = info.get("latents", False)
    ids: list[str] = []
    with _RawWriter(root, f"{base}.vec") as vec, _RawWriter(root, f"{base}.lat", open_file=latents) as lat:
        for table in iter_chunk_tables(dest, info, latents=latents):
            x = table_vectors(table)
            if len(x) == 0:
                continue
            index.add(x)
            vec.write(x.tobytes())
            if latents:
                lat.write(table_vectors(table, "latent").tobytes())
            ids.extend(table.column("id").to_pylist())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": pa.array(ids, type=pa.string())}), sink)
    ids_bytes = sink.getvalue().to_pybytes()
    (root / f"{base}.ids.parquet").write_bytes(ids_bytes)
    index_bytes = faiss.serialize_index(index).tobytes()
    (root / f"{base}.faiss").write_bytes(index_bytes)
    record = ShardRecord(
        number=number,
        chunk_key=key,
        config=shard_config(params, quantizer),
        count=len(ids),
        dim=dim,
        faiss=FileRecord.of(root, f"{base}.faiss", index_bytes),
        ids=FileRecord.of(root, f"{base}.ids.parquet", ids_bytes),
        vectors=vec.record,
        latents=lat.record if latents else None,
    )
    (root / f"{base}.json").write_json(asdict(record))
    return record


class _RawWriter:
    """A raw file written in pieces, its size and sha256 kept for the shard's record."""

    def __init__(self, root: Location, name: str, open_file: bool = True):
        import hashlib

        self.name, self.size, self.hash = name, 0, hashlib.sha256()
        self.file = (root / name).open_output() if open_file else None

    def __enter__(self) -> "_RawWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.hash.update(data)
        self.size += len(data)

    @property
    def record(self) -> FileRecord:
        return FileRecord(self.name, self.size, self.hash.hexdigest())


def read_shard_record(root: Location, number: int) -> ShardRecord | None:
    loc = root / f"{shard_name(number)}.json"
    try:
        if not loc.exists():
            return None
        return ShardRecord.from_dict(loc.read_json())
    except (StorageError, ValueError, TypeError, KeyError):
        return None


def read_verified(root: Location, rec: FileRecord) -> bytes:
    data = (root / rec.name).read_bytes()
    if len(data) != rec.size or sha256_bytes(data) != rec.sha256:
        raise StorageError(
            f"{(root / rec.name).uri} is damaged ({len(data)} bytes, recorded {rec.size}; sha256 differs): "
            "run the index build again to redo this shard"
        )
    return data


def load_shard_index(root: Location, rec: ShardRecord):
    import faiss

    return faiss.deserialize_index(np.frombuffer(read_verified(root, rec.faiss), dtype=np.uint8))


def load_shard_ids(root: Location, rec: ShardRecord) -> pa.Array:
    data = read_verified(root, rec.ids)
    return pq.read_table(pa.BufferReader(data)).column("id").combine_chunks()
