"""Build (or reuse, or repair) the index of a corpus. The plan is here; the work goes to an executor.

    build_index(corpus_uri, index_uri, EncoderSpec(...), IndexParams(...), executor=None, format="parquet")

1. Scan the corpus (ids and captions, in its format) and refuse bad input before anything is encoded.
2. If the manifest matches (corpus digest, encoder digest, build parameters) and every shard's
   files are intact, reuse the index as it is.
3. Otherwise encode the chunks that have no complete embedding folder (a chunk's key is its
   files' digest and the encoder's, so chunks untouched by a corpus change are not re-encoded),
   train the IVF quantizer on a sample (IVF types), build every shard whose record is missing,
   stale or whose files are truncated, and write the manifest last.

`LocalExecutor` runs the work in this process (a plain loop: no Ray). `pipelines.index` provides
the Ray executor: a streaming Ray Data encode and one Ray task per shard.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable, Protocol

import pyarrow.parquet as pq

from retrack.data.corpus import FIT_RULE
from retrack.errors import CorpusError, StorageError
from retrack.models.encoders import EncoderSpec, build_encoder, embedding_table
from retrack.index.manifest import FileRecord, IndexParams, Manifest, ShardRecord
from retrack.index.shards import (
    build_shard,
    chunk_info,
    chunk_key,
    embeddings_dir,
    finish_chunk,
    read_shard_record,
    shard_config,
    train_index,
    write_bad_rows,
)
from retrack.data.source import (
    Chunk,
    CorpusPlan,
    SourceFile,
    decode_batch,
    iter_file_batches,
    plan_chunks,
    scan_corpus,
)
from retrack.storage.location import Location, S3Options

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class EncodeJob:
    chunk: Chunk
    key: str
    dest: Location


@dataclass
class ShardJob:
    number: int
    key: str
    dim: int


class Executor(Protocol):
    def encode(self, plan: CorpusPlan, jobs: list[EncodeJob], encoder: EncoderSpec, on_bad: str, progress: Progress | None,
               chunk_done: Callable[[EncodeJob], None] | None = None) -> None:
        """Write each job's embedding parquet files under job.dest, calling `chunk_done(job)` as soon
        as a job's files are all written (build_index marks the chunk complete there, so a crash
        later in the run keeps it)."""

    def train(self, root: Location, keys: list[str], infos: list[dict], params: IndexParams) -> tuple[bytes, int | None, float]:
        """`retrack.index.shards.train_index` where the work runs."""

    def build_shards(self, root: Location, jobs: list[ShardJob], params: IndexParams, quantizer: FileRecord | None,
                     progress: Progress | None) -> list[ShardRecord]:
        ...


@dataclass
class BuildResult:
    manifest: Manifest
    status: str  # reused | built | repaired
    encoded_chunks: int = 0
    built_shards: int = 0
    seconds: float = 0.0
    bad_rows: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# The single-process executor (also the reference loop the Ray stage is benchmarked against)
# --------------------------------------------------------------------------------------------


def encode_chunk_loop(plan: CorpusPlan, job: EncodeJob, encoder, on_bad: str, batch_size: int = 512,
                      progress: Callable[[int], None] | None = None) -> None:
    """Encode one chunk in this process: one embedding parquet file per corpus file."""
    job.dest.remove()
    for n, f in enumerate(job.chunk.files):
        encode_file(plan, f, n, job.dest, encoder, on_bad, batch_size, progress)


def encode_files(plan: CorpusPlan, files: Iterable[tuple[SourceFile, int]], dest: Location, encoder, on_bad: str,
                 batch_size: int = 512) -> None:
    """Encode each corpus file `f` of (f, n) in `files` into part n of `dest`: one Ray task's (or
    one plain process's) share of a chunk."""
    for f, n in files:
        encode_file(plan, f, int(n), dest, encoder, on_bad, batch_size)


def encode_file(plan: CorpusPlan, f: SourceFile, n: int, dest: Location, encoder, on_bad: str, batch_size: int = 512,
                progress: Callable[[int], None] | None = None) -> None:
    """Encode corpus file `f` into `dest/part-<n>.parquet`, batch by batch (never the whole file in
    memory), and its skipped rows into `dest/_bad/`. Rerunning it rewrites the same part."""
    sink = None
    bad_all = []
    try:
        for ids, blobs, *_ in iter_file_batches(plan, f, batch_size):
            keep, pixels, bad = decode_batch(ids, blobs, [f.rel] * len(ids), plan.image_shape, on_bad)
            bad_all.extend(bad)
            if keep:
                table = embedding_table(encoder, keep, pixels)
                if sink is None:
                    out = (dest / f"part-{n:06d}.parquet").open_output()
                    sink = (out, pq.ParquetWriter(out, table.schema))
                sink[1].write_table(table)
            if progress:
                progress(len(ids))
    except CorpusError as exc:
        if on_bad == "fail" or plan.format != "imagefolder":  # a shard's fault is not one row's
            raise
        bad_all.append(_bad_file(f.rel, exc))
    finally:
        if sink is not None:
            sink[1].close()
            sink[0].close()
    write_bad_rows(dest, f"part-{n:06d}", bad_all)


