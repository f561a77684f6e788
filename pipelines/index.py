"""The index stage on Ray: a streaming Ray Data encode and parallel shard tasks (its commands,
`retrack index ...`, are in `pipelines.cli.index`).

The plan (what to reuse, what to redo) is `retrack.index.build_index`; this module only supplies
the `RayExecutor` that does the work on a cluster:

- encode, per chunk, from a local path or S3; streaming: the driver never holds the corpus.
  - Parquet or WebDataset shards with the pixel encoder: a Ray Data dataset of the chunk's files whose
    `map_batches` task reads, decodes, encodes and writes one file, batch by batch
    (`retrack.index.build.encode_file`, the single-process loop's own function). Ray Data's
    `read_parquet` -> `map_batches` -> `write_parquet` chain did the same work ~45% slower per
    row inside its tasks (40,000 64x64 images: 15 s against the loop's 10.5 s on one CPU; the
    same code run by Ray Data one file per task: 2.7 s per 10,000 rows, the loop's speed).
  - An image folder, or the VAE: `ray.data.read_parquet` (`read_binary_files` for a folder; for
    WebDataset shards a dataset of files whose tasks stream rows with the library's own reader),
    `map_batches` to decode, check, normalise and encode, `write_parquet` of (id, vector); memory
    stays bounded by Ray Data's backpressure. The pixel encoder runs as a plain function (fused
    with the read); the VAE runs in an actor pool (the model is loaded once per actor, on a GPU
    when the cluster has GPUs), every actor taking a fraction of a CPU so the reads can run.
- shards: one Ray task per shard, each with one faiss thread per CPU it holds.
- serving (`serve_index`): one Ray actor per shard loads and searches it; the caller merges.

Ray is imported inside functions so that `retrack --help` stays fast.
"""

from __future__ import annotations

import functools
import logging
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from pipelines.runtime import ensure_ray, get, unwrap
from retrack.data.source import CorpusPlan
from retrack.errors import RetrackError

if TYPE_CHECKING:
    from retrack.index import ShardedIndex


class _EncodeBatch:
    """map_batches UDF: decode + check + encode one batch; rows skipped under on_bad=skip are
    reported to `<chunk>/_bad/` (never to logs)."""

    def __init__(self, spec, image_shape, on_bad, dest, id_column, image_column):
        from dataclasses import replace

        from retrack.models.encoders import build_encoder
        from retrack.storage.cache import local_model_dir
        from retrack.storage.location import is_s3

        if spec.model_dir and is_s3(spec.model_dir):  # on the index's store, with the credentials the driver resolved
            spec = replace(spec, model_dir=str(local_model_dir(spec.model_dir, s3=dest.s3)))
        self.encoder = build_encoder(spec)
        self.image_shape, self.on_bad, self.dest = tuple(image_shape), on_bad, dest
        self.id_column, self.image_column = id_column, image_column
        import numpy as np

        from retrack.models.encoders import embedding_table

        # An empty batch still writes the schema every other batch has.
        self.schema = embedding_table(self.encoder, ["_probe"], np.zeros((1, *self.image_shape), np.uint8)).schema

    def __call__(self, batch):
        from retrack.index.shards import write_bad_rows
        from retrack.data.source import decode_batch, image_id
        from retrack.models.encoders import embedding_table

        sources = [str(p) for p in batch.column("path").to_pylist()]
        if self.id_column is None:
            root = self.dest_root_prefix
            ids = [image_id(s[len(root):] if s.startswith(root) else s) for s in sources]
        else:
            ids = batch.column(self.id_column).to_pylist()
        blobs = batch.column(self.image_column).to_pylist()
        keep, pixels, bad = decode_batch(ids, blobs, sources, self.image_shape, self.on_bad)
        if bad:
            write_bad_rows(self.dest, uuid.uuid4().hex, bad)
        if not keep:
            return self.schema.empty_table()
        return embedding_table(self.encoder, keep, pixels)

    dest_root_prefix = ""


def _encode_fn(block, spec, image_shape, on_bad, dest, id_column, image_column, root_prefix, batch_size):
    """The pixel encoder as a plain function over a whole read block (so Ray fuses read, encode and
    write into one task: no object-store hop), yielding `batch_size`-row pieces to bound memory."""
    udf = _encode_fn_cache.get((spec, tuple(image_shape)))
    if udf is None:
        udf = _EncodeBatch(spec, image_shape, on_bad, dest, id_column, image_column)
        _encode_fn_cache[(spec, tuple(image_shape))] = udf
    udf.on_bad, udf.dest, udf.id_column, udf.image_column, udf.dest_root_prefix = on_bad, dest, id_column, image_column, root_prefix
    for start in range(0, max(block.num_rows, 1), batch_size):
        yield udf(block.slice(start, batch_size))