def _bad_file(rel: str, exc: Exception):
    from retrack.data.source import BadRow, image_id

    return BadRow(image_id(rel), rel, str(exc))


class LocalExecutor:
    def __init__(self, threads: int = 1, batch_size: int = 512):
        self.threads = threads
        self.batch_size = batch_size

    def encode(self, plan, jobs, encoder, on_bad, progress=None, chunk_done=None):
        enc = build_encoder(encoder)
        total = sum(j.chunk.rows for j in jobs)
        done = 0

        def tick(n):
            nonlocal done
            done += n
            if progress:
                progress("encode", done, total)

        for job in jobs:
            encode_chunk_loop(plan, job, enc, on_bad, self.batch_size, tick)
            if chunk_done:
                chunk_done(job)

    def train(self, root, keys, infos, params):
        return train_index(root, keys, infos, params, self.threads)

    def build_shards(self, root, jobs, params, quantizer, progress=None):
        out = []
        for n, job in enumerate(jobs):
            out.append(build_shard(root, job.number, job.key, params, quantizer, self.threads, job.dim))
            if progress:
                progress("shards", n + 1, len(jobs))
        return out


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


def build_index(
    corpus: "str | Location | CorpusPlan",
    out: "str | Location",
    encoder: EncoderSpec = EncoderSpec(),
    params: IndexParams = IndexParams(),
    executor: Executor | None = None,
    on_bad: str = "fail",
    rows_per_chunk: int = 200_000,
    force: bool = False,
    endpoint: str | None = None,
    progress: Progress | None = None,
    keep_embeddings: bool = True,
    format: str = "parquet",
) -> BuildResult:
    """Build, reuse or repair the index of `corpus` (of the given format) under `out` (local paths
    or s3:// URIs). `corpus` may be a plan the caller scanned already (with this `on_bad`): it is
    not listed and read again."""
    start = time.perf_counter()
    executor = executor or LocalExecutor()
    # Credentials are resolved here, on the driver, so that Ray workers started before the
    # environment was set still reach the store (the options travel with every Location).
    s3 = S3Options(endpoint=endpoint).resolved()
    root = Location.parse(out, s3=s3)
    root.check_reachable()
    if isinstance(corpus, CorpusPlan):
        plan = replace(corpus, root=Location(corpus.root.uri, s3), chunks=plan_chunks(corpus.files, rows_per_chunk))
    else:
        plan = scan_corpus(Location.parse(corpus, s3=s3), format, rows_per_chunk=rows_per_chunk, on_bad=on_bad)
    enc_digest = encoder.digest()
    params.resolve(max(plan.count, 1), encoder.vector_dim(plan.image_shape))  # bad parameters refused before any encoding
    keys = [chunk_key(c.digest(), enc_digest, plan.image_shape, on_bad) for c in plan.chunks]
    corpus_info = {
        "uri": plan.root.uri, "format": plan.format, "digest": plan.digest(), "files": len(plan.files),
        "rows": plan.count, "image_shape": list(plan.image_shape), "fit": FIT_RULE, "on_bad": on_bad,
    }
    try:
        old = None if force else Manifest.read(root)
    except StorageError as exc:
        log.warning("ignoring the old manifest: %s", exc)
        old = None

    # 1. Reuse: same inputs, same parameters, every shard intact.
    if old is not None and old.corpus["digest"] == corpus_info["digest"] and old.encoder["digest"] == enc_digest \
            and old.corpus.get("on_bad") == on_bad and _same_request(old, params) \
            and [s.chunk_key for s in old.shards] == keys:
        broken = [s for s in old.shards if not s.valid(root)]
        quantizer_ok = old.quantizer is None or old.quantizer.valid_size(root)
        if not broken and quantizer_ok:
            log.info("index %s is up to date (%d vectors, %d shards): reused", root.uri, old.count, len(old.shards))
            return BuildResult(old, "reused", seconds=time.perf_counter() - start)
        log.warning("index %s: %d damaged shard(s); rebuilding them", root.uri, len(broken))

    # 2. Encode every chunk without a complete embedding folder.
    jobs = [EncodeJob(c, k, embeddings_dir(root, k)) for c, k in zip(plan.chunks, keys)]
    todo = [j for j in jobs if force or chunk_info(j.dest) is None]
    if todo:
        log.info("encoding %d of %d chunk(s) (%d items)", len(todo), len(jobs), sum(j.chunk.rows for j in todo))
        for j in todo:
            j.dest.remove()
        if progress:  # the first results take a while (on Ray, workers start): the encode has begun
            progress("encode", 0, sum(j.chunk.rows for j in todo))
        executor.encode(plan, todo, encoder, on_bad, progress, chunk_done=lambda j: finish_chunk(j.dest))
    infos = [chunk_info(j.dest) for j in jobs]
    if any(i is None for i in infos):
        raise StorageError(f"the encode stage left unfinished embedding chunks under {root.uri}/embeddings")
    bad = [b for i in infos for b in i["bad"]]
    if sum(i["rows"] for i in infos) == 0:
        raise CorpusError(f"no item of corpus {plan.root.uri} could be encoded ({len(bad)} skipped)")
    resolved, quantizer, shards, n_built = index_chunks(root, keys, params, executor, old, force, progress)
    dim = next(s.dim for s in shards if s.count)

    manifest = Manifest(
        corpus=corpus_info,
        encoder={"spec": encoder.to_dict(), "digest": enc_digest},
        dim=dim,
        count=sum(s.count for s in shards),
        skipped=len(bad),
        index_type=resolved.type,
        params=asdict(resolved),
        quantizer=quantizer,
        shards=shards,
        build_seconds=round(time.perf_counter() - start, 3),
    )
    if bad:
        (root / "bad_rows.jsonl").write_text("".join(json.dumps(b) + "\n" for b in bad))
        log.warning("%d corpus item(s) were skipped (on_bad=skip); see %s", len(bad), (root / "bad_rows.jsonl").uri)
    manifest.write(root)
    _collect_garbage(root, set(keys), len(keys), keep_embeddings)
    status = "built" if old is None or n_built == len(keys) else "repaired"
    return BuildResult(manifest, status, encoded_chunks=len(todo), built_shards=n_built,
                       seconds=time.perf_counter() - start, bad_rows=bad)