_encode_fn_cache: dict = {}


@functools.cache
def _pixel_encoder(spec):
    from retrack.models.encoders import build_encoder

    return build_encoder(spec)


def _encode_files(batch, plan, s3, spec, on_bad, batch_size):
    """map_batches UDF: encode the corpus files listed in `batch` (one row per file: its chunk's
    destination, its part number there and the file itself), each into its own part."""
    from retrack.index.build import encode_files
    from retrack.storage.location import Location

    rows = [dict(zip(batch, values)) for values in zip(*(v.tolist() for v in batch.values()))]
    try:
        for dest in dict.fromkeys(r["dest"] for r in rows):
            files = [(_source_file(r), r["n"]) for r in rows if r["dest"] == dest]
            encode_files(plan, files, Location(dest, s3), _pixel_encoder(spec), on_bad, batch_size)
    except RetrackError as exc:
        # Returned, not raised: a failed task makes Ray Data drop the outputs of tasks that had
        # finished but not yet reached the driver, and their chunks would not be marked complete.
        # The error itself travels as an object column (retrack errors pickle to an equal error).
        return {"job": [-1], "rows": [0], "error": np.array([exc], dtype=object)}
    return {"job": batch["job"], "rows": batch["rows"], "error": np.full(len(rows), None, dtype=object)}


def _source_file(row: dict):
    from retrack.data.source import SourceFile

    return SourceFile(**{k: row[k] for k in _FILE_FIELDS})


def _read_files(batch, plan, batch_size):
    """map_batches UDF: the rows (path, id, image) of the corpus files listed in `batch`, streamed
    by the library's reader a batch at a time."""
    import pyarrow as pa

    from retrack.data.source import iter_file_batches

    for row in batch.to_pylist():
        f = _source_file(row)
        for ids, images, *_ in iter_file_batches(plan, f, batch_size):
            yield pa.table({"path": [f.rel] * len(ids), "id": pa.array(ids, pa.string()), "image": pa.array(images, pa.binary())})


_FILE_FIELDS = ("uri", "rel", "size", "mtime_ns", "rows", "captioned", "caption")
# Ray's own processes work for every task, on the workers' cores: 20 one-file tasks of 0.5 s took
# 6.5 s where 10 two-file tasks took 6.35 s (docs/scaling.md). A task takes files while it stays
# under _TASK_BYTES; at least _TASKS_PER_CPU tasks per CPU keep the last wave even.
_TASK_BYTES = 64 << 20
_TASKS_PER_CPU = 4


def files_per_task(sizes: list[int], cpus: int) -> int:
    """How many corpus files one encode task takes (at least one)."""
    if not sizes:
        return 1
    by_size = _TASK_BYTES // max(1, sum(sizes) // len(sizes))
    return max(1, min(by_size, len(sizes) // (_TASKS_PER_CPU * max(1, cpus))))


class RayExecutor:
    """Runs `build_index`'s work on Ray: streaming encode with Ray Data, shards as parallel tasks."""

    def __init__(self, batch_size: int = 256, actor_cpus: float = 0.5, shard_cpus: float = 1.0,
                 concurrency: int | None = None, show_progress: bool = False, shard_retries: int = 3):
        self.batch_size, self.actor_cpus, self.shard_cpus = batch_size, actor_cpus, shard_cpus
        # A shard task whose worker (or node) dies is rerun by Ray; a shard is written atomically
        # and is a pure function of its inputs, so a retry is safe.
        self.shard_retries = shard_retries
        self.concurrency, self.show_progress = concurrency, show_progress

    def encode(self, plan, jobs, encoder, on_bad, progress=None, chunk_done=None):
        import ray
        import ray.data

        from pipelines.progress import ray_data_progress

        ctx = ray.data.DataContext.get_current()
        if not ray_data_progress(ctx, bars=self.show_progress):
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        # Read blocks of at most 32 MiB of image bytes: what one fused read-encode-write task holds.
        saved_block_size = ctx.target_max_block_size
        ctx.target_max_block_size = min(saved_block_size or 32 << 20, 32 << 20)
        try:
            if plan.format != "imagefolder" and encoder.kind == "pixels":
                self._encode_per_file(ray, plan, jobs, encoder, on_bad, progress, chunk_done)
            else:
                total, rows = sum(job.chunk.rows for job in jobs), 0
                for job in jobs:
                    self._encode_blocks(ray, plan, job, encoder, on_bad)
                    if chunk_done:
                        chunk_done(job)
                    rows += job.chunk.rows
                    if progress:
                        progress("encode", rows, total)
        except Exception as exc:  # noqa: BLE001 - re-raised as the retrack error inside, if any
            raise unwrap(exc) from None
        finally:
            ctx.target_max_block_size = saved_block_size

    def _encode_per_file(self, ray, plan, jobs, encoder, on_bad, progress, chunk_done):
        """One dataset over every job's files, so the chunks stream into each other (no idle CPUs
        at each chunk's end); a chunk is reported done as soon as its last file is written."""
        items = [{"job": j, "dest": job.dest.uri, "n": n, **{k: getattr(f, k) for k in _FILE_FIELDS}}
                 for j, job in enumerate(jobs) for n, f in enumerate(job.chunk.files)]
        if not items:
            return
        per_task = files_per_task([i["size"] for i in items], int(ray.cluster_resources().get("CPU", 1)))
        files = ray.data.from_items(items, override_num_blocks=-(-len(items) // per_task))
        # The plan travels to every task without its file list (each row names its own file).
        done = files.map_batches(_encode_files, batch_size=per_task, fn_kwargs={
            "plan": replace(plan, files=[], chunks=[]), "s3": jobs[0].dest.s3, "spec": encoder, "on_bad": on_bad,
            "batch_size": self.batch_size})
        # Ray Data reserves part of the CPUs for each operator of a plan. This plan has one real
        # operator; with the reservation on, a 2-CPU node ran one task at a time for the first
        # second and left each worker idle ~0.2 s between tasks (8.0 s against 6.0 s without).
        # Set on this dataset's own context (the one it executes with), not the driver's.
        done.context.op_resource_reservation_enabled = False
        left = [len(job.chunk.files) for job in jobs]
        total, rows = sum(job.chunk.rows for job in jobs), 0
        for batch in done.iter_batches(batch_size=None, batch_format="numpy"):
            for j, r, error in zip(*(batch[k].tolist() for k in ("job", "rows", "error"))):
                if isinstance(error, RetrackError):  # a success's None arrives as NaN
                    raise error
                left[j] -= 1
                rows += r
                if left[j] == 0 and chunk_done:
                    chunk_done(jobs[j])
            if progress:
                progress("encode", rows, total)

    def _encode_blocks(self, ray, plan, job, encoder, on_bad):
        """Read blocks -> decode and encode (a fused function for pixels, an actor pool for the VAE) -> write."""
        root_prefix = plan.root.path.rstrip("/") + "/"
        paths = [plan.location_of(f).path for f in job.chunk.files]
        if plan.format == "parquet":
            ds = ray.data.read_parquet(paths, filesystem=plan.root.fs, include_paths=True)
            id_col, img_col = "id", "image"
        elif plan.format == "webdataset":
            files = [{k: getattr(f, k) for k in _FILE_FIELDS} for f in job.chunk.files]
            ds = ray.data.from_items(files, override_num_blocks=len(files)).map_batches(
                _read_files, batch_size=1, batch_format="pyarrow", fn_kwargs={"plan": replace(plan, files=[], chunks=[]), "batch_size": self.batch_size})
            id_col, img_col = "id", "image"
        else:
            ds = ray.data.read_binary_files(paths, filesystem=plan.root.fs, include_paths=True)
            id_col, img_col = None, "bytes"
        kwargs = dict(spec=encoder, image_shape=plan.image_shape, on_bad=on_bad, dest=job.dest,
                      id_column=id_col, image_column=img_col)
        if encoder.kind == "pixels":
            ds = ds.map_batches(_encode_fn, batch_format="pyarrow", batch_size=None,
                                fn_kwargs={**kwargs, "root_prefix": root_prefix, "batch_size": self.batch_size})
        else:
            cpus = ray.cluster_resources().get("CPU", 1)
            gpus = ray.cluster_resources().get("GPU", 0)
            use_gpu = gpus >= 1 and encoder.device != "cpu"
            spec = encoder if use_gpu else type(encoder)(**{**encoder.to_dict(), "device": "cpu"})
            size = self.concurrency or (int(gpus) if use_gpu else max(1, int(cpus // 1)))
            udf_kwargs = {**kwargs, "spec": spec}

            class _Udf(_EncodeBatch):
                dest_root_prefix = root_prefix

            ds = ds.map_batches(_Udf, fn_constructor_kwargs=udf_kwargs, batch_format="pyarrow",
                                batch_size=self.batch_size, concurrency=size,
                                num_gpus=1 if use_gpu else 0, num_cpus=self.actor_cpus)
        # A map function's CorpusError reaches the driver as the cause of Ray's task error
        # (`runtime.unwrap`), not wrapped in a UserCodeException that keeps only its text.
        ds.context.raise_original_map_exception = True
        ds.write_parquet(job.dest.path, filesystem=job.dest.fs)

    def train(self, root, keys, infos, params):
        import ray

        from retrack.index.shards import embeddings_dir, read_sample, sample_plan, train_on_sample

        # One task per chunk reads its share of the sample, in parallel; one task trains on the
        # parts (object references: the sample never reaches the driver). Nothing else of the
        # build runs meanwhile, so training takes the largest node's CPUs. (Counted from the nodes,
        # not from the CPUs free now: the read tasks hold them, and that count trained on one
        # thread: reading and training took 78 s at 1M, against 4 + 45 s on both.)
        cpus = max(1, max(int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]))
        plan = sample_plan([(embeddings_dir(root, k), i) for k, i in zip(keys, infos)], params.train_size, params.seed)
        read = ray.remote(num_cpus=self.shard_cpus, max_retries=self.shard_retries)(read_sample)
        parts = [read.remote(chunk) for chunk in plan]
        task = ray.remote(num_cpus=cpus, max_retries=self.shard_retries)(train_on_sample)
        return get(task.remote(params, cpus, *parts))

    def build_shards(self, root, jobs, params, quantizer, progress=None):
        import ray

        from retrack.index.shards import build_shard

        task = ray.remote(num_cpus=self.shard_cpus, max_retries=self.shard_retries)(build_shard)
        threads = max(1, int(self.shard_cpus))
        pending = [task.remote(root, j.number, j.key, params, quantizer, threads, j.dim) for j in jobs]
        out = []
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            out.extend(get(done))
            if progress:
                progress("shards", len(out), len(jobs))
        return out


def build(corpus: "str | CorpusPlan", out: str, encoder=None, params=None, on_bad: str = "fail", rows_per_chunk: int = 200_000,
          force: bool = False, endpoint: str | None = None, ray_address: str | None = None, num_cpus: int | None = None,
          progress=None, executor: RayExecutor | None = None, format: str = "parquet"):
    """Build (or reuse / repair) the index with Ray; see `retrack.index.build_index`."""
    from retrack.index import EncoderSpec, IndexParams, build_index

    ensure_ray(ray_address, num_cpus)
    return build_index(corpus, out, encoder or EncoderSpec(), params or IndexParams(), executor or RayExecutor(),
                       on_bad=on_bad, rows_per_chunk=rows_per_chunk, force=force, endpoint=endpoint, progress=progress,
                       format=format)


def serve_index(uri: str, endpoint: str | None = None, manifest_digest: str | None = None) -> "ShardedIndex":
    """A built index served by one Ray actor per shard (each loads and searches its own shard; no
    process, the driver included, holds the whole index), top-k merged on the caller. The actors
    end when the returned index is dropped. Each takes a sliver of a CPU so that it is placed on a
    worker node (a KubeRay head offers none)."""
    import ray

    from retrack.index import Shard, ShardedIndex, index_manifest, shard_latents, shard_vectors
    from retrack.storage.location import Location

    root, manifest = index_manifest(uri, endpoint, manifest_digest)
    # Credentials resolved here: workers may have started before the AWS_* variables were set.
    remote_root = Location(root.uri, root.s3.resolved()) if root.is_s3 else root
    server = ray.remote(num_cpus=0.01)(Shard)
    nprobe = manifest.params.get("nprobe")
    actors = [server.remote(remote_root, rec, nprobe) for rec in manifest.shards]
    return ShardedIndex([_Calls(a) for a in actors], manifest, shard_vectors(root, manifest), gather=get,
                        full=shard_latents(root, manifest))


class _Calls:
    """An actor handle whose method calls return object references (`ShardedIndex` gathers them)."""

    def __init__(self, actor):
        self.actor = actor

    def __getattr__(self, name: str):
        return getattr(self.actor, name).remote