def index_chunks(root: Location, keys: list[str], params: IndexParams, executor: Executor,
                 old: Manifest | None = None, force: bool = False, progress: Progress | None = None,
                 ) -> tuple[IndexParams, FileRecord | None, list[ShardRecord], int]:
    """Index encoded chunks (embeddings/<key>/, complete): train the empty index if it needs it, then build
    the shards that are missing, stale or damaged. Returns (params, quantizer, shards, built)."""
    infos = [chunk_info(embeddings_dir(root, k)) for k in keys]
    if any(i is None for i in infos):
        raise StorageError(f"unfinished embedding chunks under {root.uri}/embeddings")
    count = sum(i["rows"] for i in infos)
    dim = next(i["dim"] for i in infos if i["rows"])
    resolved = params.resolve(count, dim)
    quantizer = None
    if resolved.trained:
        same_inputs = old is not None and old.quantizer is not None and old.index_params.build_digest() == resolved.build_digest() \
            and [s.chunk_key for s in old.shards] == keys and old.quantizer.valid_size(root) and not force
        if same_inputs:
            quantizer = old.quantizer
            if resolved.nprobe is None:
                resolved = replace(resolved, nprobe=old.index_params.nprobe)
        else:
            log.info("training the %s index (nlist %s, pca %s) on %d sampled vectors", resolved.type, resolved.nlist, resolved.pca,
                     resolved.train_size)
            data, nprobe, recall = executor.train(root, keys, infos, resolved)
            quantizer = FileRecord.of(root, "quantizer.faiss", data)
            (root / "quantizer.faiss").write_bytes(data)
            if resolved.nprobe is None and nprobe is not None:
                log.info("nprobe %d reaches recall@10 %.3f on held-out sample queries", nprobe, recall)
                resolved = replace(resolved, nprobe=nprobe, calibrated_recall=round(recall, 4))
    config = shard_config(resolved, quantizer)
    records: dict[int, ShardRecord] = {}
    shard_jobs = []
    for n, k in enumerate(keys):
        rec = None if force else read_shard_record(root, n)
        if rec is not None and rec.chunk_key == k and rec.config == config and rec.valid(root):
            records[n] = rec
        else:
            shard_jobs.append(ShardJob(n, k, dim))
    if shard_jobs:
        log.info("building %d of %d shard(s)", len(shard_jobs), len(keys))
        for rec in executor.build_shards(root, shard_jobs, resolved, quantizer, progress):
            records[rec.number] = rec
    return resolved, quantizer, [records[n] for n in range(len(keys))], len(shard_jobs)


def _same_request(old: Manifest, params: IndexParams) -> bool:
    """Does the stored index answer this request? (An explicit nprobe is a search setting.)"""
    want = params.resolve(old.count, old.dim) if old.count else None
    return want is not None and want.build_digest() == old.index_params.build_digest()


def _collect_garbage(root: Location, keys: set[str], n_shards: int, keep_embeddings: bool) -> None:
    emb = root / "embeddings"
    seen = set()
    for e in emb.list(hidden=True):
        seen.add(e.location.relative_to(emb).split("/", 1)[0])
    for key in seen:
        if key not in keys or not keep_embeddings:
            (emb / key).remove()
    for e in (root / "shards").list(hidden=True):
        name = e.location.name
        try:
            number = int(name.split("-", 1)[1].split(".", 1)[0])
        except (IndexError, ValueError):
            continue
        if number >= n_shards:
            e.location.remove()
